"""Tuning: the search space of schedules, the Optuna tuner, the cache of winners, and the choice of the schedule
a call runs."""

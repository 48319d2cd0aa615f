"""Rewrites: pure Cascade → Cascade steps into the cheapest form (deferral, reassociation, strength reduction,
online streaming), run in order by ``pipeline.optimise``; the log-sum-exp output added as an Einsum."""

"""The autotuner: one Optuna study per cache key, whose winner goes into the autotune cache.

A trial draws a schedule from the search space (``einflash.compiler.tuning.space``), runs the kernel on
the problem's inputs, holds the output to the tolerance rule against the float64 reference, and
only then times it. What happens to a draw:

- pruned by the buffer analysis: the trial is PRUNED at once (the sampler learns that region is
  bad) and costs no compile;
- drawn before: the earlier result is given again (COMPLETE with the same time, or FAIL), marked
  ``repeat_of``, with no new measurement;
- a compile error, an out-of-resources failure, a launch error or a wrong result: the trial FAILs
  with the reason in its ``failure`` user attribute, and tuning goes on;
- otherwise it COMPLETEs with its time in ms: only these can win.

The budget counts schedules actually measured (``trials``) and wall time (``seconds``, checked
between trials, so a trial that started in time may finish after it). The sampler is seeded: TPE,
or Optuna's GridSampler when the whole feasible space fits the trial budget. The study is warm
started (``enqueue_trial``) from the heuristic default, the winners of the nearest cached shape buckets
and the schedules the target's cost model predicts fastest (``einflash.compiler.tuning.ranking``). Several
processes (one per GPU, or on several machines) tune one study together when they share its storage: a
journal file on one machine, an RDB URL (``postgresql://...``) across machines; each counts its own budget,
and each skips schedules another has measured.

The correctness check runs the reference once per tuning run. It covers the whole problem while
the reference's largest tensors (the scores, B·Hq·M·N, and k and v repeated to the query heads,
B·Hq·N·D) have at most ``FULL_CHECK_ELEMENTS`` elements; beyond that the float64 reference of the whole
problem is too large, so it covers one slice that the reference executor runs alone: the last batch and the
last kv head with its group of query heads (the slice furthest from the base pointers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import pathlib
import socket
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from ...backends.target import Target
from ...errors import TuningError, TuningOptionError
from ...ir.cascade import Cascade, Layout
from ...ir.reference import bind_extents, bind_params, kv_heads
from ...testing import judge, references
from ..runtime.forward import Forward
from ..schedule import Schedule
from .cache import TuneCache, best_of
from .cache_format import schedule_from_json, schedule_to_json
from .cache_keys import Bucket, CacheKey
from .ranking import predicted_order
from .space import Space, element_bytes, search_space
from .storage import fail_stale_trials, open_storage

DEFAULT_TRIALS = 30
DEFAULT_SECONDS = 600.0
FULL_CHECK_ELEMENTS = 1 << 24  # the reference's largest tensor up to which the whole problem is checked
NEIGHBOURS = 3  # cached buckets whose winners warm-start a study
MODEL_FIRST = 6  # schedules the cost model ranks fastest, queued after the default and the neighbours' winners
MAX_IDLE = 100  # draws in a row that measure nothing (pruned, repeated) before the sampler is deemed done

Timer = Callable[[Callable[[], object], Schedule], float]


def interpreter_timer(run: Callable[[], object], schedule: Schedule) -> float:
    """The shortest wall time of three calls, in ms (Triton's interpreter: no GPU events to time with)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def gpu_timer(run: Callable[[], object], schedule: Schedule) -> float:
    """Median ms of ``run`` by ``triton.testing.do_bench`` (which flushes the L2 cache between runs)."""
    from triton.testing import do_bench

    return float(do_bench(run, warmup=25, rep=100, return_mode="median"))


@dataclass(frozen=True)
class Budget:
    """How much one tuning process may spend: schedules measured, and wall seconds."""

    trials: int = DEFAULT_TRIALS
    seconds: float = DEFAULT_SECONDS

    def __post_init__(self):
        if not (isinstance(self.trials, int) and self.trials >= 1) or not self.seconds > 0:
            raise TuningOptionError(
                f"a budget is at least one trial and some seconds, got {self.trials} trials, {self.seconds} s"
            )


@dataclass(frozen=True)
class TuneResult:
    """What a tuning run found (over every worker of the study) and where it was stored."""

    name: str
    key: CacheKey
    bucket: Bucket
    study: str
    sampler: str
    space: Space
    best: Schedule
    best_ms: float
    default: Schedule
    default_ms: float | None  # None when the default failed
    measured: tuple[dict, ...]  # every schedule measured in the study: trial, schedule, ms, error, worker
    failed: tuple[dict, ...]  # every schedule that failed: trial, schedule, kind, reason, worker
    here: int  # schedules this process measured or saw fail
    seconds: float
    checked: str
    path: pathlib.Path
    # the cost model's fastest schedule and the time it predicted (None: no model for the target or the cascade)
    model_first: tuple[Schedule, float] | None = None

    @property
    def model_first_ms(self) -> float | None:
        """The measured time of the model's first choice, where the study measured it."""
        if self.model_first is None:
            return None
        return next((m["ms"] for m in self.measured if schedule_from_json(m["schedule"]) == self.model_first[0]), None)

    @property
    def speedup(self) -> float | None:
        return None if self.default_ms is None else self.default_ms / self.best_ms

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "cascade": self.key.cascade,
            "dtype": self.key.dtype,
            "environment": self.key.environment,
            "bucket": self.bucket.label,
            "study": self.study,
            "sampler": self.sampler,
            "space": self.space.to_json(),
            "best": schedule_to_json(self.best),
            "best_ms": self.best_ms,
            "default": schedule_to_json(self.default),
            "default_ms": self.default_ms,
            "speedup": self.speedup,
            "measured": list(self.measured),
            "failed": list(self.failed),
            "here": self.here,
            "seconds": self.seconds,
            "checked": self.checked,
            "cache": str(self.path),
            "model_first": None
            if self.model_first is None
            else {
                "schedule": schedule_to_json(self.model_first[0]),
                "predicted_ms": self.model_first[1],
                "ms": self.model_first_ms,
            },
        }

    def __str__(self) -> str:
        speed = f"{self.speedup:.2f}x" if self.speedup else "default failed"
        pruned = ", ".join(f"{n} {k}" for k, n in self.space.pruned_counts().items()) or "none"
        rows = [
            ("variant", f"{self.name} ({self.key.dtype}) on {self.key.environment['device']}"),
            ("bucket", self.bucket.label),
            ("study", f"{self.study} ({self.sampler})"),
            ("space", f"{self.space.size} schedules, {len(self.space.feasible)} feasible; pruned: {pruned}"),
            (
                "trials",
                f"{len(self.measured)} measured, {len(self.failed)} failed ({self.here} here, {self.seconds:.1f} s)",
            ),
            ("best", f"{self.best.describe()}: {self.best_ms:.4f} ms"),
            (
                "default",
                f"{self.default.describe()}: " + ("failed" if self.default_ms is None else f"{self.default_ms:.4f} ms"),
            ),
            ("speedup", speed),
            *(
                ()
                if self.model_first is None
                else [
                    (
                        "model's first",
                        f"{self.model_first[0].describe()}: {self.model_first[1]:.4f} ms predicted, "
                        + ("not measured" if self.model_first_ms is None else f"{self.model_first_ms:.4f} ms measured"),
                    )
                ]
            ),
            ("checked", self.checked),
            ("cache", str(self.path)),
        ]
        for f in self.failed[:5]:
            rows.append(("failed", f"{schedule_from_json(f['schedule']).describe()}: {f['kind']}: {f['reason'][:120]}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _Failed(Exception):
    """A schedule that did not compile, run or match the reference (the trial fails; tuning goes on)."""


def _kind(e: Exception) -> str:
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"OutOfResources", "OutOfResourcesError", "OutOfMemoryError"}:
        return "out of resources"
    if names & {"CompilationError", "CompileTimeAssertionFailure", "PTXASError"}:
        return "compile error"
    return "run error"


@dataclass
class _Check:
    """The reference for one tuning run, and the part of a kernel output it covers."""

    exact: torch.Tensor
    lowp: torch.Tensor
    batch: slice
    heads: slice
    what: str

    @classmethod
    def of(cls, cascade: Cascade, inputs: dict, params: dict, extents: dict, kv: int, dtype) -> _Check:
        B, H = extents["b"], extents["h"]
        widest = max(v for r, v in extents.items() if r not in ("b", "h", "n"))  # M or a head dim
        if B * H * extents["n"] * widest <= FULL_CHECK_ELEMENTS:
            return cls(*references(cascade, inputs, params, dtype), slice(None), slice(None), "whole problem")
        group = H // kv
        batch, kvh, heads = slice(B - 1, B), slice(kv - 1, kv), slice((kv - 1) * group, kv * group)
        sliced = {}
        for t in cascade.inputs:
            pick = {"b": batch, "h": kvh if t.layout is Layout.KEY else heads}
            sliced[t.name] = inputs[t.name][tuple(pick.get(r, slice(None)) for r in t.ranks)]
        what = f"batch {B - 1}, kv head {kv - 1} (query heads {heads.start}..{heads.stop - 1})"
        return cls(*references(cascade, sliced, params, dtype), batch, heads, what)

    def verdict(self, out: torch.Tensor):
        return judge(out[self.batch, self.heads], self.exact, self.lowp)


def _params(s: Schedule) -> dict:
    return dataclasses.asdict(s)


def _sampler(kind: str, space: Space, budget: Budget, seed: int) -> tuple[str, optuna.samplers.BaseSampler]:
    if kind == "auto":
        kind = "grid" if len(space.feasible) <= budget.trials else "tpe"
    if kind == "grid":
        return kind, optuna.samplers.GridSampler({k: list(v) for k, v in space.knobs}, seed=seed)
    if kind == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return kind, optuna.samplers.TPESampler(
                seed=seed, multivariate=True, n_startup_trials=min(10, max(3, budget.trials // 3))
            )
    raise TuningOptionError(f"sampler must be 'auto', 'tpe' or 'grid', got {kind!r}")


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs each trial, and each failed one as a warning: the result table says all that."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


class _Progress:
    """A rich progress bar over the measured trials, on stderr."""

    def __init__(self, on: bool, title: str, total: int):
        self.bar = None
        if on:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(title, total=total)
            self.title = title

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def update(self, done: int, best: float | None):
        if self.bar:
            self.bar.update(
                self.task, completed=done, description=self.title + ("" if best is None else f"  best {best:.4f} ms")
            )

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def _rows(study: optuna.Study) -> tuple[list[dict], list[dict]]:
    """Measured and failed schedules of the study (repeats, pruned and unfinished trials left out)."""
    measured, failed = [], []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "repeat_of" in a or "schedule" not in a:
            continue
        row = {"trial": t.number, "schedule": a["schedule"], "worker": a.get("worker")}
        if a.get("warm_start"):
            row["warm_start"] = a["warm_start"]
        if t.state is TrialState.COMPLETE:
            measured.append({**row, "ms": t.value, "max_error": a.get("max_error"), "tolerance": a.get("tolerance")})
        elif t.state is TrialState.FAIL and "failure" in a:
            failed.append({**row, "kind": a.get("failure_kind"), "reason": a["failure"]})
    return measured, failed


def tune(
    cascade: Cascade,
    forward: Forward,
    inputs: dict[str, torch.Tensor],
    params: dict[str, float],
    target: Target,
    *,
    budget: Budget = Budget(),
    timer: Timer | None = None,
    storage: str | None = None,
    seed: int = 0,
    sampler: str = "auto",
    warm_start: bool = True,
    cache: TuneCache | None = None,
    progress: bool = False,
) -> TuneResult:
    """Tune the schedule of ``cascade`` on these inputs (and given parameters) on ``target``; store the result.

    ``timer(run, schedule)`` returns ms for one schedule (default: ``gpu_timer`` on a GPU,
    ``interpreter_timer`` under the interpreter); ``storage`` is an Optuna RDB URL or a journal file
    path shared by the workers of one study (default: a journal file beside the cache); ``sampler`` is
    ``auto``, ``tpe`` or ``grid``; ``warm_start`` enqueues the default and the nearest cached winners.
    Raises TuningError when no schedule compiled, ran and matched the reference (after storing the failures).
    Most callers use ``AttentionOp.tune`` or ``einflash tune``.
    """
    started = time.monotonic()
    cache = cache or TuneCache()
    if forward.error is not None:
        raise forward.error
    key = CacheKey.of(cascade, target, inputs[cascade.inputs[0].name].dtype)
    store = open_storage(storage, cache.root / "studies" / f"{key.stem}.journal")  # refused before any work
    trials = _Trials.of(cascade, forward, inputs, params, target, timer, storage, seed, key)
    sampler_name, chosen = _sampler(sampler, trials.space, budget, trials.seed)
    with _quiet_optuna():
        study = optuna.create_study(
            study_name=trials.study_name, direction="minimize", sampler=chosen, storage=store, load_if_exists=True
        )
        fail_stale_trials(study)
        ranked = trials.ranked(target)
        if warm_start:
            _enqueue(study, trials.space, cache, trials.key, trials.bucket, ranked)
        with _Progress(progress, f"tuning {cascade.name} {trials.bucket.label}", budget.trials) as bar:
            study.optimize(
                trials.objective,
                timeout=budget.seconds,
                catch=(_Failed,),
                callbacks=[trials.stopper(budget, started + budget.seconds, bar)],
            )
    measured, failed = _rows(study)
    seconds = time.monotonic() - started
    entry = trials.entry(sampler_name, storage, params, measured, failed, seconds)
    path = cache.put(trials.key, trials.bucket, entry)
    if entry["best"] is None:
        reasons = "; ".join(f"{f['kind']}: {f['reason'][:100]}" for f in failed[:3]) or "nothing was measured"
        raise TuningError(
            f"no schedule of {cascade.name} at {trials.bucket.label} compiled, ran and matched the "
            f"reference in {len(failed)} tries ({reasons}); the failures are in {path}"
        )
    return TuneResult(
        cascade.name,
        trials.key,
        trials.bucket,
        trials.study_name,
        sampler_name,
        trials.space,
        schedule_from_json(entry["best"]["schedule"]),
        entry["best"]["ms"],
        trials.space.default,
        entry["default"]["ms"],
        tuple(measured),
        tuple(failed),
        trials.here,
        seconds,
        trials.check.what,
        path,
        ranked[0] if ranked else None,
    )


@dataclass
class _Trials:
    """One worker's part of a study: what each trial runs on and is checked against, and what it has done."""

    cascade: Cascade
    forward: Forward
    inputs: dict[str, torch.Tensor]
    values: dict[str, float]  # every parameter, defaults resolved
    extents: dict[str, int]
    kv: int
    space: Space
    key: CacheKey
    bucket: Bucket
    check: _Check
    timer: Timer
    worker: str
    seed: int  # this worker's: a shared study's workers each draw their own sequence
    here: int = 0  # schedules this worker measured
    idle: int = 0  # draws in a row that measured nothing (pruned, repeated)

    @classmethod
    def of(cls, cascade, forward, inputs, params, target: Target, timer, storage, seed, key: CacheKey) -> _Trials:
        extents = bind_extents(forward.rewritten, inputs, params)
        first = inputs[cascade.inputs[0].name]
        kv = kv_heads(cascade, inputs)
        # every parameter resolved at the full extents, so that a slice checks the same maths
        check = _Check.of(
            cascade,
            inputs,
            bind_params(cascade, params, bind_extents(cascade, inputs, params)),
            extents,
            kv,
            first.dtype,
        )
        worker = f"{socket.gethostname()}:{os.getpid()}"
        if storage is not None:
            seed = seed + zlib.crc32(worker.encode()) % 1_000_003
        return cls(
            cascade,
            forward,
            inputs,
            bind_params(forward.rewritten, params, extents),
            extents,
            kv,
            search_space(forward, target, extents, kv, element_bytes(cascade, inputs, first.dtype)),
            key,
            Bucket.of(extents, kv),
            check,
            timer or (interpreter_timer if target.is_interpreter else gpu_timer),
            worker,
            seed,
        )

    def ranked(self, target: Target) -> list[tuple[Schedule, float]]:
        """The feasible schedules with their predicted ms, fastest first (empty without a cost model)."""
        first = self.inputs[self.cascade.inputs[0].name]
        return predicted_order(
            self.forward,
            target,
            self.extents,
            self.kv,
            element_bytes(self.cascade, self.inputs, first.dtype),
            self.values,
            self.space.feasible,
        )

    @property
    def study_name(self) -> str:
        return f"{self.key.stem}/{self.bucket.label}"

    def run(self, s: Schedule) -> torch.Tensor:
        return self.forward.run(self.inputs, self.values, s, self.extents)[0]

    def objective(self, trial: optuna.Trial) -> float:
        """One draw: pruned by the buffer analysis, a repeat of an earlier draw, or measured."""
        s = Schedule(**{name: trial.suggest_categorical(name, vals) for name, vals in self.space.knobs})
        trial.set_user_attr("worker", self.worker)
        why = self.space.why_pruned(s)
        if why is not None:
            self.idle += 1
            trial.set_user_attr("pruned", why)
            raise optuna.TrialPruned(why)
        for t in trial.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
        ):
            if t.number == trial.number or t.params != trial.params or "repeat_of" in t.user_attrs:
                continue
            if t.state is TrialState.FAIL and "failure" not in t.user_attrs:
                continue  # not a measurement: its worker died (stale, or failed by the RDB's heartbeat)
            self.idle += 1
            trial.set_user_attr("repeat_of", t.number)
            if t.state is TrialState.COMPLETE:
                assert t.value is not None  # a complete trial of a single-objective study has its value
                return t.value
            raise _Failed(f"repeat of trial {t.number} ({t.state.name.lower()})")
        self.idle = 0
        self.here += 1
        trial.set_user_attr("schedule", schedule_to_json(s))
        return self.measure(trial, s)

    def measure(self, trial: optuna.Trial, s: Schedule) -> float:
        """Run ``s``, hold its output to the tolerance rule, then time it; any failure fails the trial."""
        try:
            verdict = self.check.verdict(self.run(s))
        except Exception as e:  # noqa: BLE001 -- any failure of a candidate is a failed trial, never the end
            raise _fail(trial, _kind(e), f"{type(e).__name__}: {str(e)[:600]}") from None
        trial.set_user_attr("max_error", verdict.max_error)
        trial.set_user_attr("tolerance", verdict.tolerance)
        if not verdict.ok:
            raise _fail(
                trial,
                "wrong result",
                f"max error {verdict.max_error:.3e} > tolerance {verdict.tolerance:.3e} ({self.check.what})",
            )
        try:
            ms = float(self.timer(lambda: self.run(s), s))
        except Exception as e:  # noqa: BLE001
            raise _fail(trial, _kind(e), f"while timing: {type(e).__name__}: {str(e)[:600]}") from None
        if not (math.isfinite(ms) and ms > 0):
            raise _fail(trial, "timer", f"the timer returned {ms!r} ms")
        return ms

    def stopper(self, budget: Budget, deadline: float, bar: _Progress):
        """A study callback that stops this worker once its budget is spent or the space is exhausted."""

        def stop_when_spent(study: optuna.Study, trial) -> None:
            measured, failed = _rows(study)
            bar.update(self.here, min((m["ms"] for m in measured), default=None))
            exhausted = len({_schedule_key(r["schedule"]) for r in measured + failed}) >= len(self.space.feasible)
            if self.here >= budget.trials or time.monotonic() > deadline or self.idle >= MAX_IDLE or exhausted:
                study.stop()

        return stop_when_spent

    def entry(
        self, sampler: str, storage: str | None, params: dict, measured: list[dict], failed: list[dict], seconds: float
    ) -> dict:
        """The cache entry of this study: every measured and failed schedule, the default's time, the winner."""
        default_row = next((m for m in measured if schedule_from_json(m["schedule"]) == self.space.default), None)
        return {
            "study": self.study_name,
            "storage": "rdb" if storage and "://" in storage else "journal",
            "sampler": sampler,
            "seed": self.seed,
            "extents": dict(self.extents),
            "kv_heads": self.kv,
            "params": dict(params),
            "space": self.space.to_json(),
            "checked": self.check.what,
            "default": {
                "schedule": schedule_to_json(self.space.default),
                "ms": None if default_row is None else default_row["ms"],
            },
            "best": best_of(measured),
            "measured": measured,
            "failed": failed,
            "workers": sorted({self.worker} | {r["worker"] for r in measured + failed if r.get("worker")}),
            "seconds": seconds,
            "tuned": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


def _schedule_key(schedule: dict) -> tuple:
    return tuple(sorted(schedule.items()))


def _fail(trial: optuna.Trial, kind: str, reason: str) -> _Failed:
    trial.set_user_attr("failure_kind", kind)
    trial.set_user_attr("failure", reason)
    return _Failed(f"{kind}: {reason}")


def _enqueue(
    study: optuna.Study,
    space: Space,
    cache: TuneCache,
    key: CacheKey,
    bucket: Bucket,
    ranked: list[tuple[Schedule, float]],
) -> None:
    """Warm start: the heuristic default first, then the winners of the nearest cached buckets, moved into
    this space (each knob to its nearest candidate), then the cost model's fastest schedules. Workers joining a
    study skip what is queued already."""
    seen = {space.default}
    study.enqueue_trial(_params(space.default), user_attrs={"warm_start": "heuristic default"}, skip_if_exists=True)
    for b, e in cache.neighbours(key, bucket)[:NEIGHBOURS]:
        s = space.project(schedule_from_json(e["best"]["schedule"]))
        if s in seen or space.why_pruned(s) is not None:
            continue
        seen.add(s)
        study.enqueue_trial(_params(s), user_attrs={"warm_start": f"best of {b.label}"}, skip_if_exists=True)
    for s, ms in [(s, ms) for s, ms in ranked if s not in seen][:MODEL_FIRST]:
        study.enqueue_trial(
            _params(s), user_attrs={"warm_start": f"cost model: {ms:.4f} ms predicted"}, skip_if_exists=True
        )

"""The autotune cache (docs/design.md §8): measured schedules as JSON, one file per variant, environment and dtype.

A file is named by its key: the cascade's structural hash, the target (name, GPU as the driver names
it, compute capability), the Triton, torch and einflash versions, and the dtype. Inside, entries are
keyed by shape bucket: the template family, M and N rounded up to powers of two, B·Hkv rounded up to
a power of two, the GQA group and the exact head dims. Each entry keeps every configuration measured
(its time, its error against the reference) and every failure (with its reason), the winner and the
heuristic default's own time.

Writes are atomic (a temporary file, then ``os.replace``) under a file lock, so concurrent tuners and
readers never see half a file. A file that cannot be read (not a regular file, larger than
MAX_FILE_BYTES, not UTF-8 JSON, nested more than MAX_DEPTH deep, wrong format version, a schema
violation, or metadata that do not match its key) is reported once as a CacheWarning naming the file
and what is wrong, and skipped; the next write moves it aside to ``*.corrupt-<time>``, and
``TuneCache.clear`` removes it whatever it is. Every field a file gives is checked before it is used:
those that name the file (``key_problem``) and the type of each one a reader takes. An entry whose
schedules no tuner could have chosen for its target (``schedule_problem``: ``block_m: 3`` from a hand
edit or a forged bundle would crash every call) is skipped alone, with a CacheWarning, on read and on
import; the next write drops it.

>>> import tempfile, einflash as ef
>>> from einflash.backends import get_target
>>> from einflash.compiler.runtime.forward import Schedule
>>> @ef.attention
... def plain(q, k, v):
...     return ef.softmax(q @ k * ef.scale, "n") @ v
>>> cache = TuneCache(tempfile.mkdtemp())
>>> key = CacheKey.of(plain.cascade, get_target("sm90"), "bfloat16")
>>> b = Bucket.of(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), 16)
>>> b.label
'forward m4096 n4096 bkv32 g1 e128 f128'
>>> _ = cache.put(key, b, {"best": {"schedule": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
...                                 "ms": 1.5}, "measured": [], "failed": []})
>>> near = Bucket.of(dict(b=2, h=16, m=8192, n=8192, e=128, f=128), 16)  # not tuned: the nearest bucket serves
>>> cache.best(key, near)  # doctest: +NORMALIZE_WHITESPACE
(Schedule(block_m=64, block_n=64, num_warps=4, num_stages=3, splits=1, pack=False, reverse_m=False, max_registers=0),
 'forward m4096 n4096 bkv32 g1 e128 f128')
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import re
import shutil
import stat
import time
import warnings
from dataclasses import dataclass

import filelock
import torch
import triton

from ... import knobs
from ...backends import get_target
from ...backends.target import Target
from ...errors import BackendError, CacheError, CacheWarning, LoweringError
from ...ir.cascade import Cascade
from ...shape import Shape
from ..runtime.forward import DTYPE_NAMES
from ..schedule import Schedule, default_schedule, next_power_of_two
from .space import family_of

FORMAT = 1
KIND = "einflash-autotune"
BUNDLE = "einflash-autotune-bundle"
LOCK_TIMEOUT_S = 60
# what a reader parses, at most: a cache file holds an entry per shape bucket of a few KiB each (its trials), and
# nests 5 deep (entries, entry, measured, row, schedule); a bundle holds every file of a cache, 2 deeper
MAX_FILE_BYTES = 64 << 20
MAX_BUNDLE_BYTES = 1 << 30
MAX_DEPTH = 32
ENVIRONMENT = ("target", "device", "capability", "triton", "torch", "einflash")
DTYPES = tuple(DTYPE_NAMES.values())
# the key's fields that name its file (CacheKey.stem): what einflash writes there, and nothing that names a path
_HASH = re.compile(r"[0-9a-f]{8,64}")
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_NOT_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9_-]")


@functools.cache
def _einflash_version() -> str:
    try:
        return importlib.metadata.version("einflash")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def environment(target: Target) -> dict[str, str | None]:
    """Everything about this process and ``target`` that can change which schedule is fastest (``ENVIRONMENT``)."""
    return {
        "target": target.name,
        "device": target.device,
        "capability": None if target.gpu is None else f"{target.gpu.arch // 10}.{target.gpu.arch % 10}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "einflash": _einflash_version(),
    }


def _show(value) -> str:
    """A value from a file, as a message quotes it: a file may hold megabytes where a name should be."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def key_problem(cascade, name, dtype, env) -> str | None:
    """What makes these fields (read from a file, perhaps) unfit to key a cache file, or None. The cascade's
    hash, the dtype and the target name the file (``CacheKey.stem``), so each must be what einflash writes."""
    if not isinstance(cascade, str) or not _HASH.fullmatch(cascade):
        return f"cascade {_show(cascade)} is not a structural hash (8 to 64 lowercase hexadecimal digits)"
    if not isinstance(name, str):
        return f"name {_show(name)} is not a string"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"dtype {_show(dtype)} is not one of {', '.join(DTYPES)}"
    if not isinstance(env, dict) or set(env) != set(ENVIRONMENT):
        return f"environment {_show(env)} is not an object with the fields {', '.join(ENVIRONMENT)}"
    for field, v in env.items():
        if v is not None and not isinstance(v, str):
            return f"environment.{field} {_show(v)} is not a string"
    if not isinstance(env["target"], str) or not _TARGET.fullmatch(env["target"]):
        return (
            f"environment.target {_show(env['target'])} is not a target name (letters, digits, '_' and '-', at most 64)"
        )
    return None


@dataclass(frozen=True)
class CacheKey:
    """What one cache file is for: a cascade (by structural hash), an environment and a dtype.

    ``target`` (not part of the identity) is what entries are held to (``schedule_problem``); a key read
    from a bundle has none, and its environment's target is looked up by name.
    """

    cascade: str
    name: str  # the variant's name, for people reading file names (not part of the identity)
    env: tuple[tuple[str, str | None], ...]
    dtype: str
    target: Target | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        why = key_problem(self.cascade, self.name, self.dtype, dict(self.env))
        if why is not None:
            raise CacheError(f"not a cache key: {why}; keys come from CacheKey.of (a cascade, a target, a dtype)")

    @classmethod
    def of(cls, cascade: Cascade, target: Target, dtype: torch.dtype | str) -> CacheKey:
        name = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
        return cls(cascade.key, cascade.name, tuple(environment(target).items()), str(name), target)

    @property
    def environment(self) -> dict[str, str | None]:
        return dict(self.env)

    def metadata(self) -> dict:
        return {"cascade": self.cascade, "name": self.name, "dtype": self.dtype, "environment": self.environment}

    @property
    def stem(self) -> str:
        ident = json.dumps([self.cascade, self.dtype, self.env], sort_keys=True)
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        # any name is a variant's (a bundle's are data); only these characters of it go into the file name
        name = _NOT_IN_FILE_NAMES.sub("_", self.name)[:64]
        return f"{name}-{self.cascade[:12]}-{self.dtype}-{self.environment['target']}-{digest}"


@dataclass(frozen=True)
class Bucket:
    """The shapes one cache entry serves: family, M and N and B·Hkv by power of two, exact group and head dims."""

    family: str
    m: int
    n: int
    bkv: int
    group: int
    dims: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, extents: dict[str, int], kv_heads: int) -> Bucket:
        dims = tuple(sorted((r, v) for r, v in extents.items() if r not in ("b", "h", "m", "n")))
        return cls(
            family_of(extents),
            next_power_of_two(extents["m"]),
            next_power_of_two(extents["n"]),
            next_power_of_two(extents["b"] * kv_heads),
            extents["h"] // kv_heads,
            dims,
        )

    @property
    def label(self) -> str:
        return " ".join(
            [self.family, f"m{self.m}", f"n{self.n}", f"bkv{self.bkv}", f"g{self.group}"]
            + [f"{r}{v}" for r, v in self.dims]
        )

    def compatible(self, other: Bucket) -> bool:
        """Whether a schedule tuned for ``other`` can run here: same family, group and head dims."""
        return (self.family, self.group, self.dims) == (other.family, other.group, other.dims)

    def distance(self, other: Bucket) -> float:
        """How far apart two compatible buckets are, in factors of two of M, N and B·Hkv."""
        return sum(abs(math.log2(a / b)) for a, b in ((self.m, other.m), (self.n, other.n), (self.bkv, other.bkv)))

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "m": self.m,
            "n": self.n,
            "bkv": self.bkv,
            "group": self.group,
            "dims": dict(self.dims),
        }

    @classmethod
    def from_json(cls, d) -> Bucket:
        """A Bucket from its JSON form; raises ValueError naming the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a bucket is an object, got {_show(d)}")
        for field in ("m", "n", "bkv", "group"):
            if not _count(d.get(field)):
                raise ValueError(f"bucket.{field} {_show(d.get(field))} is not a positive integer")
            if field != "group" and d[field] & (d[field] - 1):
                raise ValueError(f"bucket.{field} {d[field]} is not a power of two")
        if d.get("family") != family_of(d):
            raise ValueError(
                f"bucket.family {_show(d.get('family'))} is not the family that runs m{d['m']} ({family_of(d)})"
            )
        dims = d.get("dims")
        if not isinstance(dims, dict) or not all(_count(v) for v in dims.values()) or {"b", "h", "m", "n"} & set(dims):
            raise ValueError(f"bucket.dims {_show(dims)} is not an object of positive integer head dims")
        return cls(d["family"], d["m"], d["n"], d["bkv"], d["group"], tuple(sorted(dims.items())))


def schedule_to_json(s: Schedule) -> dict:
    return dataclasses.asdict(s)


def _count(x) -> bool:
    """A positive integer (JSON's true is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _positive(x) -> bool:
    """A finite positive number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def schedule_from_json(d: dict) -> Schedule:
    """A Schedule from its JSON form; raises ValueError naming the field that is wrong."""
    known = {f.name: f for f in dataclasses.fields(Schedule)}
    required = {f.name for f in dataclasses.fields(Schedule) if f.default is dataclasses.MISSING}
    if not isinstance(d, dict) or set(d) - set(known) or required - set(d):
        raise ValueError(f"a schedule is an object with fields {sorted(known)}, got {_show(d)}")
    for name, v in d.items():
        if known[name].type in ("bool", bool):
            if not isinstance(v, bool):
                raise ValueError(f"schedule field {name} must be true or false, got {_show(v)}")
        elif name == "max_registers":  # 0: no cap
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"schedule field {name} must be a non-negative integer, got {_show(v)}")
        elif not _count(v):
            raise ValueError(f"schedule field {name} must be a positive integer, got {_show(v)}")
    return Schedule(**d)


def _check_rows(label: str, part: str, rows, timed: bool) -> None:
    if not isinstance(rows, list):
        raise ValueError(f"entry {label!r}: {part} is not a list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"entry {label!r}: {part}[{i}] is not an object")
        if not isinstance(r.get("trial"), int) or isinstance(r.get("trial"), bool):
            raise ValueError(f"entry {label!r}: {part}[{i}].trial {_show(r.get('trial'))} is not an integer")
        schedule_from_json(r.get("schedule"))
        if timed and not _positive(r.get("ms")):
            raise ValueError(f"entry {label!r}: {part}[{i}].ms {_show(r.get('ms'))} is not a positive number")


def _check_entry(label: str, e) -> None:
    """Raise ValueError naming what is wrong with an entry: every field a reader uses (lookups, ``merge``,
    ``einflash cache show``) has its type."""
    if not isinstance(e, dict):
        raise ValueError(f"entry {label!r} is not an object")
    bucket = Bucket.from_json(e.get("bucket"))
    if bucket.label != label:
        raise ValueError(f"entry {label!r} holds bucket {bucket.label!r}")
    for field in ("best", "default"):
        row = e.get(field)
        if row is None:
            continue
        if not isinstance(row, dict):
            raise ValueError(f"entry {label!r}: {field} {_show(row)} is not an object")
        if field == "best" or "schedule" in row:
            schedule_from_json(row.get("schedule"))
        if not (_positive(row.get("ms")) or (field == "default" and row.get("ms") is None)):
            raise ValueError(f"entry {label!r}: {field}.ms {_show(row.get('ms'))} is not a positive number of ms")
    _check_rows(label, "measured", e.get("measured"), timed=True)
    _check_rows(label, "failed", e.get("failed"), timed=False)
    if not isinstance(e.get("study"), (str, type(None))):
        raise ValueError(f"entry {label!r}: study {_show(e['study'])} is not a string")
    workers = e.get("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
        raise ValueError(f"entry {label!r}: workers {_show(workers)} is not a list of strings")


def _power_of_two(v: int) -> bool:
    return v & (v - 1) == 0


def schedule_problem(s: Schedule, target: Target, bucket: Bucket) -> str | None:
    """What makes ``s`` (read from a file) unfit to run the shapes of ``bucket`` on ``target``, or None.

    A schedule is held to what a tuner there could have chosen (``einflash.compiler.tuning.space``): each knob
    within the values of the target's search space for the bucket's family and of the heuristic defaults for
    the bucket's largest shapes (a decode default packs a GQA group's rows); tiles and warps powers of two
    (Triton's ``arange`` and layouts), tiles at least 16 (``tl.dot``); no more splits than the key tiles.
    """
    tuning = target.decode if bucket.family == "decode" else target.forward
    space = tuning.space
    extents = {**dict(bucket.dims), "b": 1, "h": bucket.group, "m": bucket.m, "n": bucket.n}
    try:
        defaults = [default_schedule(extents, target, 1, masked) for masked in (False, True)]
    except LoweringError as e:
        return f"no schedule runs these shapes on {target.name}: {e}"

    def most(name: str) -> int:
        return max(*getattr(space, name), *(getattr(d, name) for d in defaults))

    decode = bucket.family == "decode"
    ranges = {
        "block_m": (16, most("block_m")),
        "block_n": (16, most("block_n")),
        "num_warps": (1, most("num_warps")),
        "num_stages": (1, most("num_stages")),
        "splits": (1, -(-bucket.n // s.block_n) if decode else most("splits")),
    }
    for name, (low, high) in ranges.items():
        v = getattr(s, name)
        if name in ("block_m", "block_n", "num_warps") and not _power_of_two(v):
            return f"{name} {v} is not a power of two"
        if not low <= v <= high:
            return f"{name} {v} is outside {low}..{high} (the {target.name} {bucket.family} search space and defaults)"
    registers = sorted({*space.max_registers, *(d.max_registers for d in defaults)})
    if s.max_registers not in registers:
        return f"max_registers {s.max_registers} is not one of {', '.join(map(str, registers))}"
    if s.pack != defaults[0].pack:
        return (
            f"pack {str(s.pack).lower()}, while {bucket.family} at group {bucket.group} packs "
            f"{str(defaults[0].pack).lower()}"
        )
    if s.reverse_m and decode:
        return "reverse_m true, which only the forward family has"
    return None


def entry_problem(e: dict, target: Target) -> str | None:
    """What makes a well-formed entry (``problem`` found none) unfit to run on ``target``, or None: its winner
    and every measured schedule (``merge`` may make one the winner) must be ``schedule_problem``-free."""
    bucket = Bucket.from_json(e["bucket"])
    rows = [("best schedule", e["best"])] if e["best"] is not None else []
    rows += [(f"measured[{i}] schedule", r) for i, r in enumerate(e["measured"])]
    for where, row in rows:
        why = schedule_problem(schedule_from_json(row["schedule"]), target, bucket)
        if why is not None:
            return f"{where}: {why}"
    return None


def unusable(target: Target | str, entries: dict[str, dict]) -> dict[str, str]:
    """Why each of the well-formed ``entries`` cannot run on ``target`` (a Target, or the name of one, which
    einflash may not know): the entries no call would use."""
    if isinstance(target, str):
        try:
            target = get_target(target)
        except BackendError:
            return dict.fromkeys(entries, f"written for target {target!r}, which this einflash does not know")
    return {label: why for label, e in entries.items() if (why := entry_problem(e, target)) is not None}


def problem(data, key: CacheKey | None = None) -> str | None:
    """What is wrong with a cache file's content (for ``key``, when given), or None."""
    try:
        if not isinstance(data, dict) or data.get("kind") != KIND:
            return f"not an einflash autotune file (kind {_show(data.get('kind') if isinstance(data, dict) else None)})"
        if data.get("format") != FORMAT:
            return f"format version {_show(data.get('format'))}, this einflash reads version {FORMAT}"
        why = key_problem(data.get("cascade"), data.get("name"), data.get("dtype"), data.get("environment"))
        if why is not None:
            return why
        if key is not None:
            want = key.metadata()
            for field in ("cascade", "dtype", "environment"):
                if data.get(field) != want[field]:
                    return f"written for {field} {_show(data.get(field))}, expected {want[field]!r}"
        if not isinstance(data.get("entries"), dict):
            return "entries is not an object"
        for label, e in data["entries"].items():
            _check_entry(label, e)
    except ValueError as e:
        return f"malformed: {e}"
    return None


_REPORTED: set[tuple[pathlib.Path, str]] = set()


FILE_SKIPPED = "skipped (see `einflash cache list`; `einflash cache clear` removes it)"
ENTRY_SKIPPED = (
    "the entry is skipped: calls use the nearest other entry or the heuristic default (`einflash tune` at "
    "that shape replaces it)"
)


def _report(where: pathlib.Path | str, what: str, then: str = FILE_SKIPPED) -> None:
    """Warn about a cache file (once per process: readers read it again and again), or a bundle's (each time)."""
    if isinstance(where, pathlib.Path):
        if (where, what) in _REPORTED:
            return
        _REPORTED.add((where, what))
        where = f"cache {where}"
    warnings.warn(f"einflash autotune {where}: {what}; {then}", CacheWarning, stacklevel=3)


def usable(
    where: pathlib.Path | str, key: CacheKey, entries: dict[str, dict], then: str = ENTRY_SKIPPED
) -> dict[str, dict]:
    """The well-formed ``entries`` of ``key``'s file (``where``, in warnings) that can run on its target; each
    other one is reported (``then`` says what becomes of it) and left out."""
    skipped = unusable(key.target or key.environment["target"], entries)
    for label, why in skipped.items():
        _report(where, f"entry {label!r}: {why}", then)
    return {label: e for label, e in entries.items() if label not in skipped}


def _too_deep(value) -> bool:
    """Whether ``value`` nests containers more than MAX_DEPTH deep (looked at without recursion)."""
    todo = [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth == MAX_DEPTH:
                return True
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def read_json(path: pathlib.Path, limit: int | None = None) -> tuple[object, str | None]:
    """The JSON value in the file at ``path`` and what is wrong with it; (None, None) when there is no file.

    Only a regular file is read (a FIFO would block its reader until some writer came), at most ``limit`` bytes
    of it (default MAX_FILE_BYTES), nested at most MAX_DEPTH deep; anything else is what is wrong with it.
    """
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        # O_NONBLOCK: opening a FIFO waits for a writer otherwise; fstat then tells what was opened
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be opened: {e.strerror or e}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            return None, f"is {kind}, not a file"
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    finally:
        os.close(fd)
    if len(raw) > limit:
        return None, f"holds more than the {limit:,} bytes einflash reads of such a file"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text: {e}"
    except RecursionError:
        return None, f"nested more than {MAX_DEPTH} deep"
    except ValueError as e:  # not JSON, or an integer of more digits than Python converts
        return None, f"not valid JSON: {e}"
    if _too_deep(data):
        return None, f"nested more than {MAX_DEPTH} deep"
    return data, None


def best_of(measured: list[dict]) -> dict | None:
    """The fastest of measured rows (earliest trial on a tie), as an entry's ``best``."""
    if not measured:
        return None
    m = min(measured, key=lambda r: (r["ms"], r.get("trial", 0)))
    return {"schedule": m["schedule"], "ms": m["ms"], "trial": m.get("trial")}


def merge(old: dict | None, new: dict) -> dict:
    """``new`` entry over ``old``: trials of one study are united (workers write their views as they
    finish, not necessarily in order); an entry from another study replaces the old one."""
    if old is None or old.get("study") is None or old.get("study") != new.get("study"):
        return new
    out = dict(new)
    for part in ("measured", "failed"):
        rows = {r["trial"]: r for r in old.get(part, []) + new.get(part, [])}
        out[part] = [rows[t] for t in sorted(rows)]
    out["best"] = best_of(out["measured"])
    out["workers"] = sorted(set(old.get("workers", [])) | set(new.get("workers", [])))
    return out


@dataclass(frozen=True)
class CacheFile:
    """One file of the cache as ``einflash cache list`` shows it."""

    path: pathlib.Path
    problem: str | None
    data: dict | None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # entries no call would use, and why

    def to_json(self) -> dict:
        d = self.data if self.problem is None else {}
        return {
            "path": str(self.path),
            "ok": self.problem is None,
            "problem": self.problem,
            "name": d.get("name"),
            "cascade": d.get("cascade"),
            "dtype": d.get("dtype"),
            "environment": d.get("environment"),
            "entries": sorted(d.get("entries", {})),
            "skipped": self.skipped,
        }


class TuneCache:
    """The autotune cache in folder ``root`` (default: ``autotune`` in ``knobs.cache_dir()``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = pathlib.Path(root) if root is not None else knobs.cache_dir() / "autotune"
        self._parsed: dict[pathlib.Path, tuple[tuple[int, int], dict]] = {}

    def path(self, key: CacheKey) -> pathlib.Path:
        return self.root / f"{key.stem}.json"

    def entries(self, key: CacheKey) -> dict[str, dict]:
        """The entries of ``key``'s file by bucket label; empty (after a CacheWarning) when the file is bad."""
        path = self.path(key)
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return {}
        except OSError:  # a symlink loop, say: read_json says what is wrong
            stamp = None
        if stamp is not None and path in self._parsed and self._parsed[path][0] == stamp:
            return self._parsed[path][1]
        data, bad = read_json(path)
        bad = bad or (problem(data, key) if data is not None else None)
        entries = {} if bad or data is None else usable(path, key, data["entries"])
        if bad:
            _report(path, bad)
        self._parsed[path] = (stamp, entries)
        return entries

    def neighbours(self, key: CacheKey, bucket: Bucket) -> list[tuple[Bucket, dict]]:
        """Entries with a winner whose schedules can run in ``bucket``, nearest first (``bucket`` itself first)."""
        found = []
        for e in self.entries(key).values():
            b = Bucket.from_json(e["bucket"])
            if e["best"] is not None and b.compatible(bucket):
                found.append((b.distance(bucket), b.label, b, e))
        return [(b, e) for _, _, b, e in sorted(found, key=lambda x: x[:2])]

    def best(self, key: CacheKey, bucket: Bucket) -> tuple[Schedule, str] | None:
        """The winner for ``bucket``, else the nearest compatible bucket's, with the label it came from."""
        near = self.neighbours(key, bucket)
        if not near:
            return None
        b, e = near[0]
        return schedule_from_json(e["best"]["schedule"]), b.label

    def put(self, key: CacheKey, bucket: Bucket, entry: dict) -> pathlib.Path:
        """Store ``entry`` for ``bucket`` (merged with the one there, see ``merge``); returns the file."""
        return self._update(key, {bucket.label: {**entry, "bucket": bucket.to_json()}})

    def _update(self, key: CacheKey, entries: dict[str, dict]) -> pathlib.Path:
        path = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S):
            data, bad = read_json(path)
            bad = bad or (problem(data, key) if data is not None else None)
            if bad:
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                os.replace(path, aside)
                _report(path, f"{bad} (moved to {aside.name})")
                data = None
            merged = usable(path, key, data["entries"], "dropped from the file") if data else {}
            for label, e in entries.items():
                merged[label] = merge(merged.get(label), e)
            out = {
                "kind": KIND,
                "format": FORMAT,
                **key.metadata(),
                "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "entries": dict(sorted(merged.items())),
            }
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(out, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._parsed.pop(path, None)
        _WRITES[0] += 1
        return path

    def files(self) -> list[CacheFile]:
        """Every cache file here, each with what is wrong with it (None when it reads well)."""
        out = []
        for path in sorted(self.root.glob("*.json")):
            data, bad = read_json(path)
            bad = bad or (problem(data) if data is not None else "vanished while listing")
            if bad:
                out.append(CacheFile(path, bad, None))
            else:
                out.append(CacheFile(path, None, data, unusable(data["environment"]["target"], data["entries"])))
        return out

    def export(self) -> dict:
        """Every readable file, as one bundle (``einflash cache export``); unreadable ones are left out."""
        return {"kind": BUNDLE, "format": FORMAT, "files": [f.data for f in self.files() if f.problem is None]}

    def import_bundle(self, bundle: dict) -> int:
        """Merge a bundle's files into this cache; returns the number of entries taken. Raises CacheError when
        the bundle or a file in it is malformed (nothing is written then)."""
        if not isinstance(bundle, dict) or bundle.get("kind") != BUNDLE or bundle.get("format") != FORMAT:
            raise CacheError(
                f"not an einflash autotune bundle of format {FORMAT} (kind {bundle.get('kind')!r}, "
                f"format {bundle.get('format')!r})"
                if isinstance(bundle, dict)
                else "an einflash autotune bundle is a JSON object"
            )
        if not isinstance(bundle.get("files"), list):
            raise CacheError(f"the bundle's files are a list, got {_show(bundle.get('files'))}")
        keyed = []
        for i, data in enumerate(bundle["files"]):
            bad = problem(data)
            if bad:
                raise CacheError(f"file {i} of the bundle: {bad}")
            key = CacheKey(data["cascade"], data["name"], tuple(data["environment"].items()), data["dtype"])
            keyed.append((key, usable(f"bundle's file {i} ({data['name']})", key, data["entries"])))
        for key, entries in keyed:
            if entries:
                self._update(key, entries)
        return sum(len(e) for _, e in keyed)

    def clear(self) -> int:
        """Remove every cache file (with its lock and files moved aside) and the tuners' local studies;
        returns how many cache files went."""
        n = 0
        for path in [*self.root.glob("*.json*"), *self.root.glob("studies/*")]:
            if path.is_dir() and not path.is_symlink():  # a folder named like a cache file is no cache file
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            n += path.suffix == ".json"
        self._parsed.clear()
        _WRITES[0] += 1
        return n


_WRITES = [0]


def writes() -> int:
    """How many times this process has changed a cache (written, imported or cleared one): choices remembered
    from a cache's contents are stale once it moves (einflash.compiler.tuning.selection)."""
    return _WRITES[0]


def best_schedule(
    cascade: Cascade,
    target: Target,
    dtype: torch.dtype | str,
    shape: Shape,
    dims: dict[str, int] | None = None,
    cache: TuneCache | None = None,
) -> Schedule | None:
    """The cached winner for ``cascade`` at ``shape`` on ``target``, or from the nearest cached shape; None
    when nothing compatible was tuned. ``dims`` gives extents of ranks a declaration adds (as in explain).

    >>> import tempfile, einflash as ef
    >>> from einflash.backends import get_target
    >>> @ef.attention
    ... def plain(q, k, v):
    ...     return ef.softmax(q @ k * ef.scale, "n") @ v
    >>> best_schedule(plain.cascade, get_target("sm90"), "bfloat16", ef.Shape(2, 16, 4096, 4096, 128),
    ...               cache=TuneCache(tempfile.mkdtemp())) is None
    True
    """
    extents = {r: v for r, v in shape.extents([r.name for r in cascade.ranks], dims).items() if cascade.has_rank(r)}
    hit = (cache or TuneCache()).best(CacheKey.of(cascade, target, dtype), Bucket.of(extents, shape.Hkv))
    return None if hit is None else hit[0]

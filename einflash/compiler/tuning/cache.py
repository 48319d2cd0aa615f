"""The autotune cache (docs/design.md §8): measured schedules as JSON, one file per variant, environment and dtype.

A file is named by its key, and holds an entry per shape bucket (``cache_keys``). Each entry keeps every
configuration measured (its time, its error against the reference) and every failure (with its reason), the
winner and the heuristic default's own time.

Writes are atomic (a temporary file, then ``os.replace``) under a file lock, so concurrent tuners and
readers never see half a file. A file that cannot be read (``cache_format.read_cache_file`` says why) is
reported once as a CacheWarning naming the file and what is wrong, and skipped; the next write moves it aside
to ``*.corrupt-<time>``, and ``TuneCache.clear`` removes it whatever it is. An entry no call could use
(``cache_format.unusable``) is skipped alone, with a CacheWarning, on read and on import; the next write
drops it.

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
import json
import os
import pathlib
import shutil
import time
import warnings
from dataclasses import dataclass

import filelock
import torch

from ... import knobs
from ...backends.target import Target
from ...errors import CacheError, CacheWarning
from ...ir.cascade import Cascade
from ...shape import Shape
from ..schedule import Schedule
from .cache_format import BUNDLE, FORMAT, KIND, problem, read_cache_file, schedule_from_json, unusable
from .cache_keys import Bucket, CacheKey, quote

LOCK_TIMEOUT_S = 60
_REPORTED: set[tuple[pathlib.Path, str]] = set()  # (file, what is wrong): warned about already
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
    skipped = unusable(key.target or key.target_name, entries)
    for label, why in skipped.items():
        _report(where, f"entry {label!r}: {why}", then)
    return {label: e for label, e in entries.items() if label not in skipped}


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
        d = self.data or {}  # a file with a problem has no data
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
        # each file's entries as last read, with the modification time and size they were read at
        self._parsed: dict[pathlib.Path, tuple[tuple[int, int] | None, dict[str, dict]]] = {}

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
        data, bad = read_cache_file(path, key)
        entries = {} if data is None else usable(path, key, data["entries"])
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
            data, bad = read_cache_file(path, key)
            if bad:
                aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
                os.replace(path, aside)
                _report(path, f"{bad} (moved to {aside.name})")
            merged = usable(path, key, data["entries"], "dropped from the file") if data is not None else {}
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
            data, bad = read_cache_file(path)
            if data is None:
                out.append(CacheFile(path, bad or "vanished while listing", None))
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
            raise CacheError(f"the bundle's files are a list, got {quote(bundle.get('files'))}")
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

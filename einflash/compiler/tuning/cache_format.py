"""What an autotune cache file must hold, and reading one safely.

A file that cannot be read (not a regular file, larger than MAX_FILE_BYTES, not UTF-8 JSON, nested more
than MAX_DEPTH deep, wrong format version, a schema violation, or metadata that do not match its key) is
what ``read_cache_file`` reports, with what is wrong. Every field a file gives is checked before it is used:
those that name the file (``key_problem``) and the type of each one a reader takes. An entry whose
schedules no tuner could have chosen for its target (``schedule_problem``: ``block_m: 3`` from a hand edit
or a forged bundle would crash every call) is ``unusable``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat

from ...backends import get_target
from ...backends.target import Target
from ...errors import BackendError, LoweringError
from ..schedule import Schedule, default_schedule
from .cache_keys import Bucket, CacheKey, is_count, key_problem, quote

FORMAT = 1
KIND = "einflash-autotune"
BUNDLE = "einflash-autotune-bundle"
# what a reader parses, at most: a cache file holds an entry per shape bucket of a few KiB each (its trials), and
# nests 5 deep (entries, entry, measured, row, schedule); a bundle holds every file of a cache, 2 deeper
MAX_FILE_BYTES = 64 << 20
MAX_BUNDLE_BYTES = 1 << 30
MAX_DEPTH = 32


def schedule_to_json(s: Schedule) -> dict:
    return dataclasses.asdict(s)


def _positive(x) -> bool:
    """A finite positive number."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def schedule_from_json(d: object) -> Schedule:
    """A Schedule from its JSON form; raises ValueError naming the field that is wrong."""
    known = {f.name: f for f in dataclasses.fields(Schedule)}
    required = {f.name for f in dataclasses.fields(Schedule) if f.default is dataclasses.MISSING}
    if not isinstance(d, dict) or set(d) - set(known) or required - set(d):
        raise ValueError(f"a schedule is an object with fields {sorted(known)}, got {quote(d)}")
    for name, v in d.items():
        if known[name].type in ("bool", bool):
            if not isinstance(v, bool):
                raise ValueError(f"schedule field {name} must be true or false, got {quote(v)}")
        elif name == "max_registers":  # 0: no cap
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"schedule field {name} must be a non-negative integer, got {quote(v)}")
        elif not is_count(v):
            raise ValueError(f"schedule field {name} must be a positive integer, got {quote(v)}")
    return Schedule(**d)


def _check_rows(label: str, part: str, rows, timed: bool) -> None:
    if not isinstance(rows, list):
        raise ValueError(f"entry {label!r}: {part} is not a list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"entry {label!r}: {part}[{i}] is not an object")
        if not isinstance(r.get("trial"), int) or isinstance(r.get("trial"), bool):
            raise ValueError(f"entry {label!r}: {part}[{i}].trial {quote(r.get('trial'))} is not an integer")
        schedule_from_json(r.get("schedule"))
        if timed and not _positive(r.get("ms")):
            raise ValueError(f"entry {label!r}: {part}[{i}].ms {quote(r.get('ms'))} is not a positive number")


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
            raise ValueError(f"entry {label!r}: {field} {quote(row)} is not an object")
        if field == "best" or "schedule" in row:
            schedule_from_json(row.get("schedule"))
        if not (_positive(row.get("ms")) or (field == "default" and row.get("ms") is None)):
            raise ValueError(f"entry {label!r}: {field}.ms {quote(row.get('ms'))} is not a positive number of ms")
    _check_rows(label, "measured", e.get("measured"), timed=True)
    _check_rows(label, "failed", e.get("failed"), timed=False)
    if not isinstance(e.get("study"), (str, type(None))):
        raise ValueError(f"entry {label!r}: study {quote(e['study'])} is not a string")
    workers = e.get("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
        raise ValueError(f"entry {label!r}: workers {quote(workers)} is not a list of strings")


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
        defaults = [
            default_schedule(extents, target, 1, masked, gathered=gathered)
            for masked in (False, True)
            for gathered in (False, True)
        ]
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
            return f"not an einflash autotune file (kind {quote(data.get('kind') if isinstance(data, dict) else None)})"
        if data.get("format") != FORMAT:
            return f"format version {quote(data.get('format'))}, this einflash reads version {FORMAT}"
        why = key_problem(data.get("cascade"), data.get("name"), data.get("dtype"), data.get("environment"))
        if why is not None:
            return why
        if key is not None:
            want = key.metadata()
            for field in ("cascade", "dtype", "environment"):
                if data.get(field) != want[field]:
                    return f"written for {field} {quote(data.get(field))}, expected {want[field]!r}"
        if not isinstance(data.get("entries"), dict):
            return "entries is not an object"
        for label, e in data["entries"].items():
            _check_entry(label, e)
    except ValueError as e:
        return f"malformed: {e}"
    return None


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


def read_cache_file(path: pathlib.Path, key: CacheKey | None = None) -> tuple[dict | None, str | None]:
    """The content of the cache file at ``path`` (written for ``key``, when given) and what is wrong with it:
    (content, None) for a file that reads well, (None, why) for one that does not, (None, None) when there is
    no file."""
    data, bad = read_json(path)
    if bad is None and data is not None:
        bad = problem(data, key)
    if bad is not None or not isinstance(data, dict):  # problem() found any content that is not an object
        return None, bad
    return data, None

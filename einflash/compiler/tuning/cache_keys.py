"""What an autotune cache file and an entry in it are for: the file's key and the entry's shape bucket.

A file is named by its key: the cascade's structural hash, the target (name, GPU as the driver names
it, compute capability), the Triton, torch and einflash versions, and the dtype. Inside, entries are
keyed by shape bucket: the template family, M and N rounded up to powers of two, B·Hkv rounded up to
a power of two, the GQA group and the exact head dims. Both are read back from files, so each field is
checked before it is used (``key_problem``, ``Bucket.from_json``).

>>> Bucket.of(dict(b=2, h=16, m=4096, n=4096, e=128, f=128), 16).label
'forward m4096 n4096 bkv32 g1 e128 f128'
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass

import torch
import triton

from ...backends.target import Target
from ...errors import CacheError
from ...ir.cascade import Cascade
from ..runtime.forward import DTYPE_NAMES
from ..schedule import next_power_of_two
from .space import family_of

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


def quote(value) -> str:
    """A value from a file, as a message quotes it: a file may hold megabytes where a name should be."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def is_count(x) -> bool:
    """A positive integer (JSON's true is not one)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def key_problem(cascade, name, dtype, env) -> str | None:
    """What makes these fields (read from a file, perhaps) unfit to key a cache file, or None. The cascade's
    hash, the dtype and the target name the file (``CacheKey.stem``), so each must be what einflash writes."""
    if not isinstance(cascade, str) or not _HASH.fullmatch(cascade):
        return f"cascade {quote(cascade)} is not a structural hash (8 to 64 lowercase hexadecimal digits)"
    if not isinstance(name, str):
        return f"name {quote(name)} is not a string"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return f"dtype {quote(dtype)} is not one of {', '.join(DTYPES)}"
    if not isinstance(env, dict) or set(env) != set(ENVIRONMENT):
        return f"environment {quote(env)} is not an object with the fields {', '.join(ENVIRONMENT)}"
    for field, v in env.items():
        if v is not None and not isinstance(v, str):
            return f"environment.{field} {quote(v)} is not a string"
    if not isinstance(env["target"], str) or not _TARGET.fullmatch(env["target"]):
        return (
            f"environment.target {quote(env['target'])} is not a target name (letters, digits, '_' and '-', at most 64)"
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
    def target_name(self) -> str:
        """The name of the target the file is for."""
        name = self.environment["target"]
        assert name is not None  # key_problem, which __post_init__ runs, holds it to a target name
        return name

    @property
    def stem(self) -> str:
        ident = json.dumps([self.cascade, self.dtype, self.env], sort_keys=True)
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        # any name is a variant's (a bundle's are data); only these characters of it go into the file name
        name = _NOT_IN_FILE_NAMES.sub("_", self.name)[:64]
        return f"{name}-{self.cascade[:12]}-{self.dtype}-{self.target_name}-{digest}"


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
            raise ValueError(f"a bucket is an object, got {quote(d)}")
        for field in ("m", "n", "bkv", "group"):
            if not is_count(d.get(field)):
                raise ValueError(f"bucket.{field} {quote(d.get(field))} is not a positive integer")
            if field != "group" and d[field] & (d[field] - 1):
                raise ValueError(f"bucket.{field} {d[field]} is not a power of two")
        if d.get("family") != family_of(d):
            raise ValueError(
                f"bucket.family {quote(d.get('family'))} is not the family that runs m{d['m']} ({family_of(d)})"
            )
        dims = d.get("dims")
        if (
            not isinstance(dims, dict)
            or not all(is_count(v) for v in dims.values())
            or {"b", "h", "m", "n"} & set(dims)
        ):
            raise ValueError(f"bucket.dims {quote(dims)} is not an object of positive integer head dims")
        return cls(d["family"], d["m"], d["n"], d["bkv"], d["group"], tuple(sorted(dims.items())))

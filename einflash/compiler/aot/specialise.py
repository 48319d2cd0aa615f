"""What a compiled kernel assumes of its arguments: Triton's JIT specialisation, as storable values.

Triton's JIT compiles one binary per *specialisation* of the launch arguments: an integer
equal to 1 (or None) becomes a compile-time constant, and pointers 16-byte aligned and
integers that are multiples of 16 are marked divisible by 16, which lets loads vectorise and
pipeline. A binary is correct only for calls whose arguments satisfy what it assumed. This
module computes the specialisation of a launch exactly as the JIT does (the rule is checked
against Triton's own in tests/aot), weakens it to what holds for any sequence length, and
tells why a call does not fit a stored binary.

>>> import torch
>>> [str(of_value(n, x)) for n, x in [("q_ptr", torch.empty(4, 8)), ("stride_q_1", 1), ("M", 48), ("p_scale", .1)]]
['q_ptr: *fp32 (divisible by 16)', 'stride_q_1 = 1', 'M: i32 (divisible by 16)', 'p_scale: fp32']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...errors import LoweringError

DIVISOR = 16  # what Triton's "divisible" attribute promises: bytes for a pointer, units for an integer
TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_INT_TYPES = ("i32", "i64", "u64")
_STRIDE = re.compile(r"stride_(wsp?_)?(\w+?)_(\d+)")  # stride_<tensor>_<dim>; ws: a workspace


@dataclass(frozen=True)
class ArgSpec:
    """What a binary assumes of one kernel argument.

    ``type`` is Triton's (``*fp16``, ``i32``, ``fp32``...) or ``constexpr``, whose ``value`` the
    binary has built in; ``divisible``: the pointer is 16-byte aligned, the integer a multiple of 16.
    """

    name: str
    type: str
    value: object = None
    divisible: bool = False

    def __str__(self) -> str:
        if self.type == "constexpr":
            return f"{self.name} = {self.value!r}"
        return f"{self.name}: {self.type}" + (" (divisible by 16)" if self.divisible else "")

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "type": self.type}
        if self.type == "constexpr":
            out["value"] = self.value
        elif self.divisible:
            out["divisible"] = True
        return out

    @classmethod
    def from_json(cls, d: dict) -> ArgSpec:
        return cls(d["name"], d["type"], d.get("value"), bool(d.get("divisible", False)))


def _int_type(x: int) -> str:
    if -(2**31) <= x < 2**31:
        return "i32"
    return "i64" if x < 2**63 else "u64"


def of_value(name: str, x) -> ArgSpec:
    """The specialisation Triton's JIT gives a runtime argument of value ``x``."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in TRITON_TYPES:
            raise LoweringError(f"{name}: no Triton pointer type for {x.dtype}")
        return ArgSpec(name, "*" + TRITON_TYPES[x.dtype], divisible=x.data_ptr() % DIVISOR == 0)
    if x is None:
        return ArgSpec(name, "constexpr", None)
    if isinstance(x, bool):
        return ArgSpec(name, "u1")
    if isinstance(x, int):
        if x == 1:
            return ArgSpec(name, "constexpr", 1)
        return ArgSpec(name, _int_type(x), divisible=x % DIVISOR == 0)
    if isinstance(x, float):
        return ArgSpec(name, "fp32")
    raise LoweringError(
        f"{name}: a kernel argument must be a tensor, an int, a float, a bool or None, got {type(x).__name__}"
    )


def specialise(args: dict[str, object], constexpr_args) -> tuple[ArgSpec, ...]:
    """The specialisation of a launch: ``args`` by name in kernel order; ``constexpr_args`` the kernel's
    ``tl.constexpr`` parameters (constants whatever their value)."""
    return tuple(ArgSpec(n, "constexpr", v) if n in constexpr_args else of_value(n, v) for n, v in args.items())


def common(*specs: tuple[ArgSpec, ...]) -> tuple[ArgSpec, ...]:
    """The strongest specialisation that every one of ``specs`` satisfies (argument by argument).

    An integer that is 1 in one and not in another becomes a runtime integer; divisibility stays
    only where all agree. Pointer types and compile-time parameters must agree.

    >>> a = (ArgSpec("M", "constexpr", 1), ArgSpec("N", "i32", divisible=True))
    >>> b = (ArgSpec("M", "i32", divisible=True), ArgSpec("N", "i32"))
    >>> [str(s) for s in common(a, b)]
    ['M: i32', 'N: i32']
    """
    out = []
    for column in zip(*specs):
        first = column[0]
        if all(s == first for s in column):
            out.append(first)
            continue
        ints = [
            s.type if s.type != "constexpr" else _int_type(s.value)
            for s in column
            if s.type in _INT_TYPES or (s.type == "constexpr" and type(s.value) is int)
        ]
        pointers = {s.type for s in column if s.type.startswith("*")}
        if len(ints) == len(column):
            widest = max(ints, key=_INT_TYPES.index)
            divisible = all(s.divisible if s.type != "constexpr" else s.value % DIVISOR == 0 for s in column)
            out.append(ArgSpec(first.name, widest, divisible=divisible))
        elif len(pointers) == 1 and all(s.type.startswith("*") for s in column):
            out.append(ArgSpec(first.name, first.type, divisible=all(s.divisible for s in column)))
        else:
            raise LoweringError(
                f"argument {first.name} is {' / '.join(map(str, column))} across the shapes; "
                f"one binary cannot serve them all"
            )
    return tuple(out)


def misfit(spec: ArgSpec, x, last: bool = False) -> str | None:
    """None when a binary that assumed ``spec`` is correct for the value ``x``; else why it is not.
    ``last``: the argument is the stride of a tensor's last dimension.

    >>> misfit(ArgSpec("stride_k_3", "constexpr", 1), 2, last=True)
    "k's last dimension must be contiguous (stride 1); got stride 2: call .contiguous() on it"
    """
    what = describe(spec.name)
    stride = _STRIDE.fullmatch(spec.name)
    tensor = stride[2] if stride and not stride[1] else None  # a stride of a caller's tensor (not a workspace)
    if spec.type == "constexpr":
        if type(x) is type(spec.value) and x == spec.value:
            return None
        if last and tensor and spec.value == 1:
            return f"{tensor}'s last dimension must be contiguous (stride 1); got stride {x}: call .contiguous() on it"
        return f"{what} was compiled in as {spec.value!r}; got {x!r}"
    if spec.type.startswith("*"):
        if not isinstance(x, torch.Tensor):
            return f"{what} must be a tensor; got {type(x).__name__}"
        got = "*" + TRITON_TYPES.get(x.dtype, str(x.dtype))
        if got != spec.type:
            return f"{what} must be {spec.type[1:]} ({_torch_name(spec.type[1:])}); got {x.dtype}"
        if spec.divisible and x.data_ptr() % DIVISOR:
            return (
                f"{what} must start at a 16-byte aligned address; got one {x.data_ptr() % DIVISOR} bytes past "
                f"(a view with an offset?): call .contiguous() or .clone() on it"
            )
        return None
    if spec.type in _INT_TYPES:
        if isinstance(x, bool) or not isinstance(x, int):
            return f"{what} must be an integer; got {x!r}"
        if _INT_TYPES.index(_int_type(x)) > _INT_TYPES.index(spec.type):
            return f"{what} = {x} does not fit the compiled {spec.type}"
        if spec.divisible and x % DIVISOR:
            hint = f": call .contiguous() on {tensor}" if tensor else ""
            return f"{what} was compiled for multiples of 16; got {x}{hint}"
        return None
    if spec.type == "fp32":
        number = isinstance(x, (int, float)) and not isinstance(x, bool)
        return None if number else f"{what} must be a number; got {x!r}"
    return None if isinstance(x, bool) and spec.type == "u1" else f"{what}: cannot check a {spec.type} against {x!r}"


def first_misfit(specs: tuple[ArgSpec, ...], args: dict[str, object]) -> str | None:
    """The reason the first argument that does not fit gives, or None when the binary fits the call."""
    if [s.name for s in specs] != list(args):
        return f"the binary's arguments {[s.name for s in specs]} are not the launch's {list(args)}"
    last = {}
    for s in specs:
        if m := _STRIDE.fullmatch(s.name):
            last[(m[1] or "") + m[2]] = s.name
    return next((why for s in specs if (why := misfit(s, args[s.name], s.name in last.values())) is not None), None)


_NAMES = {
    "M": "the query length M",
    "N": "the key length N",
    "H": "the query head count H",
    "GROUP": "the GQA group size (query heads per kv head)",
    "TILES_PER_SPLIT": "the key tiles per split",
    "SPLITS": "the split count",
    "out_ptr": "the output",
    "visits_ptr": "the visit counter",
}


def describe(name: str) -> str:
    """A kernel argument's name as a user reads it.

    >>> describe("stride_q_2"), describe("p_scale"), describe("k_ptr")
    ("q's stride along dimension 2", 'parameter scale', 'k')
    """
    if name in _NAMES:
        return _NAMES[name]
    if m := _STRIDE.fullmatch(name):
        return f"{'workspace ' if m[1] else ''}{m[2]}'s stride along dimension {m[3]}"
    if m := re.fullmatch(r"(wsp?_)?(\w+)_ptr", name):
        return f"workspace {m[2]}" if m[1] else m[2]
    if name.startswith("p_"):
        return f"parameter {name[2:]}"
    return name


def _torch_name(triton_type: str) -> str:
    return next((str(d).removeprefix("torch.") for d, t in TRITON_TYPES.items() if t == triton_type), triton_type)

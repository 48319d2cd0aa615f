"""Hardware targets as data, and which one this machine is.

>>> get_target("sm90").smem_per_block
232448
>>> sorted(TARGETS)
['interpreter', 'sm80', 'sm90']
"""

from __future__ import annotations

import dataclasses

import torch

from .. import knobs
from ..errors import BackendError
from .catalog import DEVICE_RATES, INTERPRETER, SM80, SM90, TARGETS
from .target import GPU, Capabilities, SearchSpace, Target, TileConfig, Tuning

# Compute capability major version -> target. Other architectures have no tile tables yet.
_BY_MAJOR = {8: SM80, 9: SM90}


def get_target(name: str) -> Target:
    """The nominal target called ``name``.

    >>> get_target("interpreter").is_interpreter
    True
    """
    if name not in TARGETS:
        raise BackendError(f"unknown backend {name!r}; valid backends are {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def _local_gpu() -> Target:
    """The target of CUDA device 0, with its own name, SM count and shared memory, and its part's rates."""
    major, minor = torch.cuda.get_device_capability(0)
    if major not in _BY_MAJOR:
        raise BackendError(
            f"no einflash target for compute capability {major}.{minor}; targets exist for "
            f"{', '.join(f'{m}.x ({t.name})' for m, t in _BY_MAJOR.items())}. "
            f"Set EINFLASH_BACKEND=interpreter to run on the CPU instead"
        )
    nominal = _BY_MAJOR[major]
    props = torch.cuda.get_device_properties(0)
    rates = next((r for fragment, r in DEVICE_RATES.get(nominal.name, ()) if fragment in props.name), {})
    # The driver's figures beat the table's: parts of one architecture differ (e.g. 8.6 has 99 KiB per block).
    return dataclasses.replace(
        nominal,
        device=props.name,
        sm_count=props.multi_processor_count,
        smem_per_block=props.shared_memory_per_block_optin,
        **rates,
    )


def detect() -> Target:
    """The target of this machine: EINFLASH_BACKEND if set, else the CUDA device's, else the interpreter.

    A GPU target named by EINFLASH_BACKEND is this machine's own GPU when the architecture matches.

    >>> from unittest import mock
    >>> import os
    >>> with mock.patch.dict(os.environ, {"EINFLASH_BACKEND": "sm80"}):
    ...     detect().name
    'sm80'
    """
    name = knobs.backend()
    gpu = torch.cuda.is_available()
    if name is None:
        return _local_gpu() if gpu else INTERPRETER
    target = get_target(name)
    local = gpu and target.gpu is not None and torch.cuda.get_device_capability(0)[0] * 10 == target.gpu.arch
    return _local_gpu() if local else target


_FOR_DEVICE: dict[str, Target] = {}


def for_device(device_type: str) -> Target:
    """The target that runs kernels on tensors of ``device_type``: this machine's GPU (``detect``) for cuda, the
    interpreter otherwise. Detected once per device type.

    >>> for_device("cpu").is_interpreter
    True
    """
    if device_type not in _FOR_DEVICE:
        _FOR_DEVICE[device_type] = detect() if device_type == "cuda" else get_target("interpreter")
    return _FOR_DEVICE[device_type]


__all__ = [
    "Target",
    "GPU",
    "Capabilities",
    "TileConfig",
    "SearchSpace",
    "Tuning",
    "TARGETS",
    "INTERPRETER",
    "SM80",
    "SM90",
    "get_target",
    "detect",
    "for_device",
]

"""Every environment variable einflash reads, each behind one small typed accessor.

Flags are read when an accessor is called, never at import, so a test can change
``os.environ`` and see the effect at once.

>>> from unittest import mock
>>> with mock.patch.dict(os.environ, {"EINFLASH_DEBUG": "2"}):
...     debug_level() >= Debug.SOURCE
True
"""

from __future__ import annotations

import enum
import os
import pathlib
import sys

import platformdirs
import torch

from .errors import BackendError, FlagError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class Debug(enum.IntEnum):
    """What EINFLASH_DEBUG asks einflash to print; each level includes the ones below it."""

    OFF = 0
    ANALYSIS = 1  # passes, buffers, FLOPs and bytes, the chosen template and schedule
    SOURCE = 2  # the generated Triton kernel source
    IR = 3  # Triton's IR after each compiler pass


def _read(name: str) -> str:
    # An empty variable counts as unset: `FOO= cmd` is the usual way to switch one off for one command.
    return os.environ.get(name, "").strip()


def _flag(name: str) -> bool:
    text = _read(name).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise FlagError(
        f"{name} must be one of {', '.join(_TRUE + _FALSE[1:])} (or unset), got {text!r}; "
        f"fix or unset the environment variable"
    )


def backend() -> str | None:
    """EINFLASH_BACKEND: a target name (``interpreter``, ``sm80``, ``sm90``) that overrides detection.

    None when unset. The name is checked by ``einflash.backends.get_target``, which knows the valid ones.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_BACKEND": " SM90 "}):
    ...     backend()
    'sm90'
    """
    return _read("EINFLASH_BACKEND").lower() or None


def cache_dir() -> pathlib.Path:
    """EINFLASH_CACHE_DIR: where tuning results and compiled kernels are kept; else the per-user cache folder.

    The folder is not created here; whoever writes to it does.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_CACHE_DIR": "/srv/einflash"}):
    ...     str(cache_dir())
    '/srv/einflash'
    """
    text = _read("EINFLASH_CACHE_DIR")
    return pathlib.Path(text).expanduser() if text else pathlib.Path(platformdirs.user_cache_dir("einflash"))


def deploy() -> bool:
    """EINFLASH_DEPLOY: deployment mode. Never tune at run time; use cached configurations, else defaults.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_DEPLOY": "1"}):
    ...     deploy()
    True
    """
    return _flag("EINFLASH_DEPLOY")


def autotune() -> bool:
    """EINFLASH_AUTOTUNE: a call whose shape has no tuned entry tunes it there and then (never in deploy mode).

    Off by default: a call without an entry uses the nearest cached shape, else the heuristic default.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_AUTOTUNE": "yes"}):
    ...     autotune()
    True
    """
    return _flag("EINFLASH_AUTOTUNE")


def debug_level() -> Debug:
    """EINFLASH_DEBUG: 0 (default) to 3, see ``Debug``.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_DEBUG": "3"}):
    ...     debug_level()
    <Debug.IR: 3>
    """
    text = _read("EINFLASH_DEBUG") or "0"
    valid = [str(int(d)) for d in Debug]
    if text not in valid:
        raise FlagError(
            f"EINFLASH_DEBUG must be one of {', '.join(valid)} "
            f"({', '.join(f'{int(d)} = {d.name.lower()}' for d in Debug)}), got {text!r}"
        )
    return Debug(int(text))


def kernel_dir() -> pathlib.Path:
    """EINFLASH_KERNEL_DIR: where generated kernel sources are written; else ``kernels`` in the cache folder.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_CACHE_DIR": "/srv/einflash", "EINFLASH_KERNEL_DIR": ""}):
    ...     str(kernel_dir())
    '/srv/einflash/kernels'
    """
    text = _read("EINFLASH_KERNEL_DIR")
    return pathlib.Path(text).expanduser() if text else cache_dir() / "kernels"


def aot_test_dir() -> pathlib.Path | None:
    """EINFLASH_AOT_TEST_DIR: an ahead-of-time kernel directory built elsewhere, for the GPU tests to load.

    None when unset: the tests then build their own directory.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"EINFLASH_AOT_TEST_DIR": "/tmp/aot"}):
    ...     str(aot_test_dir())
    '/tmp/aot'
    """
    text = _read("EINFLASH_AOT_TEST_DIR")
    return pathlib.Path(text).expanduser() if text else None


def interpreting() -> bool:
    """TRITON_INTERPRET: whether kernels run on Triton's CPU interpreter in this process.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
    ...     interpreting()
    True
    """
    return _read("TRITON_INTERPRET").lower() in _TRUE


def use_interpreter() -> bool:
    """Turn on Triton's CPU interpreter (TRITON_INTERPRET=1) when kernels cannot run on a GPU here; say if it is on.

    It is on when EINFLASH_BACKEND is ``interpreter``, when TRITON_INTERPRET is already on, or when torch
    sees no CUDA device. Triton reads the flag when ``triton.language`` is imported (its own helpers such
    as ``tl.zeros`` become interpreter functions then) and at each ``@triton.jit``, so this must run before
    anything imports triton; turning it on later raises BackendError rather than leave kernels broken.

    >>> from unittest import mock
    >>> with mock.patch.object(torch.cuda, "is_available", lambda: True):  # a GPU machine, no flags
    ...     with mock.patch.dict(os.environ, {"EINFLASH_BACKEND": "", "TRITON_INTERPRET": ""}):
    ...         use_interpreter()
    False
    """
    already = interpreting()
    if not (already or backend() == "interpreter" or not torch.cuda.is_available()):
        return False
    if not already and "triton" in sys.modules:
        raise BackendError(
            "Triton was imported before its interpreter was turned on, so its language helpers "
            "cannot run on the CPU; call einflash.knobs.use_interpreter() before anything imports "
            "triton, or set TRITON_INTERPRET=1 in the environment before Python starts"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    return True

"""Every error einflash raises, in one place.

Each message says what was expected, what came, and what to do. Errors about a
declaration carry the file and line of the user's function when they are known.
"""

from __future__ import annotations

import re


class EinflashError(Exception):
    """Base class of all einflash errors."""


# -- declarations (the cascade itself) -------------------------------------------------


class CascadeError(EinflashError, ValueError):
    """A declared cascade is malformed. ``where`` names the offending line."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class UnknownRankError(CascadeError):
    """A rank name is used that no tensor of the cascade has."""


class RankMismatchError(CascadeError):
    """An operand's ranks disagree with what the expression says."""


class UnknownTensorError(CascadeError):
    """An Einsum reads a tensor that is not declared."""


class CycleError(CascadeError):
    """The Einsums depend on each other in a cycle."""


class UnsupportedOperatorError(CascadeError):
    """An operator, reducer or Python construct that the IR cannot express."""


class DeclarationError(CascadeError):
    """The decorated function's signature or body is not a valid declaration."""


# -- calls ---------------------------------------------------------------------------


class CallError(EinflashError, ValueError):
    """Arguments given to an attention op at call time are wrong."""


class ShapeError(CallError):
    """A tensor's shape does not fit the contract layout or the other tensors."""


class DTypeError(CallError, TypeError):
    """A tensor has a dtype the op does not accept."""


class DeviceError(CallError):
    """Tensors live on different devices, or on one the backend cannot use."""


class MissingInputError(CallError, TypeError):
    """An extra input or parameter the cascade declares was not given."""


class ParameterError(CallError):
    """A scalar parameter has a value the cascade does not allow (a non-positive scale)."""


class NormaliserError(CallError):
    """``return_lse=True`` on a cascade whose normaliser is not one softmax over n (sigmoid or linear
    attention, a softmax over another rank, several softmaxes); says what the cascade normalises with."""


# -- compilation -----------------------------------------------------------------------


class LoweringError(EinflashError, NotImplementedError):
    """A valid cascade that no template can lower yet; says why. ``where`` names the declaration's line
    when the error belongs to one statement."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class DifferentiationError(LoweringError):
    """A cascade whose gradient cannot be derived or run yet (a reduction the output depends on
    beyond a shift, a shifted read of a learnable input, ...); says why."""


class OutOfResourcesError(EinflashError, RuntimeError):
    """A configuration needs more on-chip memory than the target has."""

    def __init__(self, what: str, required: int, limit: int, hint: str = ""):
        self.required, self.limit = required, limit
        msg = f"{what}: needs {required:,} B, the target has {limit:,} B."
        super().__init__(msg + (f" {hint}" if hint else ""))

    @classmethod
    def of(cls, what: str, cause: Exception, hint: str = "") -> OutOfResourcesError:
        """The error of ``what`` that ``cause`` reports: another OutOfResourcesError, or Triton's OutOfResources
        (whose message gives the bytes: ``Required: 279040, Hardware limit: 232448``)."""
        if isinstance(cause, OutOfResourcesError):
            return cls(what, cause.required, cause.limit, hint)
        numbers = [int(x) for x in re.findall(r"(?:Required|limit): (\d+)", str(cause))] or [0, 0]
        return cls(what, numbers[0], numbers[-1], hint)


class BackendError(EinflashError, RuntimeError):
    """An unknown backend name, or a backend that cannot run on this machine."""


class FlagError(EinflashError, ValueError):
    """An EINFLASH_* environment variable holds a value einflash cannot read."""


# -- tuning and caches ----------------------------------------------------------------


class CacheError(EinflashError, RuntimeError):
    """A cache file is corrupt or was written for another environment."""


class TuningError(EinflashError, RuntimeError):
    """Tuning found no configuration that compiled, ran and matched the reference."""


# -- ahead-of-time kernels ------------------------------------------------------------


class AOTError(EinflashError, RuntimeError):
    """An ahead-of-time kernel directory is corrupt or incomplete, or was built for another environment."""


class AOTMismatchError(CallError):
    """A call that no kernel in an ahead-of-time directory was compiled for; says what the directory holds."""


class TuningOptionError(EinflashError, ValueError):
    """A tuning budget, sampler or storage that cannot be used."""


class CacheWarning(UserWarning):
    """A cache file was skipped (corrupt, or written for another environment), or deployment found no entry."""

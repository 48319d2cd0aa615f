"""Ops that run kernels compiled ahead of time: ``einflash.load_aot(DIR)``.

``einflash aot FILE[:NAME] --shape B,H,M,N,D --target sm90 --out DIR`` builds DIR on any machine
(einflash.compiler.aot); on the GPU, ``load_aot(DIR)`` gives an op called like the declared one,
which launches the stored binaries: no tuning, no JIT compilation.

    op = einflash.load_aot("kernels/causal")
    out = op(q, k, v)            # CUDA tensors of a dtype, head dims and shape class DIR was built for
"""

from __future__ import annotations

import pathlib

import torch

from .compiler.aot.load import StoredKernels
from .compiler.aot.manifest import Manifest, read_manifest
from .errors import AOTError, CallError
from .ir.reference import bind_extents, bind_params
from .jagged import jagged_batch
from .op import AttentionOp, load_ops


class AOTOp:
    """An attention variant whose kernels come from an AOT directory; called like its AttentionOp.

    ``op(q, k, v, **inputs)`` runs the stored binaries of the entry nearest the call that they fit;
    a call no binary fits raises AOTMismatchError naming what the directory holds. ``reference`` and
    ``bind`` are the declared op's, so ``einflash.testing.check`` holds it to the tolerance rule.
    The forward only: a call that needs gradients raises CallError.
    """

    def __init__(self, directory: pathlib.Path, manifest: Manifest, declared: AttentionOp):
        self.directory, self.manifest, self.declared = directory, manifest, declared
        self.name, self.cascade = declared.name, declared.cascade
        self.kernels = StoredKernels(directory, manifest)

    def __repr__(self) -> str:
        return f"<einflash.AOTOp {self.name} {self.cascade.key} from {self.directory}>"

    def bind(self, args: tuple, kwargs: dict):
        return self.declared.bind(args, kwargs)

    def reference(self, *args, **kwargs) -> torch.Tensor:
        """The float64 reference executor on these inputs."""
        return self.declared.reference(*args, **kwargs)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        inputs, params = self.declared.bind(args, kwargs)
        if jagged_batch(self.cascade, inputs, kwargs) is not None:
            raise CallError(
                f"{self.name} from {self.directory}: jagged batches (cu_seqlens_q/k) are not built ahead "
                f"of time yet; call it with a stacked batch, or use the declared op"
            )
        if torch.is_grad_enabled() and any(x.requires_grad for x in inputs.values()):
            raise CallError(
                f"{self.name} from {self.directory} runs forward kernels only and cannot give "
                f"gradients; call it under torch.no_grad() or with tensors that do not require grad"
            )
        fwd = self.declared.forward
        extents = bind_extents(fwd.rewritten, inputs, params)
        return self.kernels.run(fwd, inputs, bind_params(fwd.rewritten, params, extents), extents)


def load_aot(directory) -> AOTOp:
    """The op of an AOT directory built by ``einflash aot``, checked against the declaration it ships.

    Raises AOTError when the directory is corrupt, incomplete, or built for another Triton, or when its
    declaration no longer traces to the cascade its kernels were built from.
    """
    directory = pathlib.Path(directory)
    manifest = read_manifest(directory)
    ops = load_ops(str(directory / manifest.declaration))
    if manifest.variant not in ops:
        raise AOTError(
            f"{directory / manifest.declaration} declares {sorted(ops)}, not {manifest.variant!r} "
            f"whose kernels the directory holds"
        )
    declared = ops[manifest.variant]
    if declared.cascade.key != manifest.key:
        raise AOTError(
            f"{manifest.variant} in {directory / manifest.declaration} traces to cascade "
            f"{declared.cascade.key}, but the kernels were built for {manifest.key} (the declaration "
            f"or einflash changed); regenerate the directory with `einflash aot`"
        )
    return AOTOp(directory, manifest, declared)

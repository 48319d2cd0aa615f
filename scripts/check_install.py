"""One causal attention call on this install, checked against the reference: does a plain install work?

Runs the generated kernel (Triton's interpreter on a machine without a GPU) and its backward, holds both to
the tolerance rule, prints the versions it ran with, and exits 1 on a mismatch.

    python scripts/check_install.py
"""

import sys

# first: einflash turns Triton's interpreter on before Triton is imported
import einflash as ef  # isort: skip
import numpy
import torch
import triton

from einflash.testing import check, check_gradients


@ef.attention
def causal(q, k, v):
    s = ef.mask(q @ k * ef.scale, ef.n <= ef.m)
    return ef.softmax(s, "n") @ v


def main() -> int:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g, dtype=torch.float16).requires_grad_() for _ in range(3))
    out = causal(q, k, v)
    d_o = torch.randn(out.shape, generator=g, dtype=out.dtype)
    out.backward(d_o)
    forward = check(causal, out.detach(), q, k, v)
    gradients = check_gradients(causal, {"q": q.grad, "k": k.grad, "v": v.grad}, d_o, q, k, v)
    worst = max(gradients.values(), key=lambda verdict: verdict.max_error)
    print(
        f"torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}: causal forward error "
        f"{forward.max_error:.2e} (tolerance {forward.tolerance:.2e}), gradient error {worst.max_error:.2e} "
        f"(tolerance {worst.tolerance:.2e})"
    )
    return 0 if forward.ok and all(verdict.ok for verdict in gradients.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

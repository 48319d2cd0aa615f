"""Peer attention implementations on one GPU, for the benchmark rows of docs/design.md §5.

Each function returns a zero-argument callable that runs the peer's forward on the
given tensors, or raises when the peer cannot run the case. The benchmark times the
callables with ``triton.testing.do_bench`` next to einflash, in the same process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def environment(**extra) -> dict:
    """The record a benchmark's JSON starts with: the GPU, torch, Triton, the date, and ``extra``."""
    import datetime

    import triton

    return {
        "kind": "env",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        **extra,
    }


SDPA_BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}


def sdpa(backend: str, q, k, v, causal: bool = False):
    """SDPA pinned to one back end (cuDNN or FlashAttention-2)."""
    be = SDPA_BACKENDS[backend]
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    run()  # raises here if the back end refuses the case
    return run


_FLEX = None


def flex(q, k, v, mask_mod=None, score_mod=None):
    """FlexAttention (compiled, Triton back end) with a block mask built from ``mask_mod``."""
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        _FLEX = torch.compile(flex_attention, dynamic=False)
    bm = None
    if mask_mod is not None:
        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2], device=q.device)
    gqa = q.shape[1] != k.shape[1]

    def run():
        return _FLEX(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=gqa)

    run()
    return run


def causal_mask(b, h, qi, ki):
    return qi >= ki


def sliding_mask(window: int):
    def mask(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < window)

    return mask


def softcap_mod(cap: float):
    def mod(score, b, h, qi, ki):
        return cap * torch.tanh(score / cap)

    return mod


def alibi_mod(slopes):
    def mod(score, b, h, qi, ki):
        return score + slopes[h] * (ki - qi)

    return mod


def row_peers(name: str, kind: str, q, k, v, extra: dict, params: dict) -> tuple[dict, dict]:
    """The peers of one benchmark row of catalogue variant ``name`` (mask ``kind``): name → callable for those
    that run the case, and name → the exception that kept each other one from it."""
    peers = {}
    if name in ("softmax", "causal"):
        for peer in SDPA_BACKENDS:
            try:
                peers[peer] = sdpa(peer, q, k, v, kind == "causal")
            except Exception as e:  # noqa: BLE001
                peers[peer] = e
    try:
        mask = {"causal": causal_mask, "window": sliding_mask(params.get("window", 1024))}.get(kind)
        score = (
            alibi_mod(extra["slope"].to(q.device))
            if name == "alibi"
            else softcap_mod(params["cap"])
            if name == "softcap"
            else None
        )
        peers["flex"] = flex(q, k, v, mask_mod=mask, score_mod=score)
    except Exception as e:  # noqa: BLE001
        peers["flex"] = e
    return (
        {p: f for p, f in peers.items() if not isinstance(f, Exception)},
        {p: e for p, e in peers.items() if isinstance(e, Exception)},
    )

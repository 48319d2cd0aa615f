"""The compiler, stage by stage: a declared cascade (einflash.ir) is analysed, rewritten, differentiated,
generated into Triton kernels, run, tuned and shipped.

    analysis/    passes over the keys, buffers, FLOPs and bytes, mask tiles: formulas (sympy)
    rewrite/     the rewrite pipeline: pure Cascade → Cascade steps into the cheapest form
    autodiff/    the gradient cascade, in FlashAttention's form, cut into the backward kernels' parts
    codegen/     the templates' hook slots filled tile by tile; kernel signatures read from the sources
    runtime/     generated kernels launched: a call's forward and backward, replays, run-time tile lists
    tuning/      the search space, the Optuna tuner, the cache of winners, the schedule a call runs
    aot/         kernels built ahead of time for a GPU target, and launched from the binaries
    schedule.py  how a call runs (tiles, warps, stages, splits), and the defaults when nothing was tuned
    explain.py   every stage's analysis of one declaration, as one report
"""

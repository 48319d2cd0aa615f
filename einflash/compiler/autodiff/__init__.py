"""Differentiation: the gradient of a cascade derived in reverse mode as another cascade, rewritten into
FlashAttention's form and cut into the backward kernels' parts."""

"""Analysis: what a cascade costs, as formulas (FuseMax's pass count over the keys, on-chip buffers, FLOPs and
bytes, which key tiles a mask leaves empty, partial or full)."""

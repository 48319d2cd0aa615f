"""Code generation: cascades rendered into the Triton templates' hook slots, one tile at a time (TileCode), with
each kernel's signature read from its rendered source."""

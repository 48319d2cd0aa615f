"""Ahead of time: kernels generated and cross-compiled for a GPU target on any machine, a manifest describing
them, and their launch from the stored binaries."""

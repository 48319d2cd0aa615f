"""Running kernels: writing and importing generated sources, launching them with arguments by name, the forward
and backward of a call, run-time tile classification, and replays of recorded launches."""

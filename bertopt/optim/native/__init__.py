"""bertopt's native CPU kernels: ``build`` compiles ``../csrc`` on first use and loads it,
``kernels`` calls it (ctypes). Only float32 CPU tensors take this path; everything else,
and every machine without a C compiler, uses torch's kernels."""

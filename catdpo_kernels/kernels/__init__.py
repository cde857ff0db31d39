"""``@triton.jit`` kernels only; the autograd wrappers live in ``catdpo_kernels.ops``."""

"""Triton kernels (installed as mae_fast.kernels): @triton.jit kernels and their launchers only.

Tensors in, tensors out; validation, autograd and dispatch live in mae_fast/ops/."""

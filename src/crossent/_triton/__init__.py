"""Triton kernels for CUDA tensors."""

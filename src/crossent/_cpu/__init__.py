"""Fused torch kernels for CPU (and the device-agnostic torch path)."""

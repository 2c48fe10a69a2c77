"""Triton kernels of resnet_fast: one op per file."""

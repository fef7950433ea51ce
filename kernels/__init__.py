"""Triton kernels for packed weights, installed as `llmsqueeze.kernels`."""

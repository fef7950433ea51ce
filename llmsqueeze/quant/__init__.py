"""Quantizer math: grids (grid.py), round-to-nearest (rtn.py), bit packing (pack.py)."""
from .grid import dequantize, fake_quantize, minmax_qparams, quantize, rtn_qparams, rtn_quantize

__all__ = ["quantize", "dequantize", "fake_quantize", "minmax_qparams", "rtn_qparams", "rtn_quantize"]

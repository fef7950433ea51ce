"""Round-to-nearest (RTN): each group's scale/zero from its own range (optionally clip-searched);
no calibration data. Under a GGUFScheme, each GGML block's scales are fitted by quant/ggml.fit."""
from __future__ import annotations

import torch

from ..config import GGUFScheme, QuantScheme, scheme_for
from . import ggml
from .grid import rtn_qparams, rtn_quantize  # noqa: F401 (the RTN math lives in grid.py)


class RTN:
    """The engine's method for round-to-nearest: no statistics; each Linear becomes a packed
    QuantLinear from its own weight (what a lazy, block-by-block run uses)."""

    collect_inputs = False  # nothing to measure: the engine skips the calibration pass

    def __init__(self, scheme: QuantScheme, layer_schemes: dict | None = None):
        self.scheme = scheme
        self.layer_schemes = layer_schemes  # mixed precision: per-layer overrides of `scheme`
        self.report: list[dict] = []

    def collect(self, name: str, module, x: torch.Tensor) -> None:
        pass

    @torch.no_grad()
    def apply(self, name: str, module):
        from ..nn import LUTLinear, QuantLinear, linear_weight

        w = linear_weight(module).detach()
        if isinstance(self.scheme, GGUFScheme):  # GGML's block formats: quant/ggml.py
            from ..nn_gguf import GGUFLinear

            t = self.scheme.layer_types[name]
            q, params = ggml.quantize(w, ggml.get_type(t))
            return GGUFLinear.from_codes(q, params, t, bias=module.bias)
        s = scheme_for(self.scheme, self.layer_schemes, name)
        if s.grid != "uniform":  # non-uniform levels: quant/lut.py
            from .lut import rtn_lut_quantize

            q, table, scale = rtn_lut_quantize(w, s)
            return LUTLinear.from_quantized(
                q, table, scale, s.bits, s.group_size_for(w.shape[1]), s.grid,
                bias=module.bias, scale_dtype=s.torch_scale_dtype,
            )
        q, scale, zero = rtn_quantize(w, s)
        return QuantLinear.from_quantized(
            q, scale, zero, s.bits, s.group_size_for(w.shape[1]), bias=module.bias, scale_dtype=s.torch_scale_dtype,
        )


def build(job) -> RTN:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point)."""
    return RTN(job.scheme, job.layer_schemes)

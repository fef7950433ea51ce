"""W8A8 quantization of a model: SmoothQuant (optional, alpha searched per block), then int8
per-channel weights by round-to-nearest or GPTQ, and int8 activations (dynamic, or static with a
scale per layer calibrated on what the smoothed, partially quantized block really feeds it).

Driven by the shared engine: `prepare_block` smooths each float block before its Linears are
calibrated; `collect`/`apply` gather what the weights (GPTQ Hessians) and static scales need and
swap each Linear for an Int8Linear.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import LlmsqueezeError, W8A8Scheme
from ..nn import is_linear, linear_weight, set_module
from .int8 import QMAX, static_clip_errors
from .smoothquant import SmoothMap, collect_input_absmax, search_alpha, smooth_block, smooth_map_for

log = logging.getLogger("llmsqueeze")

STATIC_SAMPLE_ROWS = 16  # tokens kept per calibration batch and layer for the static-scale search


def int8_from_quant_linear(ql, input_scale=None):
    """A per-channel symmetric 8-bit QuantLinear (GPTQ's output) as the equal Int8Linear."""
    from ..nn_int8 import Int8Linear

    q, scale, zero = ql.unpack()  # [N, K], [N, 1], [N, 1]
    return Int8Linear.from_quantized(q - zero, scale[:, 0], ql.bias, input_scale)


def static_scale(absmax: torch.Tensor) -> float:
    """The per-tensor activation scale from a calibrated max|x| (no clipping)."""
    return max(float(absmax.max()), 1e-8) / QMAX


class W8A8:
    """The engine's method for W8A8 (see the module docstring)."""

    def __init__(self, scheme: W8A8Scheme, layer_names: list[str], smap: SmoothMap | None, gptq=None,
                 search_batches: int = 4):
        self.scheme, self.smap, self.gptq = scheme, smap, gptq
        self.wanted = set(layer_names)
        self.search_batches = search_batches
        self.absmax: dict[str, torch.Tensor] = {}  # static: max|x| per layer
        self.samples: dict[str, list[torch.Tensor]] = {}  # static, clip search: sampled input rows per layer
        self.alphas: list[float] = []
        self.report: list[dict] = []
        self.collect_inputs = gptq is not None or scheme.act == "static"

    # -- before the block's Linears are calibrated: smooth the float block
    @torch.no_grad()
    def prepare_block(self, prefix: str, block: nn.Module, batches) -> None:
        from ..engine import block_output

        s = self.scheme
        if s.smooth_alpha is None or self.smap is None:
            return
        names = [n for n, m in block.named_modules() if is_linear(m) and prefix + n in self.wanted]
        inputs = list(batches())
        targets: list[torch.Tensor] = []

        def run():
            for j, (h, kw) in enumerate(inputs):
                out = block(h, **kw)
                if j < self.search_batches and s.smooth_alpha == "auto":
                    targets.append(block_output(out).float())

        every = [n for n, m in block.named_modules() if is_linear(m)]
        stats = collect_input_absmax(block, every, run)
        pairs = s.smooth_pairs == "all"
        if s.smooth_alpha == "auto":

            def quantize_trial(trial, applied):
                for n in names:
                    layer = trial.get_submodule(n)
                    inp = None
                    if s.act == "static":
                        inp = static_scale(stats[n] / applied.get(n, torch.ones_like(stats[n])))
                    set_module(trial, n, _rtn_int8(layer, inp))

            alpha, errors = search_alpha(block, self.smap, stats, s.smooth_grid, pairs, quantize_trial,
                                         inputs[: self.search_batches], targets, s.smooth_refine)
            log.info("SmoothQuant %s: alpha %.2f (block-output error %s)", prefix, alpha,
                     ", ".join(f"{a}:{e:.3g}" for a, e in sorted(errors.items())))
        else:
            alpha = float(s.smooth_alpha)
        smooth_block(block, self.smap, stats, alpha, pairs)
        self.alphas.append(alpha)

    # -- per Linear
    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.gptq is not None:
            self.gptq.collect(name, module, x)
        if self.scheme.act == "static":
            m = x.detach().abs().amax().float()
            self.absmax[name] = m if name not in self.absmax else torch.maximum(self.absmax[name], m)
            if self.scheme.static_clip == "mse":  # evenly spaced tokens, the first (often an outlier) included
                rows = x.detach().reshape(-1, x.shape[-1])
                idx = torch.linspace(0, rows.shape[0] - 1, min(rows.shape[0], STATIC_SAMPLE_ROWS)).long()
                self.samples.setdefault(name, []).append(rows[idx.to(rows.device)].float().cpu())

    def static_input_scale(self, name: str, module: nn.Module) -> float:
        absmax = self.absmax.pop(name)
        samples = self.samples.pop(name, None)
        if self.scheme.static_clip == "max" or not samples:
            return static_scale(absmax)
        errors = static_clip_errors(torch.cat(samples), linear_weight(module).detach().float().cpu(), float(absmax))
        r = min(errors, key=errors.get)
        self.report.append({"layer": name, "static_clip": r, "error_max": errors[1.0], "error": errors[r]})
        log.debug("static scale %s: %.2f x max|x| (output error %.3g -> %.3g)", name, r, errors[1.0], errors[r])
        return static_scale(absmax.double() * r)  # in double, as the search scored it

    def record(self) -> dict:
        """What the checkpoint's method_args say of the run, once it is done."""
        out: dict = {}
        clips = {r["layer"]: round(r["static_clip"], 4) for r in self.report if "static_clip" in r}
        if clips:
            out["static_clip"] = clips  # each layer's scale as a fraction of its calibrated max|x|
        if self.alphas:
            s = self.scheme
            out["smoothquant"] = {"alpha": s.smooth_alpha, "alphas": self.alphas, "pairs": s.smooth_pairs,
                                  "search_batches": self.search_batches}
        return out

    @property
    def all_reports(self) -> list[dict]:
        """GPTQ's losses (W8A8's own report holds the static clip search)."""
        return self.gptq.report if self.gptq is not None else []

    def apply(self, name: str, module: nn.Module) -> nn.Module:
        inp = self.static_input_scale(name, module) if self.scheme.act == "static" else None
        if self.gptq is not None:
            return int8_from_quant_linear(self.gptq.apply(name, module), inp)
        return _rtn_int8(module, inp)


def _rtn_int8(layer: nn.Module, input_scale: float | None = None):
    from ..nn_int8 import Int8Linear

    return Int8Linear.from_float(linear_weight(layer), getattr(layer, "bias", None), input_scale)


def build(job, inner=None) -> W8A8:
    """The engine method for llmsqueeze.engine.Job `job` with a W8A8Scheme (the method table's entry
    point): RTN int8 weights, or `inner`'s (GPTQ on the int8 grid, gptq.build_int8) when given;
    `job.extra["search_batches"]`: calibration batches the alpha search runs each candidate on."""
    scheme = job.scheme
    smap = smooth_map_for(job.model)
    if scheme.smooth_alpha is not None and smap is None:
        raise LlmsqueezeError(f"SmoothQuant has no norm -> Linear table for model type "
                              f"{getattr(job.model.config, 'model_type', '?')!r}: use --smooth-alpha off, or add a row "
                              "to llmsqueeze.quant.smoothquant.SMOOTH_MAPS")
    search_batches = job.extra.get("search_batches", 4)
    if search_batches < 1:
        raise LlmsqueezeError(f"search_batches={search_batches} must be positive")
    if inner is None:
        job.method_args = dict(job.data_args)
    return W8A8(scheme, job.names, smap, inner, search_batches)

"""Weights-and-activations quantization of a model: SmoothQuant (optional, alpha searched per block),
then the weights by round-to-nearest or GPTQ, and the activations quantized at run time (dynamic) or
with a scale per layer calibrated on what the smoothed, partially quantized block really feeds it.
Two families of grids share this one method: integer W8A8 (W8A8Scheme: int8 per-channel weights,
int8 activations, Int8Linear) and the floating-point formats (FloatScheme: FP8 per channel or in
blocks, NVFP4, MXFP4, FloatLinear; quant/fp.py), including their weight-only forms, where only the
weight rounding (and the weight scale search) runs.

Driven by the shared engine: `prepare_block` smooths each float block before its Linears are
calibrated; `collect`/`apply` gather what the weights (GPTQ Hessians) and static scales need and
swap each Linear for the quantized layer.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import FloatScheme, LlmsqueezeError, W8A8Scheme
from ..nn import is_linear, linear_weight, set_module
from . import fp
from .int8 import QMAX, STATIC_CLIP_GRID, static_clip_errors
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


class Int8Grid:
    """Int8 weights per channel and int8 activations (W8A8Scheme)."""

    def __init__(self, scheme: W8A8Scheme):
        self.scheme = scheme

    def rtn(self, layer: nn.Module, input_scale: float | None = None, name: str | None = None) -> nn.Module:
        return _rtn_int8(layer, input_scale)

    def from_inner(self, ql, input_scale):
        """GPTQ's 8-bit per-channel QuantLinear -> the equal Int8Linear."""
        return int8_from_quant_linear(ql, input_scale)

    def input_scale(self, absmax: torch.Tensor, r: float = 1.0) -> float:
        """The static scale for r x the calibrated max|x| (in double, as the clip search scored it)."""
        return static_scale(absmax.double() * r)

    def clip_errors(self, x: torch.Tensor, w: torch.Tensor, absmax: float) -> dict[float, float]:
        return static_clip_errors(x, w, absmax)

    def block_ready(self, prefix: str, block: nn.Module, smap: SmoothMap | None) -> None:
        pass


class FloatGrid:
    """FP8 / NVFP4 / MXFP4 weights, and activations where the format quantizes them (FloatScheme)."""

    def __init__(self, scheme: FloatScheme):
        self.scheme = scheme
        self.fmt = fp.FORMATS[scheme.format]
        self.global_amax: dict[str, float] = {}  # nvfp4: max|w| shared by the Linears one norm feeds

    def block_ready(self, prefix: str, block: nn.Module, smap: SmoothMap | None) -> None:
        """Once the block is smoothed (or not), before its Linears are quantized. nvfp4: the Linears that read one norm's output (q/k/v, gate/up), which vLLM fuses into one
        GEMM with one global scale, get the global scale of their joint max|w| (as llm-compressor
        writes them); other Linears keep their own."""
        if self.fmt.scale != "e4m3" or smap is None:
            return
        for _, group in smap.norms:
            mods = [(n, block.get_submodule(n)) for n in group if _has(block, n)]
            if len(mods) > 1:
                amax = max(float(linear_weight(m).detach().abs().max()) for _, m in mods)
                self.global_amax.update({prefix + n: amax for n, _ in mods})

    def rtn(self, layer: nn.Module, input_scale=None, name: str | None = None) -> nn.Module:
        from ..nn_float import FloatLinear

        w = linear_weight(layer).detach()
        problem = fp.non_finite(w, name or "a layer", self.fmt.name)
        if problem:
            raise LlmsqueezeError(problem)
        s = self.scheme
        scales = fp.layer_scales(w, self.fmt, s.scale_search, s.scale_grid, s.scale_max_shrink,
                                 global_amax=self.global_amax.get(name))
        return FloatLinear.from_tensors(fp.quantize_weight(w, self.fmt, scales), s.format, getattr(layer, "bias", None),
                                        None if input_scale is None else torch.as_tensor(input_scale), w.shape[1])

    def from_inner(self, layer, input_scale):
        """GPTQ's FloatLinear, with the calibrated activation scale set."""
        if input_scale is not None:
            layer.set_input_scale(input_scale)
        return layer

    def input_scale(self, absmax: torch.Tensor, r: float = 1.0) -> torch.Tensor:
        return fp.static_input_scale(self.fmt, float(absmax) * r)

    def clip_errors(self, x: torch.Tensor, w: torch.Tensor, absmax: float) -> dict[float, float]:
        """fp8 static: the layer-output error of each fraction of max|x| as the scale's range."""
        out = {}
        for r in STATIC_CLIP_GRID:
            scale = fp.static_input_scale(self.fmt, r * absmax)
            xq = fp.fake_quant_input(x, self.fmt, scale)
            out[r] = float(((xq - x.float()) @ w.float().t()).pow(2).sum())
        return out


def _has(block: nn.Module, name: str) -> bool:
    try:
        return is_linear(block.get_submodule(name))
    except AttributeError:
        return False


def grid_for(scheme) -> Int8Grid | FloatGrid:
    return FloatGrid(scheme) if isinstance(scheme, FloatScheme) else Int8Grid(scheme)


class W8A8:
    """The engine's method for W8A8 and the float formats (see the module docstring)."""

    def __init__(self, scheme: W8A8Scheme | FloatScheme, layer_names: list[str], smap: SmoothMap | None, gptq=None,
                 search_batches: int = 4):
        self.scheme, self.smap, self.gptq = scheme, smap, gptq
        self.grid = grid_for(scheme)
        if gptq is not None and isinstance(self.grid, FloatGrid):
            gptq.global_amax = self.grid.global_amax  # the shared nvfp4 global scales, filled per block
        # a calibrated per-layer activation scale: int8 / fp8 static, nvfp4's global scale
        self.static = scheme.calibrated_input if isinstance(scheme, FloatScheme) else scheme.act == "static"
        self.wanted = set(layer_names)
        self.search_batches = search_batches
        self.absmax: dict[str, torch.Tensor] = {}  # static: max|x| per layer
        self.samples: dict[str, list[torch.Tensor]] = {}  # static, clip search: sampled input rows per layer
        self.alphas: list[float] = []
        self.report: list[dict] = []
        self.collect_inputs = gptq is not None or self.static
        # RTN weights and per-token activations depend on no input but SmoothQuant's statistics, which
        # the paper takes from the float model: the next block's inputs are then the float block's
        # outputs (the smoothing pass computes them), sparing the engine a pass over the int8 block
        self.float_stream = gptq is None and not self.static
        self._outputs: list[torch.Tensor] | None = None

    # -- before the block's Linears are calibrated: smooth the float block
    @torch.no_grad()
    def prepare_block(self, prefix: str, block: nn.Module, batches) -> None:
        self.smooth(prefix, block, batches)
        self.grid.block_ready(prefix, block, self.smap)

    def smooth(self, prefix: str, block: nn.Module, batches) -> None:
        from ..engine import block_output

        s = self.scheme
        if s.smooth_alpha is None or self.smap is None:
            return
        names = [n for n, m in block.named_modules() if is_linear(m) and prefix + n in self.wanted]
        inputs = list(batches())
        targets: list[torch.Tensor] = []

        keep = [] if self.float_stream else None

        def run():
            for j, (h, kw) in enumerate(inputs):
                out = block_output(block(h, **kw))
                if j < self.search_batches and s.smooth_alpha == "auto":
                    targets.append(out.float())
                if keep is not None:
                    keep.append(out)

        every = [n for n, m in block.named_modules() if is_linear(m)]
        stats = collect_input_absmax(block, every, run)
        pairs = s.smooth_pairs == "all"
        if s.smooth_alpha == "auto":

            def quantize_trial(trial, applied):
                for n in names:
                    layer = trial.get_submodule(n)
                    inp = None
                    if self.static and n in stats:  # (a MoE expert no trial token reaches needs none)
                        inp = self.grid.input_scale((stats[n] / applied.get(n, torch.ones_like(stats[n]))).max())
                    set_module(trial, n, self.grid.rtn(layer, inp, prefix + n))

            alpha, errors = search_alpha(block, self.smap, stats, s.smooth_grid, pairs, quantize_trial,
                                         inputs[: self.search_batches], targets, s.smooth_refine)
            log.info("SmoothQuant %s: alpha %.2f (block-output error %s)", prefix, alpha,
                     ", ".join(f"{a}:{e:.3g}" for a, e in sorted(errors.items())))
        else:
            alpha = float(s.smooth_alpha)
        smooth_block(block, self.smap, stats, alpha, pairs)
        self.alphas.append(alpha)
        self._outputs = keep

    def block_outputs(self) -> list[torch.Tensor] | None:
        """The float block's outputs on this block's inputs when the float stream goes on (the
        engine's next inputs, then), else None; once per block."""
        out, self._outputs = self._outputs, None
        return out

    # -- per Linear
    def collect(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if self.gptq is not None:
            self.gptq.collect(name, module, x)
        if self.static:
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
            return self.grid.input_scale(absmax)
        errors = self.grid.clip_errors(torch.cat(samples), linear_weight(module).detach().float().cpu(), float(absmax))
        r = min(errors, key=errors.get)
        self.report.append({"layer": name, "static_clip": r, "error_max": errors[1.0], "error": errors[r]})
        log.debug("static scale %s: %.2f x max|x| (output error %.3g -> %.3g)", name, r, errors[1.0], errors[r])
        return self.grid.input_scale(absmax, r)

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
        inp = self.static_input_scale(name, module) if self.static else None
        if self.gptq is not None:
            return self.grid.from_inner(self.gptq.apply(name, module), inp)
        return self.grid.rtn(module, inp, name)


def _rtn_int8(layer: nn.Module, input_scale: float | None = None):
    from ..nn_int8 import Int8Linear

    return Int8Linear.from_float(linear_weight(layer), getattr(layer, "bias", None), input_scale)


def build(job, inner=None) -> W8A8:
    """The engine method for llmsqueeze.engine.Job `job` with a W8A8Scheme or a FloatScheme (the method
    table's entry point): RTN weights, or `inner`'s (GPTQ on the int8 grid, gptq.build_int8, or on the
    float format's levels, gptq.build_float) when given;
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

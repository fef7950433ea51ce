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

from ..config import LlmsqueezeError, QuantScheme, W8A8Scheme
from ..nn import is_linear, linear_weight, set_module
from .int8 import QMAX, static_clip_errors
from .smoothquant import SmoothMap, collect_input_absmax, search_alpha, smooth_block, smooth_map_for

log = logging.getLogger("llmsqueeze")

STATIC_SAMPLE_ROWS = 16  # tokens kept per calibration batch and layer for the static-scale search

# the weight grid of W8A8 in the weight-only scheme's terms (used by GPTQ): 8-bit, one symmetric
# scale per output channel kept in float32; q - 128 is the int8 weight
GPTQ_SCHEME = dict(bits=8, group_size=-1, sym=True, scale_dtype="float32")


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
        from ..engine import _block_output

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
                    targets.append(_block_output(out).float())

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

    def apply(self, name: str, module: nn.Module) -> nn.Module:
        inp = self.static_input_scale(name, module) if self.scheme.act == "static" else None
        if self.gptq is not None:
            return int8_from_quant_linear(self.gptq.apply(name, module), inp)
        return _rtn_int8(module, inp)


def _rtn_int8(layer: nn.Module, input_scale: float | None = None):
    from ..nn_int8 import Int8Linear

    return Int8Linear.from_float(linear_weight(layer), getattr(layer, "bias", None), input_scale)


def w8a8_scheme_from_args(args) -> W8A8Scheme:
    """The CLI's --smooth-alpha/--act/--include/--exclude/--lm-head as a W8A8Scheme."""
    a = args.smooth_alpha
    if a not in ("auto", "off"):
        try:
            a = float(a)
        except ValueError:
            raise LlmsqueezeError(f"--smooth-alpha {a!r} is not valid: use a number in [0, 1], auto or off") from None
    return W8A8Scheme(act=args.act, static_clip=getattr(args, "static_clip", "mse"),
                      smooth_alpha=None if a == "off" else a, include=args.include or [],
                      exclude=args.exclude or [], lm_head=args.lm_head)


def quantize_w8a8(model: nn.Module, scheme: W8A8Scheme, data=None, method: str = "rtn", progress: bool = True, *,
                  device: str | None = None, offload: str | None = None, batch_size: int = 1, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, search_batches: int = 4) -> nn.Module:
    """Quantize `model` in place to W8A8 (llmsqueeze.quantize calls this for a W8A8Scheme).
    search_batches: calibration batches the alpha search of SmoothQuant runs each candidate on."""
    from ..api import _untie_lm_head, check_devices
    from ..formats.native import quantization_config
    from ..models import all_linear_names, selected_layers

    if method not in ("rtn", "gptq"):
        raise LlmsqueezeError(f"method {method!r} is not available for w8a8: use rtn or gptq")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized: start from the dense model")
    names, head_name = selected_layers(model, scheme)
    smap = smooth_map_for(model)
    if scheme.smooth_alpha is not None and smap is None:
        raise LlmsqueezeError(f"SmoothQuant has no norm -> Linear table for model type "
                              f"{getattr(model.config, 'model_type', '?')!r}: use --smooth-alpha off, or add a row "
                              "to llmsqueeze.quant.smoothquant.SMOOTH_MAPS")
    calibrated = scheme.needs_data or method == "gptq"
    if calibrated and data is None:
        raise LlmsqueezeError("w8a8 with SmoothQuant, static activations or GPTQ needs calibration data: pass data= "
                              "token ids [n_samples, seq_len], or --calib on the command line")
    if head_name is not None:
        _untie_lm_head(model, head_name)
    log.info("w8a8 (%s) on %d layers: %s", method, len(names), scheme.to_dict())

    method_args: dict = {}
    if not calibrated:
        with torch.no_grad():
            for n in names:
                set_module(model, n, _rtn_int8(model.get_submodule(n)))
    else:
        from ..engine import run_sequential
        from .gptq import GPTQ

        ids = data if isinstance(data, torch.Tensor) else torch.cat(list(data))
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise LlmsqueezeError(f"calibration data must be integer token ids [n_samples, seq_len], "
                                  f"got {tuple(ids.shape)} {ids.dtype}")
        if batch_size < 1 or search_batches < 1:
            raise LlmsqueezeError(f"batch_size={batch_size} and search_batches={search_batches} must be positive")
        device = check_devices(device, offload)
        gptq = None
        if method == "gptq":
            gptq = GPTQ(QuantScheme(**GPTQ_SCHEME), damp=damp, block_size=block_size, act_order=act_order,
                        static_groups=True)
        m = W8A8(scheme, names, smap, gptq, search_batches)
        stats = run_sequential(model, list(ids.long().split(batch_size)), m, names, device=device, offload=offload,
                               progress=progress)
        model._llmsqueeze_stats = stats
        model._llmsqueeze_report = gptq.report if gptq is not None else []
        method_args = {"n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
        if gptq is not None:
            method_args.update(act_order=act_order, damp=damp, block_size=block_size)
        clips = {r["layer"]: round(r["static_clip"], 4) for r in m.report if "static_clip" in r}
        if clips:
            method_args["static_clip"] = clips  # each layer's scale as a fraction of its calibrated max|x|
        if m.alphas:
            method_args["smoothquant"] = {"alpha": scheme.smooth_alpha, "alphas": m.alphas,
                                          "pairs": scheme.smooth_pairs, "search_batches": search_batches}
    model.config.quantization_config = quantization_config(scheme, method, all_linear_names(model), method_args)
    return model

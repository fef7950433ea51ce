"""Quantization-aware training (QAT) of the whole model: train with the quantization in the loop,
then freeze into packed QuantLinears.

    model = prepare_qat(model, QuantScheme(bits=4, group_size=64))   # Linears -> FakeQuantLinear
    ... train as usual (every parameter, fake-quantized weights in the forward) ...
    model = convert(model)                                            # -> QuantLinear, standard checkpoint

Fake quantization of a weight W [N, K] in groups of G inputs, with the storage grid of `grid.py`:

    q = clamp(round(W / s) + z, 0, 2**b - 1),   W_q = (q - z) * s

round has zero gradient almost everywhere; the straight-through estimator (Bengio et al., 2013)
passes dL/dW_q to W unchanged where W lies inside the grid's range, and zero where clamp clips.
Two ways to get (s, z):
  * learn_scale=False: each forward recomputes them from the current weights (min/max per group,
    as round-to-nearest does); they are constants for autograd.
  * learn_scale=True (LSQ, Esser et al., 2020): s is a parameter, started from min/max, trained by
    the same STE (dW_q/ds = round(W/s) - W/s inside the range, q - z at the clipped ends); z stays at
    its starting value. Its gradient is scaled by 1/sqrt(G * (2**b - 1)) as LSQ recommends.
The scale is rounded to the checkpoint's scale dtype in the forward (gradient straight through), so
`convert` stores exactly the weights the trained model saw: the converted model's dequantized
weights equal the fake-quantized ones bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import LlmsqueezeError, QuantScheme
from .grid import expand_groups, group_minmax, minmax_qparams


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward, identity in the backward."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward, factor * grad in the backward (LSQ's step-size gradient scaling)."""
    return x * factor + (x - x * factor).detach()


class _FakeQuantSTE(torch.autograd.Function):
    """W_q = (clamp(round(W/s) + z, 0, maxq) - z) * s with constant s, z; dW_q/dW = 1 where round(W/s) + z
    lies in [0, maxq], 0 where clamp clips (exactly, not s * 1/s)."""

    @staticmethod
    def forward(ctx, w, s, z, maxq):
        x = torch.round(w / s) + z
        ctx.save_for_backward((x >= 0) & (x <= maxq))
        return (x.clamp(0, maxq) - z) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


class FakeQuantLinear(nn.Module):
    """A Linear whose forward uses its fake-quantized weight. Holds the original weight Parameter
    (same object: an optimizer built before prepare_qat still trains it) and bias."""

    def __init__(self, linear: nn.Module, scheme: QuantScheme, learn_scale: bool = False):
        super().__init__()
        from ..nn import linear_weight

        self.transposed = not isinstance(linear, nn.Linear)  # GPT-2's Conv1D stores [K, N]
        self.weight = linear.weight
        self.bias = linear.bias
        self.scheme = scheme
        w = linear_weight(linear).detach()
        self.out_features, self.in_features = w.shape
        self.group_size = scheme.group_size_for(self.in_features)
        self.learn_scale = learn_scale
        if learn_scale:
            scale, zero = self._minmax(w)
            self.scale = nn.Parameter(scale)  # [N, ng] float32
            self.register_buffer("zero", zero)  # [N, ng] int32
        else:
            self.scale = None

    def _minmax(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wmin, wmax = group_minmax(w.detach(), self.group_size)
        return minmax_qparams(wmin, wmax, self.scheme.bits, self.scheme.sym, self.scheme.torch_scale_dtype)

    def w(self) -> torch.Tensor:
        """The float weight [N, K]."""
        return self.weight.t() if self.transposed else self.weight

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [N, ng] float32 holding scale-dtype values, with gradient when learned; zero [N, ng] int32)."""
        if not self.learn_scale:
            return self._minmax(self.w())
        tiny = torch.finfo(self.scheme.torch_scale_dtype).tiny
        s = self.scale.clamp(min=tiny)
        s = _grad_scale(s, 1 / math.sqrt(self.group_size * (2**self.scheme.bits - 1)))
        s = s + (s.detach().to(self.scheme.torch_scale_dtype).float() - s.detach())  # stored dtype, STE
        return s, self.zero

    def fake_quant(self) -> torch.Tensor:
        """W_q [N, K] float32, differentiable (STE) in the weight and a learned scale."""
        w = self.w().float()
        scale, zero = self.qparams()
        s = expand_groups(scale, self.in_features, self.group_size)
        z = expand_groups(zero.float(), self.in_features, self.group_size)
        maxq = 2**self.scheme.bits - 1
        if not self.learn_scale:
            return _FakeQuantSTE.apply(w, s, z, maxq)
        q = torch.clamp(round_ste(w / s) + z, 0, maxq)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quant().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self):
        from ..nn import QuantLinear
        from .grid import quantize

        scale, zero = self.qparams()
        scale = scale.detach()
        q = quantize(self.w().detach(), scale, zero, self.scheme.bits, self.group_size)
        bias = None if self.bias is None else self.bias.detach()
        return QuantLinear.from_quantized(q, scale, zero, self.scheme.bits, self.group_size, bias=bias,
                                          scale_dtype=self.scheme.torch_scale_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.scheme.bits}, "
                f"group_size={self.group_size}, learn_scale={self.learn_scale}")


def prepare_qat(model: nn.Module, scheme: QuantScheme | None = None, learn_scale: bool = False,
                **scheme_kwargs) -> nn.Module:
    """Swap the Linears the scheme selects (those in the decoder blocks; `lm_head` adds the head)
    for FakeQuantLinears, in place; returns the model. The weights stay trainable parameters."""
    from ..models import selected_layers, untie_lm_head
    from ..nn import set_module

    if scheme is None:
        scheme = QuantScheme(**scheme_kwargs)
    elif scheme_kwargs:
        raise LlmsqueezeError("pass either a QuantScheme or scheme keyword arguments, not both")
    if scheme.grid != "uniform":  # FakeQuantLinear and convert() round to the uniform grid
        raise LlmsqueezeError(f"QAT trains on the uniform grid; grid={scheme.grid!r} is not available with prepare_qat")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized: start QAT from the dense model")
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise LlmsqueezeError("prepare_qat was already applied to this model; call convert() to finish it")
    scheme = dataclasses.replace(scheme, clip_search=False)  # min/max or learned ranges, never searched
    names, head_name = selected_layers(model, scheme)
    if head_name is not None:
        untie_lm_head(model, head_name)
        model.get_submodule(head_name).weight.requires_grad_(True)
    for name in names:
        set_module(model, name, FakeQuantLinear(model.get_submodule(name), scheme, learn_scale))
    model._llmsqueeze_qat = {"scheme": scheme, "learn_scale": learn_scale}
    return model


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """FakeQuantLinear -> packed QuantLinear with the very weights the trained model used, in place;
    the model then saves as a standard checkpoint (method "qat") and loads with from_pretrained."""
    from ..formats.native import quantization_config
    from ..models import all_linear_names
    from ..nn import set_module

    state = getattr(model, "_llmsqueeze_qat", None)
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if state is None or not names:
        raise LlmsqueezeError("this model has no fake-quantized layers: call prepare_qat(model, scheme) first")
    for name in names:
        set_module(model, name, model.get_submodule(name).to_quant_linear())
    scheme = state["scheme"]
    model.config.quantization_config = quantization_config(
        scheme, "qat", all_linear_names(model), {"learn_scale": state["learn_scale"]})
    del model._llmsqueeze_qat
    return model

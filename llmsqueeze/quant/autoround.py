"""Learned rounding (the AutoRound idea, Cheng et al., 2023): per decoder block, learn each Linear's
rounding offsets and its groups' range multipliers by signed gradient descent on the block's output
error, with a straight-through estimator through round().

For a Linear W [N, K] grouped along K (G columns per group; the last group may be shorter):

    lo = wmin * a_lo,  hi = wmax * a_hi                    per group [N, ng]; a_* in [amin, 1]
    s  = (hi - lo) / maxq,  z = round(-lo / s)             asymmetric  (symmetric: s = absmax * a_hi / (2**(b-1) - 1), z = 2**(b-1))
    q  = clamp(round(W / s + V) + z, 0, maxq),  V in [-0.5, 0.5]   [N, K]
    Wq = (q - z) * s

    minimise  mean (block(x; Wq) - block(x; W))**2  over V, a_lo, a_hi
    step:     p <- clamp(p - lr_t * sign(dL/dp)),  lr_t = lr * (1 - t / iters)   (sign-SGD)

The forward and backward passes of the optimisation run under bfloat16 autocast where the hardware
has it (amp; float32 otherwise); targets, held-out losses and the frozen grid stay float32.

x are the block's calibration inputs as the engine hands them (outputs of the already-quantized
upstream blocks). The targets are, by default (float_targets), the float model's outputs of this block
on the float model's own inputs (a second activation stream the engine carries), so each block also
learns to undo the error the quantized blocks upstream left in x; float_targets=False takes the float
block's outputs on x instead. d round(u)/du is taken as 1
(straight-through). The iterate with the lowest minibatch loss is kept, then frozen to the grid with
the scale in its storage dtype: the packed QuantLinear reproduces it bit for bit.

`init="clip"` starts from the clip-searched range of `grid.clip_search_qparams` instead of the plain
min/max (a_* start at the searched shrink), which round-to-nearest then learns from.

Under a GGUFScheme (GGUFAutoRound) the grid is each Linear's GGML type (quant/ggml.py): the same loop
learns V and multipliers of each sub-block's fitted step and min, and every forward rounds against
what the file would store of them (fp16; the k-quants' sub-block codes under fp16 super-block
scales), so the frozen GGUFLinear holds exactly the trained grid (the section "in GGML's block
formats" below).
"""
from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GGUFScheme, LlmsqueezeError, QuantScheme
from ..kernels import cpu as cpu_kernels
from . import ggml
from .grid import clip_search_qparams, dequantize, group_minmax, minmax_qparams, n_groups

log = logging.getLogger("llmsqueeze")

INITS = ("rtn", "clip")


# -- the math: pure functions ---------------------------------------------------------------------

def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def learned_qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, a_lo: torch.Tensor, a_hi: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range [N, ng] scaled by the multipliers a_lo/a_hi [N, ng] -> (scale, zero), each [N, ng] float32,
    differentiable in a_* (zero through the STE). wmin <= 0 <= wmax."""
    maxq = 2**bits - 1
    if sym:
        scale = torch.maximum(-wmin, wmax) * a_hi / (2 ** (bits - 1) - 1)
        return scale.clamp(min=1e-9), torch.full_like(scale, 2 ** (bits - 1))
    lo, hi = wmin * a_lo, wmax * a_hi
    scale = ((hi - lo) / maxq).clamp(min=1e-9)
    zero = round_ste(-lo / scale).clamp(0, maxq)
    return scale, zero


def rounded_codes(wg: torch.Tensor, v: torch.Tensor, s: torch.Tensor, z, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = clamp(round(W/s + V) + z, 0, maxq) [N, ng, G] float32 and m (bool, same shape: inside the
    grid, no clamping), for wg, v [N, ng, G], s [N, ng, 1], z [N, ng, 1] or a number. The one
    expression the fake quantization and the frozen codes share, so they agree bit for bit."""
    q = torch.div(wg, s).add_(v).round_().add_(z)
    m = (q >= 0) & (q <= maxq)
    return q.clamp_(0, maxq), m


class _FakeQuant(torch.autograd.Function):
    """Wq = (clamp(round(W/s + V) + z, 0, maxq) - z) * s with the straight-through gradients written
    out, so autograd keeps two tensors instead of the chain of elementwise steps:

        dWq/dV = s * m,   dWq/ds = (q - z) - m * W / s,   dWq/dz = -s * (1 - m),   dWq/dW = m

    m [N, ng, G] is 1 where round(W/s + V) + z lies inside the grid (no clamping). z may be a number
    (no gradient); W gets one only when it requires it (GGML's affine types: W - bias)."""

    @staticmethod
    def forward(ctx, wg, v, s, z, maxq):  # wg, v [N, ng, G]; s, z [N, ng, 1]
        q, m = rounded_codes(wg, v, s, z, maxq)
        qz = q.sub_(z)  # q - z
        ctx.save_for_backward(wg, s, qz, m)
        return qz * s

    @staticmethod
    def backward(ctx, g):
        wg, s, qz, m = ctx.saved_tensors
        gm = g * m
        gw = gm if ctx.needs_input_grad[0] else None
        gv = gm * s if ctx.needs_input_grad[1] else None
        gs = (g * qz).sub_(gm * wg / s).sum(2, keepdim=True) if ctx.needs_input_grad[2] else None
        gz = (gm - g).sum(2, keepdim=True).mul_(s) if ctx.needs_input_grad[3] else None  # -s * sum g (1 - m)
        return gw, gv, gs, gz, None


def fake_quant_learned(
    wg: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """wg, v [N, ng, G] (K padded to ng*G), scale/zero [N, ng] -> Wq [N, ng, G] float32, with the
    straight-through estimator on round()."""
    return _FakeQuant.apply(wg, v, scale.unsqueeze(2), zero.unsqueeze(2), 2**bits - 1)


def fake_quant_reference(
    wg: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """The same as fake_quant_learned through autograd's own chain (round_ste): the test reference."""
    s, z = scale.unsqueeze(2), zero.unsqueeze(2)
    q = (round_ste(wg / s + v) + z).clamp(0, 2**bits - 1)
    return (q - z) * s


def sign_sgd_step(params: list[torch.Tensor], lr: float, bounds: list[tuple]) -> None:
    """p <- clamp(p - lr * sign(grad), lo, hi) in place, grads cleared. bounds: (lo, hi) per param,
    floats or tensors shaped like p."""
    with torch.no_grad():
        for p, (lo, hi) in zip(params, bounds):
            if p.grad is None:
                continue
            p.add_(torch.sign(p.grad), alpha=-lr)
            p.copy_(torch.clamp(p, lo, hi))
            p.grad = None


def pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] -> [N, ng, G], zero-padded when the last group is shorter (zeros change neither the
    clamped min/max nor absmax, and their gradients are dropped when the result is cut back to K)."""
    n, k = w.shape
    ng = n_groups(k, group_size)
    pad = ng * group_size - k
    if pad:
        w = torch.cat([w, w.new_zeros(n, pad)], dim=1)
    return w.view(n, ng, group_size)


def freeze(
    wg: torch.Tensor, v: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, a_lo: torch.Tensor,
    a_hi: torch.Tensor, bits: int, sym: bool, k: int, scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The learned grid frozen: -> (q [N, K] int32, scale [N, ng] float32 holding scale_dtype values,
    zero [N, ng] int32). Scale and zero come from the learned range by `grid.minmax_qparams` (the
    scale rounded to its storage dtype before the zero and the integers are chosen), so the packed
    weight equals the simulated one and a = 1, V = 0 is exactly round-to-nearest."""
    # symmetric grids learn one multiplier (a_hi) of absmax
    scale, zero = minmax_qparams(wmin * (a_hi if sym else a_lo), wmax * a_hi, bits, sym, scale_dtype)
    q = (torch.round(wg / scale.unsqueeze(2) + v) + zero.unsqueeze(2)).clamp(0, 2**bits - 1)
    return q.reshape(wg.shape[0], -1)[:, :k].to(torch.int32), scale, zero


# -- the same in GGML's block formats (quant/ggml.py) ---------------------------------------------
#
# A GGUFScheme layer of type t: sub-blocks of S = t.sub weights, ns = K / S per row, each with a
# step and (affine types) a bias <= 0 from ggml.fit; learned: V [N, ns, S] in [-0.5, 0.5] and the
# multipliers a_s, a_m [N, ns] in [amin, 2 - amin] of the fitted step and bias. Every forward stores
# (step0 * a_s, bias0 * a_m) as the file would (ggml.store_steps: fp16, and for the k-quants the
# 4/6/8-bit sub-block codes under fp16 super-block scales) and rounds against what that stores, with
# straight-through gradients across both roundings, so training sees exactly the representable grid:
#
#   symmetric  w = step * (q - offset),  q = clamp(round(W / step + V) + offset, 0, L - 1)
#   affine     w = step * q + bias,      q = clamp(round((W - bias) / step + V), 0, L - 1)

def ggml_learned_steps(
    t: ggml.GGMLType, step0: torch.Tensor, bias0: torch.Tensor | None, a_s: torch.Tensor, a_m: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, ggml.Params]:
    """Fitted steps/biases [N, ns] and their multipliers [N, ns] -> (step, bias, params): step and
    bias hold exactly ggml.steps(t, params) of the stored params (forward), with the gradient of
    step0 * a_s and bias0 * a_m (straight through the storage rounding)."""
    raw_s = step0 * a_s
    raw_b = None if bias0 is None else bias0 * a_m
    with torch.no_grad():
        params = ggml.store_steps(t, raw_s.detach(), None if raw_b is None else raw_b.detach())
        qs, qb = ggml.steps(t, params)
    step = raw_s + (qs - raw_s).detach()
    bias = None if raw_b is None else raw_b + (qb - raw_b).detach()
    return step, bias, params


def _divisor(step: torch.Tensor) -> torch.Tensor:
    """step [N, ns] -> [N, ns, 1] with zero steps (a sub-block whose stored scale code is 0) made
    tiny: its weights then take the bias (or 0) whatever their code, and nothing divides by 0."""
    return torch.where(step == 0, torch.full_like(step, 1e-30), step).unsqueeze(2)


def ggml_fake_quant(wg: torch.Tensor, v: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None,
                    t: ggml.GGMLType) -> torch.Tensor:
    """wg, v [N, ns, S], step/bias [N, ns] (bias None: a symmetric type) -> Wq [N, ns, S] float32, the
    weight the codes of `ggml_codes` give under (step, bias), straight-through on round()."""
    s = _divisor(step)
    if bias is None:
        return _FakeQuant.apply(wg, v, s, float(t.offset), t.levels - 1)
    b = bias.unsqueeze(2)
    return _FakeQuant.apply(wg - b, v, s, 0.0, t.levels - 1) + b


@torch.no_grad()
def ggml_codes(wg: torch.Tensor, v: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None,
               t: ggml.GGMLType) -> torch.Tensor:
    """The frozen codes [N, K] int64 of ggml_fake_quant's rounding (the same expression, bit for bit)."""
    s = _divisor(step)
    if bias is None:
        q, _ = rounded_codes(wg, v, s, float(t.offset), t.levels - 1)
    else:
        q, _ = rounded_codes(wg - bias.unsqueeze(2), v, s, 0.0, t.levels - 1)
    return q.reshape(wg.shape[0], -1).long()


# -- one Linear's learnable state -------------------------------------------------------------------

@dataclass
class _Layer:
    name: str  # inside the block
    param: str  # the parameter name to override in functional_call
    conv1d: bool  # GPT-2 Conv1D stores W^T
    k: int
    g: int
    wg: torch.Tensor  # [N, ng, G] float32, fixed
    wmin: torch.Tensor  # [N, ng] <= 0
    wmax: torch.Tensor  # [N, ng] >= 0
    v: torch.Tensor  # [N, ng, G] learnable, in [-0.5, 0.5]
    a_lo: torch.Tensor  # [N, ng] learnable
    a_hi: torch.Tensor  # [N, ng] learnable
    a_min: torch.Tensor  # [N, ng] lower bound of a_* (min(amin, its init))
    a_max: torch.Tensor  # [N, ng] upper bound of a_* (max(1, its init))
    bits: int
    sym: bool
    scale_dtype: torch.dtype

    def trainable(self) -> list[torch.Tensor]:
        return [self.v, self.a_hi] if self.sym else [self.v, self.a_lo, self.a_hi]  # symmetric: one multiplier

    def bounds(self) -> list[tuple]:
        return [(-0.5, 0.5)] + [(self.a_min, self.a_max)] * (len(self.trainable()) - 1)

    def qparams(self):
        return learned_qparams(self.wmin, self.wmax, self.a_lo, self.a_hi, self.bits, self.sym)

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight in the layer's own layout ([N, K], Conv1D [K, N])."""
        s, z = self.qparams()
        w = fake_quant_learned(self.wg, self.v, s, z, self.bits).reshape(self.wg.shape[0], -1)[:, : self.k]
        return _layout(w, self.conv1d)

    def frozen(self) -> tuple[tuple, torch.Tensor]:
        """-> ((q, scale, zero) for QuantLinear, the weight the packed layer computes with, own layout)."""
        out = freeze(self.wg, self.v, self.wmin, self.wmax, self.a_lo, self.a_hi, self.bits, self.sym, self.k,
                     self.scale_dtype)
        return out, _layout(dequantize(*out, self.g), self.conv1d)


@dataclass
class _GGMLLayer:
    """One Linear of a GGUFScheme: its GGML type, the fitted sub-block steps and what is learned."""

    name: str
    param: str
    conv1d: bool
    t: ggml.GGMLType
    wg: torch.Tensor  # [N, ns, S] float32, fixed (K a multiple of the type's block: no padding)
    step0: torch.Tensor  # [N, ns] the fitted steps as stored (ggml.steps of ggml.fit)
    bias0: torch.Tensor | None  # [N, ns] <= 0, affine types; None: symmetric
    v: torch.Tensor  # [N, ns, S] learnable, in [-0.5, 0.5]
    a_s: torch.Tensor  # [N, ns] learnable step multiplier
    a_m: torch.Tensor | None  # [N, ns] learnable bias multiplier (affine types)
    amin: float

    def trainable(self) -> list[torch.Tensor]:
        return [self.v, self.a_s] + ([] if self.a_m is None else [self.a_m])

    def bounds(self) -> list[tuple]:
        return [(-0.5, 0.5)] + [(self.amin, 2 - self.amin)] * (len(self.trainable()) - 1)

    def weight(self) -> torch.Tensor:
        step, bias, _ = ggml_learned_steps(self.t, self.step0, self.bias0, self.a_s, self.a_m)
        return _layout(ggml_fake_quant(self.wg, self.v, step, bias, self.t).reshape(self.wg.shape[0], -1), self.conv1d)

    def frozen(self) -> tuple[tuple, torch.Tensor]:
        """-> ((codes [N, K], params) for GGUFLinear, ggml's dequantization of them, own layout)."""
        step, bias, params = ggml_learned_steps(self.t, self.step0, self.bias0, self.a_s, self.a_m)
        q = ggml_codes(self.wg, self.v, step, bias, self.t)
        return (q, params), _layout(ggml.dequantize(q, self.t, params), self.conv1d)


def _layout(w: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return w.t() if conv1d else w


def _init_layer(name: str, module: nn.Module, scheme: QuantScheme, init: str, amin: float) -> _Layer:
    from ..nn import linear_weight

    w = linear_weight(module).detach().float()  # [N, K]
    n, k = w.shape
    g = scheme.group_size_for(k)
    wmin, wmax = group_minmax(w, g)
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    a_lo, a_hi = torch.ones_like(wmin), torch.ones_like(wmax)
    if init == "clip":  # the searched grid's range, as multipliers of the full one
        scale, zero = clip_search_qparams(w, scheme.bits, g, scheme.sym, scheme.torch_scale_dtype, grid=scheme.clip_grid,
                                          max_shrink=scheme.clip_max_shrink, norm=scheme.clip_norm,
                                          weight_power=scheme.clip_weight_power)
        if scheme.sym:
            amax = torch.maximum(-wmin, wmax)
            a_hi = torch.where(amax > 0, scale * (2 ** (scheme.bits - 1) - 1) / amax, a_hi)
        else:
            lo, hi = -zero.float() * scale, (2**scheme.bits - 1 - zero.float()) * scale
            a_lo = torch.where(wmin < 0, lo / wmin, a_lo)
            a_hi = torch.where(wmax > 0, hi / wmax, a_hi)
    a_min = torch.minimum(torch.minimum(a_lo, a_hi), torch.full_like(a_lo, amin))
    a_max = torch.maximum(torch.maximum(a_lo, a_hi), torch.ones_like(a_lo))
    wg = pad_groups(w, g)
    return _Layer(
        name=name, param=f"{name}.weight", conv1d=not isinstance(module, nn.Linear), k=k, g=g, wg=wg,
        wmin=wmin, wmax=wmax, v=torch.zeros_like(wg).requires_grad_(), a_lo=a_lo.requires_grad_(),
        a_hi=a_hi.requires_grad_(), a_min=a_min, a_max=a_max, bits=scheme.bits, sym=scheme.sym,
        scale_dtype=scheme.torch_scale_dtype,
    )


def _init_ggml_layer(name: str, module: nn.Module, t: ggml.GGMLType, importance: torch.Tensor | None,
                     amin: float) -> _GGMLLayer:
    """The start: ggml.fit weighted by `importance` [K] (mean x_k^2 of the layer's inputs, the
    Hessian diagonal GGUF GPTQ fits against), V = 0, multipliers 1."""
    from ..nn import linear_weight

    w = linear_weight(module).detach().float()  # [N, K]
    n, k = w.shape
    step0, bias0 = ggml.steps(t, ggml.fit(w, t, importance))
    wg = w.reshape(n, k // t.sub, t.sub)
    return _GGMLLayer(
        name=name, param=f"{name}.weight", conv1d=not isinstance(module, nn.Linear), t=t, wg=wg,
        step0=step0.clone(), bias0=None if bias0 is None else bias0.clone(), v=torch.zeros_like(wg).requires_grad_(),
        a_s=torch.ones_like(step0).requires_grad_(), a_m=None if bias0 is None else torch.ones_like(bias0).requires_grad_(),
        amin=amin,
    )


def _float_inputs(obj):
    """Floating tensors inside nested containers -> float32 (kwargs such as rotary tables)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_float_inputs(o) for o in obj)
    if isinstance(obj, list):
        return [_float_inputs(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float_inputs(v) for k, v in obj.items()}
    return obj


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


# -- the engine's method ---------------------------------------------------------------------------

class AutoRound:
    """The engine's method for learned rounding: all the work happens in `prepare_block` (float
    targets, optimisation, freezing); `apply` then swaps each Linear for its packed QuantLinear."""

    collect_inputs = False

    def __init__(self, scheme: QuantScheme, names: list[str], iters: int = 200, lr: float | None = None,
                 batch_samples: int = 8, seed: int = 0, init: str = "rtn", amin: float = 0.5,
                 eval_samples: int = 8, progress: bool = True, float_targets: bool = True, amp: bool | None = None,
                 token_weighting: bool = True):
        check_autoround_args(iters, lr, batch_samples, init, amin)
        self.scheme, self.names = scheme, set(names)
        self.iters, self.lr = iters, (lr if lr is not None else default_lr(iters, self.scheme_bits()))
        self.float_targets = bool(float_targets)  # the engine then hands prepare_block the float stream's outputs
        self.amp, self.token_weighting = amp, bool(token_weighting)
        self.train_dtype: torch.dtype | None = None  # decided on the first block (training_dtype), then kept
        self._dtype_decided = False
        self.batch_samples, self.seed, self.init, self.amin = batch_samples, seed, init, amin
        self.eval_samples, self.progress = eval_samples, progress
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.report: list[dict] = []

    def collect(self, name: str, module, x: torch.Tensor) -> None:
        pass

    def record(self) -> dict:
        """What the checkpoint's method_args say of the run, once it is done."""
        return {"iters": self.iters, "lr": self.lr, "batch_samples": self.batch_samples, "seed": self.seed,
                "init": self.init, "amin": self.amin, "float_targets": self.float_targets,
                "token_weighting": self.token_weighting,
                "train_dtype": str(self.train_dtype or torch.float32).replace("torch.", "")}

    def scheme_bits(self) -> int:
        """The width the default step size follows."""
        return self.scheme.bits

    def init_layers(self, prefix: str, modules: list[tuple[str, nn.Module]], work: nn.Module, x: torch.Tensor,
                    kw) -> list:
        """The learnable state of the block's selected Linears (x [S, T, H], kw: the block's inputs)."""
        return [_init_layer(n, m, self.scheme, self.init, self.amin) for n, m in modules]

    def apply(self, name: str, module):
        from ..nn import QuantLinear

        q, scale, zero = self.frozen.pop(name)
        s = self.scheme
        return QuantLinear.from_quantized(q, scale, zero, s.bits, s.group_size_for(q.shape[1]), bias=module.bias,
                                          scale_dtype=s.torch_scale_dtype)

    def prepare_block(self, prefix: str, block: nn.Module, batches, targets=None) -> None:
        from torch.func import functional_call

        from ..nn import is_linear

        t0 = time.perf_counter()
        work = block if all(p.dtype == torch.float32 for p in block.parameters()) else copy.deepcopy(block).float()
        modules = [(n, m) for n, m in work.named_modules() if is_linear(m) and prefix + n in self.names]
        if not modules:
            return
        # inputs [S, T, H] (one sample per engine batch, stacked) and the float block's outputs
        xs, kw = [], None
        for h, k in batches():
            xs.append(h.float())
            kw = _float_inputs(k) if kw is None else kw
        x = torch.cat(xs)
        del xs
        if any(t.dim() > 0 and t.shape[0] > 1 for t in _tensors(kw)):
            raise LlmsqueezeError("autoround stacks calibration samples into minibatches: use batch_size=1 (no padding masks)")
        layers = self.init_layers(prefix, modules, work, x, kw)
        saved_grad = [p.requires_grad for p in work.parameters()]
        for p in work.parameters():
            p.requires_grad_(False)
        if targets is not None:  # the float model's block outputs on its own (float) inputs
            y = torch.cat([t.float() for t in targets()])
        else:  # the float block's outputs on the quantized model's inputs
            with torch.no_grad():
                y = torch.cat([_out(work(x[i : i + self.batch_samples], **kw))
                               for i in range(0, len(x), self.batch_samples)])
        if not self._dtype_decided:  # once per run: one decision, one warning
            self.train_dtype, self._dtype_decided = training_dtype(x.device, self.amp), True
        amp_dtype = self.train_dtype

        params = [t for L in layers for t in L.trainable()]
        bounds = [b for L in layers for b in L.bounds()]

        tw = token_weights(y) if self.token_weighting else None  # [S, T] or None

        def block_loss(xb, yb, weights, amp: bool = False, wb=None) -> torch.Tensor:
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp and amp_dtype is not None):
                out = _out(functional_call(work, weights, (xb,), kw))
            return weighted_mse(out.float(), yb, wb)

        def eval_loss(weights) -> float:
            m = min(self.eval_samples, len(x))
            with torch.no_grad():
                return sum(block_loss(x[b], y[b], weights, wb=None if tw is None else tw[b]).item() * (b.stop - b.start)
                           for b in (slice(i, min(i + self.batch_samples, m)) for i in range(0, m, self.batch_samples))) / m

        with torch.no_grad():
            loss_before = eval_loss({L.param: L.weight() for L in layers})
        start_state = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(prefix.encode()))
        best, best_state, trace = math.inf, None, []
        bar = tqdm(range(self.iters), desc=f"autoround {prefix.rstrip('.')}", disable=not self.progress,
                   leave=False, unit="it")
        bs = min(self.batch_samples, len(x))
        for t in bar:
            idx = torch.randperm(len(x), generator=gen)[:bs]
            with torch.enable_grad():  # the engine runs under no_grad
                loss = block_loss(x[idx], y[idx], {L.param: L.weight() for L in layers}, amp=True,
                                  wb=None if tw is None else tw[idx])
                loss.backward()
            lv = loss.item()
            trace.append(lv)
            if lv < best:  # the parameters that gave this loss, before the step
                best, best_state = lv, [p.detach().clone() for p in params]
            sign_sgd_step(params, self.lr * (1 - t / self.iters), bounds)
            if t % 10 == 0 or t == self.iters - 1:
                bar.set_postfix(loss=f"{lv:.3g}", best=f"{best:.3g}")
        bar.close()
        def frozen_state(state) -> tuple[dict, float]:
            """Freeze the parameters `state` to the grid -> ({name: what apply packs}, eval loss)."""
            with torch.no_grad():
                for p, b in zip(params, state):
                    p.copy_(b)
                out, weights = {}, {}
                for L in layers:  # the weight the packed layer computes with
                    out[L.name], weights[L.param] = L.frozen()
                return out, eval_loss(weights)

        frozen, loss_after = frozen_state(best_state)
        if loss_after > loss_before:  # the minibatch optimum does not generalise to the held samples: keep the start
            log.warning("autoround %s: learned grid worse than its start (%.4g > %.4g); keeping the start",
                        prefix.rstrip("."), loss_after, loss_before)
            frozen, loss_after = frozen_state(start_state)
        for p, rg in zip(work.parameters(), saved_grad):
            p.requires_grad_(rg)
        for name, v in frozen.items():
            self.frozen[prefix + name] = v
        secs = time.perf_counter() - t0
        self.report.append({"block": prefix.rstrip("."), "loss_before": loss_before, "loss_after": loss_after,
                            "best_minibatch_loss": best, "seconds": secs,
                            "minibatch_losses": trace})
        log.info("autoround %s: block output MSE %.4g -> %.4g (%d iters, %.1f s)", prefix.rstrip("."),
                 loss_before, loss_after, self.iters, secs)


class GGUFAutoRound(AutoRound):
    """Learned rounding into the GGML types of a GGUFScheme (each Linear's own type from
    scheme.layer_types): the start is ggml.fit weighted by the inputs' mean squares (as GGUF GPTQ
    fits against the Hessian diagonal), the rest is AutoRound's loop; `apply` returns a GGUFLinear
    holding the file's bytes of what was learned."""

    def __init__(self, scheme, names: list[str], init: str = "rtn", **kw):
        check_gguf_args((scheme.layer_types.get(n, "") for n in names), init)
        super().__init__(scheme, names, init=init, **kw)

    def scheme_bits(self) -> int:
        """The mix's own type (q4_k for q4_k_m, q3_k for q3_k_m): 2/iters at 3 bits and below."""
        return ggml.get_type(ggml.MIXES[self.scheme.mix].default).bits

    @torch.no_grad()
    def init_layers(self, prefix, modules, work, x, kw) -> list:
        from ..nn import linear_weight

        sums = {n: torch.zeros(linear_weight(m).shape[1], device=x.device) for n, m in modules}  # sum of x_k^2 [K]

        def hook(name):
            def pre(_, args):
                a = args[0].detach().float()
                sums[name] += a.reshape(-1, a.shape[-1]).square().sum(0)
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules]
        try:
            for i in range(0, len(x), self.batch_samples):
                work(x[i: i + self.batch_samples], **kw)
        finally:
            for h in handles:
                h.remove()
        count = x.shape[0] * x.shape[1]  # tokens
        return [_init_ggml_layer(n, m, ggml.get_type(self.scheme.layer_types[prefix + n]), sums[n] / count,
                                 self.amin) for n, m in modules]

    def apply(self, name: str, module):
        from ..nn_gguf import GGUFLinear

        q, params = self.frozen.pop(name)
        return GGUFLinear.from_codes(q, params, self.scheme.layer_types[name], bias=module.bias)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def token_weights(y: torch.Tensor) -> torch.Tensor:
    """y [S, T, H] block targets -> per-token loss weights [S, T] = min(1, (median_t ||y|| / ||y_t||)^2).

    From the middle of many LLMs on, a few tokens (the first of each sequence, an attention sink)
    carry massive activations: on SmolLM2-135M from block 11 on, token 0's norm is ~22,000 against a
    median of ~130, 98 % of the output's squared norm. A plain MSE then spends the whole optimisation
    on that one token's (absolute) error. These weights leave every ordinary token at 1 and count a
    massive one as if it had the median norm: its relative error weighs like anyone else's."""
    norms = y.float().norm(dim=-1)  # [S, T]
    med = norms.median(dim=1, keepdim=True).values  # [S, 1], per sample
    return (med / norms.clamp(min=1e-12)).square().clamp(max=1.0)


def weighted_mse(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """out, y [B, T, H]; w [B, T] or None -> sum_t w_t ||out_t - y_t||^2 / (H sum_t w_t) (the plain MSE
    when w is None or all ones)."""
    if w is None:
        return torch.nn.functional.mse_loss(out, y)
    return ((out - y).square().sum(-1) * w).sum() / (w.sum() * out.shape[-1])


def default_lr(iters: int, bits: int) -> float:
    """The sign-SGD step: 1/iters, doubled at 3 bits and below where the grid is coarser (AutoRound's
    own default)."""
    return (2.0 if bits <= 3 else 1.0) / iters


def training_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype for the optimisation's forward and backward passes: bfloat16 where the
    hardware has it (amp None: auto; 2.6x faster on a Zen 4 CPU with AVX512-BF16), else None (float32).
    The targets, the held-out losses and the frozen grid stay float32."""
    if amp is False:
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":  # native bf16 dot products (kernels.cpu): without them bf16 is the slow kind
        try:
            ok = cpu_kernels.cpu().native_bf16 and bool(
                torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            ok = False
    else:
        ok = False
    if amp and not ok:
        log.warning("amp: no bfloat16 support on %s; training in float32", device)
    return torch.bfloat16 if ok else None


OPTIONS = ("iters", "lr", "seed", "init", "batch_samples", "float_targets", "amp", "token_weighting")


def build(job) -> AutoRound:
    """The engine method for llmsqueeze.engine.Job `job` (the method table's entry point; a GGUFScheme
    gets GGUFAutoRound); its options (OPTIONS) come in job.extra. The engine hands it one calibration
    sample per batch: it stacks them into its own minibatches."""
    job.method_args = dict(job.data_args)
    cls = GGUFAutoRound if isinstance(job.scheme, GGUFScheme) else AutoRound
    return cls(job.scheme, job.names, progress=job.progress, **{k: v for k, v in job.extra.items() if k in OPTIONS})


def check_gguf_args(types, init: str) -> None:
    """One-line errors for learned rounding into GGML types (`types`: the layers' type names, or
    a mix's default type), before any work."""
    if init != "rtn":
        raise LlmsqueezeError(f"init={init!r} searches a uniform grid's range; a gguf scheme starts from ggml's own "
                              "fit of each sub-block: drop init (--autoround-init)")
    if "iq4_nl" in set(types):
        raise LlmsqueezeError("autoround learns offsets between evenly spaced levels; iq4_nl's 16 levels are not: "
                              "use --method gptq or rtn for it, or a q4_0 / q4_k mix")


def check_autoround_args(iters, lr, batch_samples, init, amin) -> None:
    """One-line errors for bad options, before any work."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise LlmsqueezeError(f"iters={iters!r} must be a positive integer, e.g. 200")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr <= 1):
        raise LlmsqueezeError(f"lr={lr!r} must lie in (0, 1] (default 1/iters, 2/iters at 3 bits and below)")
    if isinstance(batch_samples, bool) or not isinstance(batch_samples, int) or batch_samples < 1:
        raise LlmsqueezeError(f"batch_samples={batch_samples!r} must be a positive integer, e.g. 8")
    if init not in INITS:
        raise LlmsqueezeError(f"init={init!r} is not available: use one of {', '.join(INITS)}")
    if not (isinstance(amin, (int, float)) and 0 < amin <= 1):
        raise LlmsqueezeError(f"amin={amin!r} (the smallest range multiplier) must lie in (0, 1], e.g. 0.5")

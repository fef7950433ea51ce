"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For a Linear group reading X [T, K] through weights W [N, K], any s > 0 [K] gives
    X @ W^T = (X / s) @ (W * s)^T
and s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)   (eq. 4 of the paper)
evens out the per-channel ranges of the two factors, so per-token int8 activations lose less.
X / s is folded into whatever produced X, so inference costs nothing extra:
  * a norm (RMSNorm / LayerNorm) feeding q/k/v or gate/up: its weight (and bias) divided by s;
  * a Linear whose output channels feed X one to one: v_proj -> o_proj (attention mixes tokens,
    not channels; with grouped-query attention each v channel feeds `rep` o_proj columns, which share
    its scale) and up_proj -> down_proj (act(gate) * up is linear in up): its rows and bias divided by s.
alpha is searched per block on the block-output error of the quantized block (`search_alpha`).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import linear_weight


@dataclass(frozen=True)
class SmoothMap:
    """Where smoothing folds in one decoder block, relative to the block. norms: (norm, the Linears
    it feeds); linears: (producer Linear, consumer Linear); norm_offset: the norm computes
    x_hat * (offset + weight) (1 for Gemma)."""

    norms: tuple[tuple[str, tuple[str, ...]], ...]
    linears: tuple[tuple[str, str], ...] = ()
    norm_offset: float = 0.0


_LLAMA = SmoothMap(
    norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    linears=(("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")),
)
_GEMMA2 = SmoothMap(
    norms=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    linears=_LLAMA.linears, norm_offset=1.0,
)

SMOOTH_MAPS: dict[str, SmoothMap] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma": SmoothMap(_LLAMA.norms, _LLAMA.linears, norm_offset=1.0),
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "phi3": SmoothMap((("input_layernorm", ("self_attn.qkv_proj",)),
                       ("post_attention_layernorm", ("mlp.gate_up_proj",)))),  # fused: no Linear pairs
    "gpt2": SmoothMap((("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))),
    "opt": SmoothMap(
        norms=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("final_layer_norm", ("fc1",))),
        linears=(("self_attn.v_proj", "self_attn.out_proj"),),
    ),
    "gpt_neox": SmoothMap((("input_layernorm", ("attention.query_key_value",)),
                           ("post_attention_layernorm", ("mlp.dense_h_to_4h",)))),
}


# Mixtures of experts (issue 22): the post-attention norm also feeds the router, so it is not folded
# (that would change the routing unless the router's columns were scaled too); each expert's
# up_proj -> down_proj is ("*": any expert; act(gate) * up is linear in up), like the shared expert's.
# gpt-oss's clamped (up + 1) * glu is not linear in up: only its attention is balanced.
_MOE_PAIRS = (("mlp.experts.*.up_proj", "mlp.experts.*.down_proj"), ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
              ("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"), ("mlp.up_proj", "mlp.down_proj"))
_MOE = SmoothMap(norms=_LLAMA.norms[:1], linears=_LLAMA.linears[:1] + _MOE_PAIRS)
SMOOTH_MAPS.update({
    "mixtral": _MOE, "qwen2_moe": _MOE, "qwen3_moe": _MOE,
    "gpt_oss": SmoothMap(norms=_LLAMA.norms[:1], linears=_LLAMA.linears[:1]),
    "deepseek_v3": SmoothMap(  # multi-head latent attention: each low-rank projection has its norm
        norms=(("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
               ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
               ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",))),
        linears=_MOE_PAIRS),
})


def smooth_map_for(model: nn.Module) -> SmoothMap | None:
    return SMOOTH_MAPS.get(getattr(getattr(model, "config", None), "model_type", None))


# ------------------------------------------------------------------------------ pure functions
def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """act_absmax [K] (max|X_j| over calibration tokens), weight_absmax [K] (max|W_j| over the group's
    output rows) -> s [K] = act^alpha / weight^(1-alpha); 1 where either is zero (nothing to balance)."""
    a, w = act_absmax.float(), weight_absmax.float()
    ok = (a > 0) & (w > 0)
    s = a.clamp(min=1e-8).pow(alpha) / w.clamp(min=1e-8).pow(1 - alpha)
    return torch.where(ok, s.clamp(min=1e-5, max=1e5), torch.ones_like(s))


def weight_column_absmax(layers: list[nn.Module]) -> torch.Tensor:
    """max|W[:, j]| over the rows of every layer in the group -> [K]."""
    return torch.stack([linear_weight(m).detach().abs().amax(dim=0).float() for m in layers]).amax(dim=0)


@torch.no_grad()
def scale_linear_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s_j (an nn.Linear [N, K] or a GPT-2 Conv1D [K, N])."""
    w = linear_weight(layer)  # a view on the stored weight
    w.mul_(s.to(w.dtype)[None, :])


@torch.no_grad()
def scale_linear_outputs(layer: nn.Module, s: torch.Tensor) -> None:
    """W[i, :] /= s_i and b_i /= s_i."""
    w = linear_weight(layer)
    w.div_(s.to(w.dtype)[:, None])
    if getattr(layer, "bias", None) is not None:
        layer.bias.div_(s.to(layer.bias.dtype))


@torch.no_grad()
def scale_norm(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """The norm's output divided by s: (offset + w) / s - offset, and bias / s (LayerNorm)."""
    w = norm.weight
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def gqa_index(producer_out: int, consumer_in: int, head_dim: int | None) -> torch.Tensor | None:
    """For v_proj -> o_proj: the v channel [consumer_in] that feeds each o_proj input column (query
    head h reads kv head h // rep); None when the widths do not fit that pattern."""
    if producer_out == consumer_in:
        return torch.arange(consumer_in)
    if not head_dim or consumer_in % producer_out or producer_out % head_dim:
        return None
    rep, n_kv = consumer_in // producer_out, producer_out // head_dim
    heads = torch.arange(n_kv * rep) // rep  # kv head of each query head
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


# ------------------------------------------------------------------------------ one block
def linear_pair_plan(block: nn.Module, smap: SmoothMap) -> list[tuple[str, str, torch.Tensor]]:
    """The Linear pairs of `smap` that exist in this block with compatible widths, each with the
    producer channel of every consumer input column."""
    plan = []
    for prod, cons in _expand_experts(block, smap.linears):
        try:
            p, c = block.get_submodule(prod), block.get_submodule(cons)
        except AttributeError:
            continue
        n_out, k_in = linear_weight(p).shape[0], linear_weight(c).shape[1]
        parent = block.get_submodule(prod.rpartition(".")[0]) if "." in prod else block
        idx = gqa_index(n_out, k_in, getattr(parent, "head_dim", None))
        if idx is not None:
            plan.append((prod, cons, idx))
    return plan


def _expand_experts(block: nn.Module, pairs) -> list[tuple[str, str]]:
    """(producer, consumer) pairs with "*" (a MoE expert's index) expanded to every expert present."""
    out = []
    for prod, cons in pairs:
        if "*" not in prod:
            out.append((prod, cons))
            continue
        pattern = re.compile(re.escape(prod).replace(r"\*", r"(\d+)") + "$")
        for name, _ in block.named_modules():
            m = pattern.match(name)
            if m:
                out.append((name, cons.replace("*", m.group(1))))
    return out


def input_names(block: nn.Module, smap: SmoothMap, pairs: bool) -> list[str]:
    """The Linears whose input statistics smoothing needs (the first reader of each norm, and each consumer)."""
    names = [linears[0] for _, linears in smap.norms]
    if pairs:
        names += [cons for _, cons, _ in linear_pair_plan(block, smap)]
    return names


@torch.no_grad()
def smooth_block(block: nn.Module, smap: SmoothMap, act_absmax: dict[str, torch.Tensor], alpha: float,
                 pairs: bool = True) -> dict[str, torch.Tensor]:
    """Fold the smoothing for `alpha` into the block in place. act_absmax: per input channel max|x|
    of the Linears named by `input_names`. Returns the scale applied before each smoothed Linear
    (keyed by every Linear that now reads x / s), for static activation scales."""
    applied: dict[str, torch.Tensor] = {}
    for norm_name, linears in smap.norms:
        try:
            norm = block.get_submodule(norm_name)
            layers = [block.get_submodule(n) for n in linears]
        except AttributeError:
            continue
        s = smoothing_scales(act_absmax[linears[0]].to(norm.weight.device), weight_column_absmax(layers), alpha)
        scale_norm(norm, s, smap.norm_offset)
        for n, m in zip(linears, layers):
            scale_linear_inputs(m, s)
            applied[n] = s
    if pairs:
        for prod, cons, idx in linear_pair_plan(block, smap):
            if cons not in act_absmax:  # a MoE expert no calibration token reached: nothing to balance
                continue
            p, c = block.get_submodule(prod), block.get_submodule(cons)
            n_out = linear_weight(p).shape[0]
            idx = idx.to(linear_weight(c).device)
            # per producer channel: the max over the consumer columns it feeds
            a = torch.zeros(n_out, device=idx.device).scatter_reduce(
                0, idx, act_absmax[cons].float().to(idx.device), "amax")
            wmax = torch.zeros(n_out, device=idx.device).scatter_reduce(
                0, idx, linear_weight(c).detach().abs().amax(dim=0).float(), "amax")
            s = smoothing_scales(a, wmax, alpha)
            scale_linear_outputs(p, s)
            scale_linear_inputs(c, s[idx])
            applied[cons] = s[idx]
    return applied


def collect_input_absmax(block: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """Per input channel max|x| [K] of each named Linear over one pass `run()` of the block."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(module, args, out, n=n):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[n] = m if n not in stats else torch.maximum(stats[n], m)

        handles.append(block.get_submodule(n).register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def search_alpha(block: nn.Module, smap: SmoothMap, act_absmax: dict[str, torch.Tensor], grid: list[float],
                 pairs: bool, quantize_block, inputs: list, targets: list[torch.Tensor],
                 refine: list[float] = ()) -> tuple[float, dict[float, float]]:
    """The alpha whose smoothed-then-quantized copy of `block` gives the least squared error against
    `targets` (the float block's outputs) on `inputs` [(hidden, kwargs)]: the best of `grid`, then
    best +- step for each step of `refine` (coarse to fine: the error is close to unimodal in alpha).
    quantize_block(copy, applied_scales) turns the copy's Linears into their W8A8 form in place.
    Returns (alpha, {alpha tried: error})."""
    from ..engine import block_output

    errors: dict[float, float] = {}

    def error(alpha: float) -> None:
        alpha = round(float(alpha), 4)
        if alpha in errors or not 0 <= alpha <= 1:
            return
        trial = copy.deepcopy(block)
        applied = smooth_block(trial, smap, act_absmax, alpha, pairs)
        quantize_block(trial, applied)
        err = 0.0
        for (h, kw), ref in zip(inputs, targets):
            out = block_output(trial(h, **kw)).float()
            err += (out - ref).pow(2).sum().item()
        errors[alpha] = err

    for a in grid:
        error(a)
    best = min(errors, key=errors.get)
    for step in refine:
        error(best - step)
        error(best + step)
        best = min(errors, key=errors.get)
    return best, errors

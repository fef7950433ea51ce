"""Structured pruning of MLP channels: remove the same number of intermediate channels from every
block's MLP, so the model is physically smaller and its config just has a smaller intermediate size.
The result is a plain transformers model (saved with save_pretrained, loaded without llmsqueeze).

A channel j of a gated MLP is the row j of gate/up and the column j of down:
    y = down[:, j] * act(gate[j] . x) * (up[j] . x), summed over j.
Scores (higher = kept):
  * "l2": ||gate[j]|| * ||up[j]|| * ||down[:, j]|| (no data; for two-layer MLPs ||fc1[j]|| * ||fc2[:, j]||);
  * "activation": ||h_j||_2 over the calibration tokens * ||down[:, j]||, with h the input of down
    (Wanda's |w|*||x|| summed over a channel's whole output column).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import LlmsqueezeError

log = logging.getLogger("llmsqueeze")

# model_type -> (Linears that produce the channels, the Linear that consumes them, config field)
MLP_LAYOUT = {
    **{t: (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "opt": (("fc1",), "fc2", "ffn_dim"),
    "gpt_neox": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "intermediate_size"),
}


def check_ratio(ratio: float, width: int | None = None) -> int | None:
    """ratio: fraction of MLP channels kept, in (0, 1]; -> channels kept of `width`."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise LlmsqueezeError(f"--mlp-ratio {ratio!r} must lie in (0, 1]: the fraction of MLP channels kept, e.g. 0.75")
    if width is None:
        return None
    kept = int(round(ratio * width))
    if kept < 1:
        raise LlmsqueezeError(f"--mlp-ratio {ratio} keeps no channel of {width}: use a ratio >= {1 / width:.3g}")
    return kept


def check_structured(config, mlp_ratio: float) -> int:
    """Before loading any weights: the model type is supported and the ratio keeps a channel -> kept."""
    layout = MLP_LAYOUT.get(getattr(config, "model_type", None))
    if layout is None:
        raise LlmsqueezeError(
            f"structured MLP pruning knows {', '.join(sorted(MLP_LAYOUT))}; {config.model_type!r} is not one "
            "(fused or Conv1D MLPs): add a row to llmsqueeze.pruning.structured.MLP_LAYOUT"
        )
    return check_ratio(mlp_ratio, getattr(config, layout[2]))


def _layout(model: nn.Module):
    from ..models import get_arch

    layout = MLP_LAYOUT.get(getattr(model.config, "model_type", None))
    if layout is None:
        raise LlmsqueezeError(
            f"structured MLP pruning knows {', '.join(sorted(MLP_LAYOUT))}; {model.config.model_type!r} is not one "
            "(fused or Conv1D MLPs): add a row to llmsqueeze.pruning.structured.MLP_LAYOUT"
        )
    return model.get_submodule(get_arch(model).blocks), layout


def l2_scores(producers: list[nn.Linear], consumer: nn.Linear) -> torch.Tensor:
    """-> [I]: product of the channel's weight norms (rows of the producers, column of the consumer)."""
    s = consumer.weight.detach().float().norm(dim=0)  # [I]
    for p in producers:
        s = s * p.weight.detach().float().norm(dim=1)
    return s


@torch.no_grad()
def activation_sq_norms(model: nn.Module, data: torch.Tensor, batch_size: int = 1, consumer: str | None = None
                        ) -> list[torch.Tensor]:
    """Sum over the calibration tokens of h_j^2, h the input of each block's `consumer` (default: the
    MLP's down projection) -> [width] per block. One forward of the whole model per batch."""
    blocks, layout = _layout(model)
    consumer = consumer or layout[1]
    sums: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):
        def hook(module, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            s = x.pow(2).sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s

        handles.append(b.get_submodule(consumer).register_forward_pre_hook(hook))
    try:
        for ids in data.long().split(batch_size):
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def _slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the outputs (dim 0) or inputs (dim 1) listed in `keep`."""
    w = layer.weight.detach().index_select(dim, keep)
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if layer.bias is not None:
        new.bias.data.copy_(layer.bias.detach() if dim == 1 else layer.bias.detach()[keep])
    return new


@torch.no_grad()
def prune_mlp_channels(model: nn.Module, mlp_ratio: float, score: str = "activation", data: torch.Tensor | None = None,
                       progress: bool = False) -> nn.Module:
    """Keep round(mlp_ratio * I) channels of every block's MLP (the highest-scoring, in their original
    order) and set the config's intermediate size to that; in place, returns the model."""
    from ..nn import set_module

    blocks, (producers, consumer, field) = _layout(model)
    width = getattr(model.config, field)
    kept = check_ratio(mlp_ratio, width)
    if score not in ("l2", "activation"):
        raise LlmsqueezeError(f"structured score {score!r}: use l2 or activation")
    if score == "activation" and data is None:
        raise LlmsqueezeError("the activation score needs calibration data: pass data= token ids [n_samples, seq_len]")
    sq = activation_sq_norms(model, data) if score == "activation" else None
    for i, b in enumerate(blocks):
        prods = [b.get_submodule(p) for p in producers]
        cons = b.get_submodule(consumer)
        if score == "l2":
            s = l2_scores(prods, cons)
        else:
            s = sq[i].sqrt() * cons.weight.detach().float().norm(dim=0)
        keep = torch.topk(s, kept).indices.sort().values  # [kept], original order
        for name, p in zip(producers, prods):
            set_module(b, name, _slice_linear(p, keep, 0))
        set_module(b, consumer, _slice_linear(cons, keep, 1))
    setattr(model.config, field, kept)
    log.info("structured: kept %d of %d MLP channels in %d blocks (%s score)", kept, width, len(blocks), score)
    return model


def save_structured(model: nn.Module, out, tokenizer=None, overwrite: bool = False):
    """A plain transformers checkpoint (no quantization_config): loads without llmsqueeze."""
    from ..formats.writer import save_model_dir

    return save_model_dir(model, out, tokenizer, overwrite)


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


@torch.no_grad()
def prune_attention_groups(model: nn.Module, attn_ratio: float, score: str = "activation",
                           data: torch.Tensor | None = None) -> nn.Module:
    """Keep round(attn_ratio * G) of the G key/value groups of every block (each group: one K and one V
    head and the H/G query heads that read them), ranked by sum over the group's o_proj input columns c
    of ||x_c|| * ||o_proj[:, c]|| ("activation") or ||o_proj[:, group]|| * ||v_proj[group]|| ("l2").
    Llama-like models; the config gets the new head counts and an explicit head_dim."""
    from ..nn import set_module

    blocks, layout = _layout(model)
    if layout[1] != "mlp.down_proj":
        raise LlmsqueezeError(f"attention-group pruning supports Llama-like models, not {model.config.model_type!r}")
    cfg = model.config
    heads, groups = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    r = heads // groups
    if isinstance(attn_ratio, bool) or not (0 < attn_ratio <= 1):
        raise LlmsqueezeError(f"--attn-ratio {attn_ratio!r} must lie in (0, 1]: the fraction of key/value groups kept")
    kept = int(round(attn_ratio * groups))
    if kept < 1:
        raise LlmsqueezeError(f"--attn-ratio {attn_ratio} keeps no key/value group of {groups}: use >= {1 / groups:.3g}")
    if score == "activation" and data is None:
        raise LlmsqueezeError("the activation score needs calibration data: pass data= token ids [n_samples, seq_len]")
    sq = activation_sq_norms(model, data, consumer="self_attn.o_proj") if score == "activation" else None
    for i, b in enumerate(blocks):
        q, k, v, o = (b.get_submodule(n) for n in ATTN)
        o_cols = o.weight.detach().float().norm(dim=0)  # [H*d]
        if score == "activation":
            s = (sq[i].sqrt() * o_cols).view(groups, r * d).sum(1)
        else:
            s = o.weight.detach().float().view(-1, groups, r * d).norm(dim=(0, 2)) * \
                v.weight.detach().float().view(groups, -1).norm(dim=1)
        keep_g = torch.topk(s, kept).indices.sort().values  # [kept]
        kv_rows = (keep_g[:, None] * d + torch.arange(d)).reshape(-1)
        q_rows = (keep_g[:, None] * (r * d) + torch.arange(r * d)).reshape(-1)
        set_module(b, ATTN[0], _slice_linear(q, q_rows, 0))
        set_module(b, ATTN[1], _slice_linear(k, kv_rows, 0))
        set_module(b, ATTN[2], _slice_linear(v, kv_rows, 0))
        set_module(b, ATTN[3], _slice_linear(o, q_rows, 1))
    cfg.head_dim = d
    cfg.num_attention_heads, cfg.num_key_value_heads = kept * r, kept
    log.info("structured: kept %d of %d key/value groups (%d query heads) in %d blocks", kept, groups, kept * r, len(blocks))
    return model

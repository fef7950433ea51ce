"""Where things live in each architecture, as data. Adding a family is adding a row; anything not
in the table goes through `generic_arch`, which finds the decoder blocks by shape."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import LlmsqueezeError, QuantScheme
from .nn import is_linear, linear_weight

_LLAMA_ORDER = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Arch:
    """blocks: dotted path of the ModuleList of decoder blocks; embeddings: input embedding modules;
    lm_head: the output head; sequential: the Linears of one block in the order calibration visits
    them (groups that read the same input together), relative to the block."""

    blocks: str
    embeddings: tuple[str, ...]
    lm_head: str = "lm_head"
    sequential: tuple[tuple[str, ...], ...] = ()


ARCHS: dict[str, Arch] = {
    "llama": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "mistral": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "qwen2": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "qwen3": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "gemma": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "gemma2": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "gemma3_text": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER),
    "phi3": Arch(
        "model.layers",
        ("model.embed_tokens",),
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "gpt2": Arch(
        "transformer.h",
        ("transformer.wte", "transformer.wpe"),
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
    "opt": Arch(
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "gpt_neox": Arch(
        "gpt_neox.layers",
        ("gpt_neox.embed_in",),
        lm_head="embed_out",
        sequential=(
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
}


# Modules kept dense whatever the scheme selects (regexes on the full module name): MoE routers and
# gates, which choose the experts (Mixtral's block_sparse_moe.gate, Qwen2/3-MoE's mlp.gate, Qwen2-MoE's
# 64 -> 1 mlp.shared_expert_gate, routers named router): a few weights whose rounding changes which
# experts run. `info` lists them beside the other dense modules.
KEPT_DENSE = (r"(^|\.)gate$", r"(^|\.)shared_expert_gate$", r"(^|\.)router$")


def kept_dense(name: str) -> bool:
    """Whether the module `name` is a router or gate that stays dense (KEPT_DENSE)."""
    return any(re.search(p, name) for p in KEPT_DENSE)


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def generic_arch(model: nn.Module) -> Arch:
    """Find the decoder blocks as the longest ModuleList of identical blocks that contain Linears."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            same = len({type(b) for b in module}) == 1
            has_linear = any(is_linear(m) for m in module[0].modules())
            if same and has_linear and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise LlmsqueezeError(
            f"cannot find the decoder blocks of {type(model).__name__}: it has no list of repeated blocks "
            "with Linear layers; pass a causal LM (e.g. LlamaForCausalLM) or add a row to llmsqueeze.models.ARCHS"
        )
    emb = _name_of(model, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    head = _name_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    return Arch(best[0], (emb,) if emb else (), head or "lm_head")


def get_arch(model: nn.Module) -> Arch:
    """The table row for this model's `config.model_type` (if its paths exist), else the generic one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is not None:
        try:
            model.get_submodule(arch.blocks)
            return arch
        except AttributeError:
            pass  # e.g. a base model without the head wrapper: fall back to the search
    return generic_arch(model)


def quantizable_modules(model: nn.Module, scheme: QuantScheme) -> list[str]:
    """Names of the layers the scheme quantizes, in model order."""
    arch = get_arch(model)
    prefix = arch.blocks + "."
    names = [n for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m) and not kept_dense(n)]
    dense = moe_dense_names(model)  # MoE routers that are Linears stay dense
    names = [n for n in names if n not in dense]
    if scheme.lm_head:
        head = _name_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
        head = head or arch.lm_head
        try:
            if is_linear(model.get_submodule(head)):
                names.append(head)
        except AttributeError:
            raise LlmsqueezeError(f"lm_head=True but {type(model).__name__} has no output head named {head!r}") from None
    if scheme.include:
        names = [n for n in names if any(re.search(p, n) for p in scheme.include)]
    if scheme.exclude:
        names = [n for n in names if not any(re.search(p, n) for p in scheme.exclude)]
    return names


def selected_layers(model: nn.Module, scheme) -> tuple[list[str], str | None]:
    """quantizable_modules, with an empty selection refused in one line -> (names, the output head's
    name when the selection holds it, else None: the caller unties it from the embeddings)."""
    names = quantizable_modules(model, scheme)
    if not names:
        raise LlmsqueezeError(f"no layer of {type(model).__name__} matches include={scheme.include} "
                              f"exclude={scheme.exclude}: loosen the patterns")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n in names if head is not None and model.get_submodule(n) is head), None)
    return names, head_name


# HF module (relative to a decoder block) -> llama.cpp's tensor base name (convert_hf_to_gguf's
# blk.{i}.<name>.weight), for the families whose blocks use these names
GGUF_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_role(model: nn.Module, name: str) -> tuple[str, int] | None:
    """(llama.cpp base name, block index) of a Linear inside the decoder blocks, or None when the
    module is not one llama.cpp names. (Family-specific names of norms, e.g. gemma's post_attention_norm,
    are the exporter's: formats/gguf.ARCHS.)"""
    arch = get_arch(model)
    prefix = arch.blocks + "."
    if not name.startswith(prefix):
        return None
    idx, _, rest = name[len(prefix):].partition(".")
    base = GGUF_BLOCK_TENSORS.get(rest)
    if base is None or not idx.isdigit():
        return None
    return base, int(idx)


def gguf_layer_types(model: nn.Module, names: list[str], scheme) -> dict[str, str]:
    """The GGML type of each selected Linear under a GGUFScheme: llama-quantize's choice for its role,
    block and width (quant/ggml.mix_type), or with scheme.pure the mix's type for all (with its fallback),
as llama-quantize --pure."""
    from .quant.ggml import mix_type

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = len(model.get_submodule(get_arch(model).blocks))
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    n_gqa = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for n in names:
        module = model.get_submodule(n)
        ncols = linear_weight(module).shape[1]
        role = gguf_role(model, n)
        if module is head:
            role = ("output", 0)
        elif role is None:
            raise LlmsqueezeError(f"gguf: {n} is not a tensor llama.cpp names (attn_q, ffn_down, ...); exclude it "
                                  "(--exclude) or quantize with another scheme")
        out[n] = mix_type(scheme.mix, "other" if scheme.pure else role[0], role[1], n_layers,
                          ncols, n_gqa, tied, scheme.imatrix_rules)
        if out[n] == "f16":
            raise LlmsqueezeError(f"gguf: {n} has {ncols} inputs, which no GGML block type divides; exclude it (--exclude)")
    return out


def all_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear(m)]


def untie_lm_head(model: nn.Module, head_name: str) -> None:
    """Give the output head its own weight so it can be quantized while the embeddings stay dense."""
    head = model.get_submodule(head_name)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False


# =============================================================================================
# Mixtures of experts (issue 22). transformers 5 keeps a MoE layer's experts as one module with
# fused 3-D parameters, built at load time from the per-expert tensors of the checkpoint (its
# conversion_mapping.py: Mixtral's block_sparse_moe.experts.{e}.w1/w3 -> mlp.experts.gate_up_proj,
# w2 -> down_proj; Qwen2-MoE's, also used for Qwen3-MoE and DeepSeek-V3, mlp.experts.{e}.gate_proj/
# up_proj -> gate_up_proj, down_proj -> down_proj; gpt-oss stores the fused tensors on disk).
# llmsqueeze splits each such module into nn_moe.MoEExperts, one gate/up/down Linear per expert
# (named <experts>.<e>.gate_proj ...), so every method and the checkpoint see the experts as Linears.
# =============================================================================================
EXPERT_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoELayout:
    """Where one family's MoE layers live, relative to a decoder block, and how its experts are fused.

    experts: the fused experts module (blocks without it, e.g. DeepSeek's first dense layers, are
    plain MLPs); router: the module that picks the experts (never quantized: a weight Parameter, not
    a Linear); shared: shared-expert MLPs (ordinary Linears, quantized like any MLP); dense: Linears
    kept dense (Qwen2-MoE's one-output shared_expert_gate, a router of its own);
    gate_up: "concat" (gate_up_proj rows: the gate's I rows, then the up's) or "interleaved" (gpt-oss:
    gate, up, gate, up ...); transposed: the fused weights are [E, in, out] (gpt-oss) rather than
    [E, out, in]; bias: gate_up_proj_bias [E, 2I] and down_proj_bias [E, H] (gpt-oss); activation:
    nn_moe's "glu" (act_fn(gate) * up) or "clamped_swiglu" (gpt-oss, with the module's alpha, limit);
    disk: each role's per-expert tensor name in the family's checkpoints, relative to the block, {e}
    the expert (None: the fused tensors themselves are on disk, under the module's names)."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    shared: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    gate_up: str = "concat"
    transposed: bool = False
    bias: bool = False
    activation: str = "glu"
    disk: dict | None = None


_PER_EXPERT_DISK = {r: f"mlp.experts.{{e}}.{r}.weight" for r in EXPERT_ROLES}

MOE_LAYOUTS: dict[str, MoELayout] = {
    "mixtral": MoELayout(disk={"gate_proj": "block_sparse_moe.experts.{e}.w1.weight",
                               "up_proj": "block_sparse_moe.experts.{e}.w3.weight",
                               "down_proj": "block_sparse_moe.experts.{e}.w2.weight"}),
    "qwen2_moe": MoELayout(shared=("mlp.shared_expert",), dense=("mlp.shared_expert_gate",), disk=_PER_EXPERT_DISK),
    "qwen3_moe": MoELayout(disk=_PER_EXPERT_DISK),
    "gpt_oss": MoELayout(router="mlp.router", gate_up="interleaved", transposed=True, bias=True,
                         activation="clamped_swiglu"),
    "deepseek_v3": MoELayout(shared=("mlp.shared_experts",), disk=_PER_EXPERT_DISK),
}

# calibration order of a MoE block (true-sequential): "*" stands for any expert
_MOE_MLP_ORDER = (
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
     "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.gate_proj", "mlp.up_proj"),
    ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", "mlp.shared_experts.down_proj", "mlp.down_proj"),
)
ARCHS.update({
    "mixtral": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER[:2] + _MOE_MLP_ORDER),
    "qwen2_moe": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER[:2] + _MOE_MLP_ORDER),
    "qwen3_moe": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER[:2] + _MOE_MLP_ORDER),
    "gpt_oss": Arch("model.layers", ("model.embed_tokens",), sequential=_LLAMA_ORDER[:2] + _MOE_MLP_ORDER),
    "deepseek_v3": Arch(
        "model.layers", ("model.embed_tokens",),
        sequential=(("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
                    ("self_attn.kv_b_proj",), ("self_attn.o_proj",)) + _MOE_MLP_ORDER),
})


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def split_fused(layout: MoELayout, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Fused experts -> {role: (weight [E, out, in], bias [E, out] or None)}: gate and up [E, I, H],
    down [E, H, I], the layout of nn.Linear. gate_up [E, 2I, H] ([E, H, 2I] transposed), down
    [E, H, I] ([E, I, H] transposed)."""
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if layout.gate_up == "interleaved":
        parts = (gate_up[:, 0::2], gate_up[:, 1::2])
        bparts = (None, None) if gate_up_bias is None else (gate_up_bias[:, 0::2], gate_up_bias[:, 1::2])
    else:
        i = gate_up.shape[1] // 2
        parts = (gate_up[:, :i], gate_up[:, i:])
        bparts = (None, None) if gate_up_bias is None else (gate_up_bias[:, :i], gate_up_bias[:, i:])
    return {"gate_proj": (parts[0], bparts[0]), "up_proj": (parts[1], bparts[1]), "down_proj": (down, down_bias)}


def fuse_experts(layout: MoELayout, per_role: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """The inverse of split_fused: {role: (weight [E, out, in], bias)} -> the fused module's tensors
    {"gate_up_proj", "down_proj"(, "gate_up_proj_bias", "down_proj_bias")}."""
    (g, gb), (u, ub), (d, db) = (per_role[r] for r in EXPERT_ROLES)
    if layout.gate_up == "interleaved":
        gate_up = torch.stack((g, u), dim=2).flatten(1, 2)  # [E, 2I, H]: rows gate0, up0, gate1, ...
        bias = None if gb is None else torch.stack((gb, ub), dim=2).flatten(1, 2)
    else:
        gate_up = torch.cat((g, u), dim=1)
        bias = None if gb is None else torch.cat((gb, ub), dim=1)
    out = {"gate_up_proj": gate_up.transpose(1, 2) if layout.transposed else gate_up,
           "down_proj": d.transpose(1, 2) if layout.transposed else d}
    if bias is not None:
        out.update(gate_up_proj_bias=bias, down_proj_bias=db)
    return out


def _generic_layout(module: nn.Module, rel: str) -> MoELayout | None:
    """A fused experts module of a family not in MOE_LAYOUTS, read from the flags transformers'
    @use_experts_implementation puts on it: only the plain gated MLP (act_fn(gate) * up)."""
    from transformers.integrations import moe as hf_moe

    flags = ("is_transposed", "is_concatenated", "has_bias", "has_gate")
    if not all(hasattr(module, f) for f in flags) or not module.has_gate or module.has_bias:
        return None
    if getattr(type(module), "_apply_gate", None) is not hf_moe._default_apply_gate or not hasattr(module, "act_fn"):
        return None
    return MoELayout(experts=rel, gate_up="concat" if module.is_concatenated else "interleaved",
                     transposed=bool(module.is_transposed), disk={r: f"{rel}.{{e}}.{r}.weight" for r in EXPERT_ROLES})


def _fused_experts(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of a block holding 3-D expert weights (gate_up_proj / down_proj)."""
    out = []
    for n, m in block.named_modules():
        p = m._parameters.get("down_proj")
        if p is not None and p.dim() == 3:
            out.append((n, m))
    return out


def moe_layouts(model: nn.Module) -> dict[str, MoELayout]:
    """{experts module name: its layout} for every MoE layer of `model` (fused or already split);
    fused experts that no row nor the generic reading describes are refused in one line."""
    from .nn_moe import MoEExperts

    arch = get_arch(model)
    row = MOE_LAYOUTS.get(_model_type(model))
    out = {}
    for i, block in enumerate(model.get_submodule(arch.blocks)):
        for rel, module in _fused_experts(block) + [(n, m) for n, m in block.named_modules() if isinstance(m, MoEExperts)]:
            layout = row if row is not None and rel == row.experts else _generic_layout(module, rel)
            if layout is None and isinstance(module, MoEExperts):
                layout = row or MoELayout(experts=rel)
            if layout is None:
                raise LlmsqueezeError(
                    f"{_model_type(model)}: {arch.blocks}.{i}.{rel} ({type(module).__name__}) holds fused 3-D expert "
                    "weights llmsqueeze cannot read (not in llmsqueeze.models.MOE_LAYOUTS, and not a plain gated MLP); "
                    "add a MoELayout row for the family")
            out[f"{arch.blocks}.{i}.{rel}"] = layout
    return out


def split_fused_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` by an nn_moe.MoEExperts holding the same
    weights as per-expert Linears (on the meta device too: an empty skeleton stays empty), in
    place; -> the names of the modules replaced. Idempotent."""
    from .nn import set_module
    from .nn_moe import MoEExperts, linear_from

    done = []
    for name, layout in moe_layouts(model).items():
        fused = model.get_submodule(name)
        if isinstance(fused, MoEExperts):
            continue
        p = fused._parameters
        parts = split_fused(layout, p["gate_up_proj"], p["down_proj"], p.get("gate_up_proj_bias"), p.get("down_proj_bias"))
        n_exp, inter, hidden = parts["gate_proj"][0].shape
        moe = MoEExperts(n_exp, hidden, inter, layout.activation, act_fn=getattr(fused, "act_fn", None),
                         alpha=getattr(fused, "alpha", None), limit=getattr(fused, "limit", None),
                         bias=layout.bias, dtype=p["down_proj"].dtype, device="meta")
        grad = p["down_proj"].requires_grad
        for e in range(n_exp):
            expert = moe.expert(e)
            for role, (w, b) in parts.items():
                copy = (lambda t: t[e].clone()) if not w.is_meta else (lambda t: torch.empty_like(t[e]))
                setattr(expert, role, linear_from(copy(w), None if b is None else copy(b), grad))
        set_module(model, name, moe)
        done.append(name)
    return done


def moe_dense_names(model: nn.Module) -> set[str]:
    """Linears the MoE layouts keep dense (Qwen2-MoE's shared_expert_gate), full names."""
    row = MOE_LAYOUTS.get(_model_type(model))
    if row is None or not row.dense:
        return set()
    prefix = get_arch(model).blocks + "."
    return {n for n, _ in model.named_modules()
            if n.startswith(prefix) and n[len(prefix):].partition(".")[2] in row.dense}


def fused_part(layout: MoELayout, fused: torch.Tensor, e: int, role: str) -> torch.Tensor:
    """Expert e's `role` part of one fused tensor as nn.Linear holds it: from gate_up_proj [E, 2I, H]
    ([E, H, 2I] transposed) gate or up [I, H]; from down_proj [E, H, I] ([E, I, H]) down [H, I];
    from the biases gate_up_proj_bias [E, 2I] / down_proj_bias [E, H] the [I] or [H] bias."""
    t = fused[e]
    if t.dim() == 2 and layout.transposed:
        t = t.t()
    if role != "down_proj":
        i = t.shape[0] // 2
        if layout.gate_up == "interleaved":
            t = t[0::2] if role == "gate_proj" else t[1::2]
        else:
            t = t[:i] if role == "gate_proj" else t[i:]
    return t.clone(memory_format=torch.contiguous_format)  # its own storage: the fused tensor can be freed


def expert_disk_sources(model: nn.Module) -> dict[str, list[tuple]]:
    """Where each per-expert tensor of `model` (split, on any device) may come from in a dense
    checkpoint, in the order to try: {model tensor name: [("tensor", key), ("fused", key, e, role,
    layout)]}; keys are model tensor names (the loader adds or drops the base model's prefix).
    "tensor": the family's per-expert name on disk; "fused": fused_part(layout, <key>, e, role)."""
    out = {}
    for name, layout in moe_layouts(model).items():
        block = name[: len(name) - len(layout.experts) - 1]
        moe = model.get_submodule(name)
        for e in range(moe.num_experts):
            for role in EXPERT_ROLES:
                for what in ("weight", "bias") if layout.bias else ("weight",):
                    options = []
                    if layout.disk is not None and what == "weight":
                        options.append(("tensor", f"{block}.{layout.disk[role].format(e=e)}"))
                    fused = ("down_proj" if role == "down_proj" else "gate_up_proj") + ("_bias" if what == "bias" else "")
                    options.append(("fused", f"{name}.{fused}", e, role, layout))
                    out[f"{name}.{e}.{role}.{what}"] = options
    return out

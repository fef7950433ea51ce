"""Where things live in each architecture, as data. Adding a family is adding a row; anything not
in the table goes through `generic_arch`, which finds the decoder blocks by shape."""
from __future__ import annotations

import re
from dataclasses import dataclass

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

"""GGUF files (llama.cpp, Ollama, LM Studio): what both directions share (the families written and
read, llama.cpp's tensor names, llama's q/k row order) and the import: a .gguf file loaded with its
quantized Linears kept as GGUFLinear blocks (`load`). The export is formats/gguf_export.py."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import LlmsqueezeError
from ..quant import ggml


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter writes a family: its GGUF architecture name; whether q/k rows are
    permuted for ggml's rope (llama); norm_shift added to every norm weight (gemma's norms compute
    (1 + w), llama.cpp's w); `tensors`, overrides of models.GGUF_BLOCK_TENSORS."""

    name: str
    permute: bool = False
    norm_shift: float = 0.0
    tensors: dict[str, str] = field(default_factory=dict)


_GEMMA_NORMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
ARCHS = {  # model_type -> GGUFArch
    "llama": GGUFArch("llama", permute=True), "mistral": GGUFArch("llama", permute=True),
    "qwen2": GGUFArch("qwen2"), "qwen3": GGUFArch("qwen3"),
    "gemma2": GGUFArch("gemma2", norm_shift=1.0, tensors=_GEMMA_NORMS),
    "gemma3_text": GGUFArch("gemma3", norm_shift=1.0, tensors=_GEMMA_NORMS),
    "phi3": GGUFArch("phi3"),
}

# model-level tensors (HF name without the leading "model.") -> GGUF name
GLOBAL_TENSORS = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}


# ------------------------------------------------------------------------------- tensors
def permute_rows(n_rows: int, heads: int) -> torch.Tensor:
    """The row order of convert_hf_to_gguf's permute for q (heads) or k (kv heads): within each head,
    the two rotary halves interleaved."""
    idx = torch.arange(n_rows).view(heads, 2, n_rows // heads // 2)
    return idx.transpose(1, 2).reshape(-1)


def gguf_name(hf: str, block_path: str, block_tensors: dict[str, str], arch: GGUFArch | None = None) -> str | None:
    """HF tensor name -> GGUF tensor name (None: not written)."""
    prefix = block_path + "."
    if hf.startswith(prefix):
        idx, _, rest = hf[len(prefix):].partition(".")
        mod, _, kind = rest.rpartition(".")
        base = (arch.tensors if arch is not None else {}).get(mod) or block_tensors.get(mod)
        return None if base is None else f"blk.{idx}.{base}.{kind}"
    short = hf.removeprefix("model.")
    return GLOBAL_TENSORS.get(short)


# ------------------------------------------------------------------------------- import
def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A .gguf file -> a causal LM whose block Linears are GGUFLinear layers holding the file's bytes
    (not dequantized: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL; llama's q/k rows un-permuted,
    whole rows); F32/F16/BF16 Linears, the embeddings, norms and head are read dense in `dtype`. The
    config comes from transformers' GGUF reader (families: llama, qwen2, qwen3). save_quantized
    writes it as a GGUFScheme checkpoint, and export --format gguf writes the same tensors back."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ..config import CheckpointError, GGUFScheme
    from ..models import GGUF_BLOCK_TENSORS, all_linear_names, get_arch
    from ..nn import set_module
    from ..nn_gguf import GGUFLinear
    from .native import quantization_config

    path = Path(path).expanduser()
    try:
        reader = gguf.GGUFReader(str(path))
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read {path} as GGUF ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "pass a .gguf file llama.cpp writes") from None
    cfg = dict(parsed["config"])
    model_type = cfg.pop("model_type", None)
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise LlmsqueezeError(f"{path}: GGUF architecture {model_type!r} is not read yet (read: llama, mistral, qwen2, "
                              "qwen3); load it with transformers (gguf_file=)")
    config = AutoConfig.for_model(model_type, **cfg)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    by_gguf = {}
    block_path = get_arch(model).blocks
    for name, _ in model.named_parameters():
        g = gguf_name(name, block_path, GGUF_BLOCK_TENSORS, ARCHS[model_type])
        if g is not None:
            by_gguf[g] = name
    permute = ARCHS[model_type].permute
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads or config.num_attention_heads}
    layer_types, state = {}, {}
    quant_ids = {t.id: t for t in ggml.TYPES.values()}
    for t in reader.tensors:
        hf = by_gguf.get(t.name)
        if hf is None:
            if t.name == "output.weight" and getattr(config, "tie_word_embeddings", False):
                continue
            raise LlmsqueezeError(f"{path}: tensor {t.name} has no place in {type(model).__name__}")
        base = t.name.split(".")[-2]
        perm = None
        if permute and base in heads:
            n_rows = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
            perm = torch.argsort(permute_rows(n_rows, heads[base]))  # the inverse of the export's order
        qt = quant_ids.get(int(t.tensor_type))
        module_name = hf.rsplit(".", 1)[0]
        if qt is not None and hf.endswith(".weight") and module_name.startswith(block_path + "."):
            rows = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))  # [N, row_bytes]
            if perm is not None:
                rows = rows[perm]
            module = model.get_submodule(module_name)
            layer = GGUFLinear(module.in_features, module.out_features, qt.name, bias=module.bias is not None,
                               bias_dtype=dtype)
            layer.blocks.copy_(rows)
            set_module(model, module_name, layer)
            layer_types[module_name] = qt.name
            continue
        w = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).copy())
        if perm is not None:
            w = w[perm]
        state[hf] = w.to(dtype)
    if not layer_types:
        raise LlmsqueezeError(f"{path} holds no quantized block Linear in a type llmsqueeze reads ({', '.join(ggml.TYPES)}); "
                              "load it with transformers (gguf_file=) instead")
    for name, w in state.items():
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name)
        if isinstance(module, GGUFLinear):  # its bias is a buffer (qwen2's q/k/v)
            module.bias = w
        else:
            setattr(module, attr, torch.nn.Parameter(w, requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers()
                                                                       if b.is_meta and "rotary" not in n]
    if missing:
        raise CheckpointError(f"{path}: no tensor for {missing[0]} in the file; it is incomplete")
    for module in model.modules():  # rotary tables were built on meta: rebuild them on the CPU
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            inv, scale = module.rope_init_fn(module.config, "cpu")
            module.inv_freq, module.original_inv_freq, module.attention_scaling = inv, inv.clone(), scale
    file_type = int(reader.fields["general.file_type"].contents()) if "general.file_type" in reader.fields else None
    mix = next((m.name for m in ggml.MIXES.values() if m.file_type == file_type), None)
    scheme = GGUFScheme(mix=mix or max(set(layer_types.values()), key=list(layer_types.values()).count),
                        pure=mix is None, layer_types=layer_types)
    model.config.quantization_config = quantization_config(scheme, "gguf-file", all_linear_names(model),
                                                           {"file": str(path)})
    return model.eval()

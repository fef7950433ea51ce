"""The user's verbs: quantize a model in memory, load a dense model with clear errors."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import METHODS, LlmsqueezeError, QuantScheme
from .models import all_linear_names, quantizable_modules
from .nn import QuantLinear, linear_weight, set_module
from .quant.rtn import rtn_quantize

log = logging.getLogger("llmsqueeze")

FORMAT_VERSION = 1
QUANT_METHOD = "llmsqueeze"


def quantization_config(scheme: QuantScheme, method: str, modules_to_not_convert: list[str]) -> dict:
    """What `config.json` carries so the checkpoint says how to read itself."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "scheme": scheme.to_dict(),
        "modules_to_not_convert": modules_to_not_convert,
    }


def _untie_lm_head(model: nn.Module, head_name: str) -> None:
    """Give the output head its own weight so it can be quantized while the embeddings stay dense."""
    head = model.get_submodule(head_name)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False


def quantize(
    model: nn.Module,
    scheme: QuantScheme | None = None,
    data=None,
    method: str = "rtn",
    progress: bool = True,
    **scheme_kwargs,
) -> nn.Module:
    """Quantize `model` in place and return it: each selected Linear becomes a packed QuantLinear.

    `scheme` (or QuantScheme keyword arguments such as bits=4, group_size=128) says what and how;
    `data` is calibration data for methods that need it (RTN does not).
    """
    if scheme is None:
        scheme = QuantScheme(**scheme_kwargs)
    elif scheme_kwargs:
        raise LlmsqueezeError("pass either a QuantScheme or scheme keyword arguments, not both")
    if method not in METHODS:
        raise LlmsqueezeError(f"method {method!r} is not available: use one of {', '.join(METHODS)}")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized: start from the dense model")
    names = quantizable_modules(model, scheme)
    if not names:
        raise LlmsqueezeError(
            f"no layer of {type(model).__name__} matches include={scheme.include} exclude={scheme.exclude}: "
            "loosen the patterns"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n in names if head is not None and model.get_submodule(n) is head), None)
    if head_name is not None:
        _untie_lm_head(model, head_name)

    log.info("quantizing %d layers with %s: %s", len(names), method, scheme.to_json())
    with torch.no_grad():
        for name in tqdm(names, desc=f"{method} {scheme.bits}-bit", disable=not progress, unit="layer"):
            layer = model.get_submodule(name)
            w = linear_weight(layer).detach()
            q, scale, zero = rtn_quantize(w, scheme)
            qlayer = QuantLinear.from_quantized(
                q, scale, zero, scheme.bits, scheme.group_size_for(w.shape[1]),
                bias=layer.bias, scale_dtype=scheme.torch_scale_dtype,
            )
            set_module(model, name, qlayer)
            del layer, w, q
    kept = [n for n in all_linear_names(model)]
    model.config.quantization_config = quantization_config(scheme, method, kept)
    return model


def load_dense(model_id: str, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a dense causal LM from a local dir or a hub id, turning loader failures into one line."""
    from transformers import AutoConfig, AutoModelForCausalLM

    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise LlmsqueezeError(f"model {model_id!r}: no such directory; pass a local model dir or a hub id like 'org/name'")
    path = os.path.expanduser(model_id) if looks_local else model_id
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmsqueezeError(
            f"cannot load model {model_id!r} ({first}); check the name or path, and the network for hub ids"
        ) from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # BERT-like encoders also register a CausalLM head class; they are still not decoder LMs.
    encoder = type(config) in MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or encoder or getattr(config, "is_encoder_decoder", False):
        raise LlmsqueezeError(
            f"model {model_id!r} is a {config.model_type!r} model, which is not a causal LM: "
            "llmsqueeze compresses decoder-only LMs (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    if getattr(config, "quantization_config", None) is not None:
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) else "?"
        raise LlmsqueezeError(
            f"model {model_id!r} is already quantized ({method}): start from the dense model"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmsqueezeError(f"cannot load model {model_id!r}: {first}") from None

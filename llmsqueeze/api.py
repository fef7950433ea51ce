"""The user's verbs: quantize a model in memory, load a dense model with clear errors."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import METHODS, LlmsqueezeError, QuantScheme, first_line
from .models import all_linear_names, quantizable_modules
from .nn import set_module
from .quant.rtn import RTN

log = logging.getLogger("llmsqueeze")

FORMAT_VERSION = 1
QUANT_METHOD = "llmsqueeze"


def quantization_config(scheme: QuantScheme, method: str, modules_to_not_convert: list[str],
                        method_args: dict | None = None) -> dict:
    """What `config.json` carries so the checkpoint says how to read itself."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": method,
        "scheme": scheme.to_dict(),
        "method_args": dict(method_args or {}),
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
    *,
    device: str | None = None,
    offload: str | None = None,
    true_sequential: bool = False,
    act_order: bool = True,
    static_groups: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 1,
    **scheme_kwargs,
) -> nn.Module:
    """Quantize `model` in place and return it: each selected Linear becomes a packed QuantLinear.

    `scheme` (or QuantScheme keyword arguments such as bits=4, group_size=128) says what and how.
    method "rtn" needs no data; "gptq" needs `data`: calibration token ids [n_samples, seq_len]
    (see llmsqueeze.data.calibration_batches), and runs block by block on `device` (default: CUDA
    when available, else CPU) with the GPTQ options act_order and static_groups (both on by default:
    columns by decreasing Hessian diagonal, group scales fixed up front so no g_idx is stored; on
    SmolLM2 4-bit g64 this gives 18.87 perplexity vs 20.19 in natural order), damp (fraction of the
    mean Hessian diagonal), block_size; true_sequential calibrates each block's Linears in the
    architecture's order; offload keeps block activations on that device between blocks.
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
    method_args: dict = {}
    if method == "rtn":
        _quantize_rtn(model, names, scheme, progress)
    else:
        method_args = _quantize_gptq(
            model, names, scheme, data, progress, device=device, offload=offload, true_sequential=true_sequential,
            act_order=act_order, static_groups=static_groups, damp=damp, block_size=block_size, batch_size=batch_size,
        )
    kept = all_linear_names(model)
    model.config.quantization_config = quantization_config(scheme, method, kept, method_args)
    return model


@torch.no_grad()
def _quantize_rtn(model: nn.Module, names: list[str], scheme: QuantScheme, progress: bool) -> None:
    method = RTN(scheme)
    for name in tqdm(names, desc=f"rtn {scheme.bits}-bit", disable=not progress, unit="layer"):
        set_module(model, name, method.apply(name, model.get_submodule(name)))


def check_devices(device: str | None, offload: str | None) -> str:
    """The calibration device (default: CUDA when present, else CPU), after checking that it and the
    offload device exist here; raises a one-line LlmsqueezeError otherwise."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for what, dev in (("device", device), ("offload", offload)):
        if dev is None:
            continue
        try:
            kind = torch.device(dev).type
        except RuntimeError:
            raise LlmsqueezeError(f"--{what} {dev!r} is not a device: use cpu or cuda (cuda:N)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise LlmsqueezeError(f"--{what} {dev!r}: no CUDA GPU is visible here; use --{what} cpu")
        if kind == "cuda" and (torch.device(dev).index or 0) >= torch.cuda.device_count():
            raise LlmsqueezeError(f"--{what} {dev!r}: only {torch.cuda.device_count()} CUDA GPU(s) here; use cuda:0")
    return device


def _quantize_gptq(model, names, scheme, data, progress, *, device, offload, true_sequential, act_order,
                   static_groups, damp, block_size, batch_size) -> dict:
    from .engine import run_sequential
    from .evaluate import peak_rss_mib

    batches, method, method_args, device = gptq_setup(
        scheme, data, device=device, offload=offload, true_sequential=true_sequential, act_order=act_order,
        static_groups=static_groups, damp=damp, block_size=block_size, batch_size=batch_size,
    )
    stats = run_sequential(model, batches, method, names, device=device, offload=offload,
                           true_sequential=true_sequential, progress=progress)
    log.info("GPTQ done in %.1f s; peak RSS %.0f MiB%s", stats.seconds, peak_rss_mib(),
             "" if stats.peak_device_mib is None else f", peak device memory {stats.peak_device_mib:.0f} MiB")
    model._llmsqueeze_stats = stats  # for eval scripts and the CLI summary
    model._llmsqueeze_report = method.report
    return method_args


def gptq_setup(scheme, data, *, device, offload, true_sequential, act_order, static_groups, damp, block_size,
               batch_size):
    """Check the GPTQ options and data -> (batches, GPTQ method, method_args, device)."""
    from .quant.gptq import GPTQ

    if data is None:
        raise LlmsqueezeError("method 'gptq' needs calibration data: pass data= token ids [n_samples, seq_len] "
                              "(llmsqueeze.data.calibration_batches), or --calib on the command line")
    ids = data if isinstance(data, torch.Tensor) else torch.cat(list(data))
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise LlmsqueezeError(f"calibration data must be integer token ids [n_samples, seq_len], got {tuple(ids.shape)} {ids.dtype}")
    if not (0 < damp < 1):
        raise LlmsqueezeError(f"damp={damp} must lie in (0, 1), e.g. 0.01 (1% of the mean Hessian diagonal)")
    if block_size < 1 or batch_size < 1:
        raise LlmsqueezeError(f"block_size={block_size} and batch_size={batch_size} must be positive")
    if static_groups and not act_order:
        log.info("static_groups without act_order changes nothing: groups are already in natural order")
    device = check_devices(device, offload)
    batches = list(ids.long().split(batch_size))
    method = GPTQ(scheme, damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups)
    method_args = {
        "act_order": act_order, "static_groups": static_groups, "damp": damp, "block_size": block_size,
        "true_sequential": true_sequential, "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
    }
    return batches, method, method_args, device


def load_dense(model_id: str, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a dense causal LM from a local dir or a hub id, turning loader failures into one line."""
    from transformers import AutoModelForCausalLM

    from .lazy import check_shards

    path, _ = dense_config(model_id)
    check_shards(path)  # a truncated or incomplete download: one line, before the slow load
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise LlmsqueezeError(f"cannot load model {model_id!r}: {first}") from None


def dense_config(model_id: str):
    """-> (local path or hub id, config) of a dense causal LM, after the checks that make bad input
    one line: no such dir, not a causal LM, already quantized."""
    from transformers import AutoConfig

    looks_local = os.path.isabs(model_id) or model_id.startswith((".", "~")) or os.path.exists(model_id)
    if looks_local and not os.path.isdir(os.path.expanduser(model_id)):
        raise LlmsqueezeError(f"model {model_id!r}: no such directory; pass a local model dir or a hub id like 'org/name'")
    path = os.path.expanduser(model_id) if looks_local else model_id
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise LlmsqueezeError(
            f"cannot load model {model_id!r} ({first}); check the name or path, and the network for hub ids"
        ) from None
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_MASKED_LM_MAPPING,
    )

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
    return path, config

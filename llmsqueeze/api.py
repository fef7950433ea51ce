"""The user's verbs: quantize a model in memory, load a dense model with clear errors."""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import METHODS, LlmsqueezeError, QuantScheme, first_line
from .formats.native import quantization_config, sparsity_config
from .models import all_linear_names, quantizable_modules, selected_layers
from .nn import linear_weight, set_module
from .quant.rtn import RTN

log = logging.getLogger("llmsqueeze")


GRID_METHODS = ("rtn", "gptq")  # the methods that quantize on a non-uniform grid (nf, kmeans)
MIXED_METHODS = ("rtn", "gptq")  # the methods that take per-layer widths (avg_bits)


def check_method_options(method: str, grid: str = "uniform", avg_bits: float | None = None) -> None:
    """One-line errors for combinations of a method, a grid and mixed precision that do not work together."""
    if grid != "uniform" and method not in GRID_METHODS:
        raise LlmsqueezeError(f"method {method!r} quantizes on the uniform grid; grid={grid!r} works with "
                              f"{' or '.join(GRID_METHODS)}")
    if avg_bits is not None and grid != "uniform":
        raise LlmsqueezeError(f"avg_bits mixes widths on the uniform grid; grid={grid!r} takes one width: "
                              "drop avg_bits (--avg-bits) or use grid='uniform'")
    if avg_bits is not None and method not in MIXED_METHODS:
        raise LlmsqueezeError(f"avg_bits (mixed precision) works with {' or '.join(MIXED_METHODS)}, not method "
                              f"{method!r}: drop avg_bits (--avg-bits) or change the method")


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
    avg_bits: float | None = None,
    bit_candidates: tuple[int, ...] = (2, 3, 4, 8),
    sensitivity: dict | None = None,
    iters: int = 200,
    lr: float | None = None,
    seed: int = 0,
    init: str = "rtn",
    batch_samples: int = 8,
    float_targets: bool = True,
    amp: bool | None = None,
    token_weighting: bool = True,
    **scheme_kwargs,
) -> nn.Module:
    """Quantize `model` in place and return it: each selected Linear becomes a packed QuantLinear.

    `scheme` (or QuantScheme keyword arguments such as bits=4, group_size=128) says what and how.
    method "rtn" needs no data; "gptq" needs `data`: calibration token ids [n_samples, seq_len]
    (see llmsqueeze.data.calibration_batches), and runs block by block on `device` (default: CUDA
    when available, else CPU) with the GPTQ options act_order and static_groups (both on by default:
    columns by decreasing Hessian diagonal, group scales fixed up front so no g_idx is stored; on
    SmolLM2 4-bit g64 this gives 18.87 perplexity vs 20.19 in natural order; the scheme's clip_search,
    on by default for GPTQ, brings it to 18.59), damp (fraction of the
    mean Hessian diagonal), block_size; true_sequential calibrates each block's Linears in the
    architecture's order; offload keeps block activations on that device between blocks.

    avg_bits (e.g. 3.5) makes the precision mixed: each layer gets one of `bit_candidates` so that the
    bits stored per quantized weight (scales and zeros included) average at most avg_bits, the layers
    whose output error grows most at low widths getting the most bits (llmsqueeze.mixed). It needs
    `data` (one extra engine pass measures the sensitivity) unless `sensitivity`, a table from
    llmsqueeze.mixed.measure_sensitivity, is given; the scheme's `bits` is then ignored.

    method "awq" (AWQ balancing, then RTN on an output-error clipped grid) and "awq-gptq" (AWQ
    balancing, then GPTQ with the options above) need `data` too; see llmsqueeze.quant.awq.

    method "autoround" learns each block's rounding and group ranges by sign-SGD on the block's output
    error (llmsqueeze.quant.autoround): `iters` steps per block (lr default 1/iters, 2/iters at 3 bits
    and below), minibatches drawn of `batch_samples` with `seed`, starting from round-to-nearest (`init`
    "rtn") or the clip-searched grid ("clip"); the targets are the float model's block outputs
    (`float_targets`, default) or the float block's on the quantized inputs; `amp` (default: where the
    hardware has bfloat16) trains under bfloat16 autocast; `token_weighting` (default) caps the weight
    of massive-activation tokens in the loss at that of a median-norm token.
    """
    from .config import W8A8Scheme

    if isinstance(scheme, W8A8Scheme) and avg_bits is not None:
        raise LlmsqueezeError("avg_bits mixes weight-only bit widths; it does not apply to a W8A8 scheme")
    if isinstance(scheme, W8A8Scheme):  # integer-only inference: its own module
        from .quant.w8a8 import quantize_w8a8

        return quantize_w8a8(model, scheme, data, method, progress, device=device, offload=offload, damp=damp,
                             block_size=block_size, batch_size=batch_size, act_order=act_order, **scheme_kwargs)
    if scheme is None:
        scheme = QuantScheme(**scheme_kwargs)
    elif scheme_kwargs:
        raise LlmsqueezeError("pass either a QuantScheme or scheme keyword arguments, not both")
    if method not in METHODS:
        raise LlmsqueezeError(f"method {method!r} is not available: use one of {', '.join(METHODS)}")
    scheme = scheme.with_method(method)
    check_method_options(method, scheme.grid, avg_bits)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized: start from the dense model")
    names, head_name = selected_layers(model, scheme)
    if head_name is not None:
        _untie_lm_head(model, head_name)

    layer_schemes, mixed_report = None, None
    if avg_bits is not None:
        from .mixed import check_budget, measure_sensitivity, plan_bits

        g_idx = method == "gptq" and act_order and not static_groups
        check_budget(model, names, scheme, avg_bits, bit_candidates, g_idx)  # before the slow pass
        if sensitivity is None:
            sensitivity = measure_sensitivity(model, names, data, scheme, bit_candidates, device=device,
                                              offload=offload, batch_size=batch_size, progress=progress)
        scheme, layer_schemes, mixed_report = plan_bits(model, names, scheme, avg_bits, sensitivity, g_idx)
        model._llmsqueeze_mixed = mixed_report  # the sensitivity table and allocation, for the CLI and eval/

    log.info("quantizing %d layers with %s: %s", len(names), method, scheme.to_json())
    method_args: dict = {}
    if method == "rtn":
        _quantize_rtn(model, names, scheme, progress, layer_schemes)
    elif method in ("awq", "awq-gptq"):  # recorded as "awq", with method_args["awq"]["then"]
        from .quant.awq import run_awq

        method_args = run_awq(
            model, names, scheme, data, progress, then="gptq" if method == "awq-gptq" else "rtn", device=device,
            offload=offload, true_sequential=true_sequential, act_order=act_order, static_groups=static_groups,
            damp=damp, block_size=block_size, batch_size=batch_size,
        )
        method = "awq"
    elif method == "autoround":
        method_args = _quantize_autoround(model, names, scheme, data, progress, device=device, offload=offload,
                                          iters=iters, lr=lr, seed=seed, init=init, batch_samples=batch_samples,
                                          float_targets=float_targets, amp=amp, token_weighting=token_weighting)
    else:
        method_args = _quantize_gptq(
            model, names, scheme, data, progress, device=device, offload=offload, true_sequential=true_sequential,
            act_order=act_order, static_groups=static_groups, damp=damp, block_size=block_size, batch_size=batch_size,
            layer_schemes=layer_schemes,
        )
    kept = all_linear_names(model)
    model.config.quantization_config = quantization_config(scheme, method, kept, method_args)
    if mixed_report is not None:
        from .mixed import MIXED_FORMAT_VERSION

        qc = model.config.quantization_config
        if layer_schemes:  # (the budget may also land on one width for all: a plain checkpoint)
            qc["format_version"] = MIXED_FORMAT_VERSION  # older readers would build every layer at scheme.bits
            qc["layer_schemes"] = layer_schemes
        qc["method_args"].update(avg_bits=avg_bits, bit_candidates=sorted(set(bit_candidates)),
                                 bits_per_weight=mixed_report["bits_per_weight"])
    return model


@torch.no_grad()
def _quantize_rtn(model: nn.Module, names: list[str], scheme: QuantScheme, progress: bool,
                  layer_schemes: dict | None = None) -> None:
    from .config import scheme_for

    for name in tqdm(names, desc=f"rtn {scheme.bits}-bit", disable=not progress, unit="layer"):
        method = RTN(scheme_for(scheme, layer_schemes, name))
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


def _engine_inputs(data, what: str, damp: float, block_size: int, batch_size: int, device, offload):
    """Validate calibration data and engine options (one-line errors) -> (batches [B, T] list, ids, device)."""
    if data is None:
        raise LlmsqueezeError(f"method {what!r} needs calibration data: pass data= token ids [n_samples, seq_len] "
                              "(llmsqueeze.data.calibration_batches), or --calib on the command line")
    ids = data if isinstance(data, torch.Tensor) else torch.cat(list(data))
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise LlmsqueezeError(f"calibration data must be integer token ids [n_samples, seq_len], got {tuple(ids.shape)} {ids.dtype}")
    if not (0 < damp < 1):
        raise LlmsqueezeError(f"damp={damp} must lie in (0, 1), e.g. 0.01 (1% of the mean Hessian diagonal)")
    if block_size < 1 or batch_size < 1:
        raise LlmsqueezeError(f"block_size={block_size} and batch_size={batch_size} must be positive")
    device = check_devices(device, offload)
    return list(ids.long().split(batch_size)), ids, device


def _quantize_gptq(model, names, scheme, data, progress, *, device, offload, true_sequential, act_order,
                   static_groups, damp, block_size, batch_size, layer_schemes=None) -> dict:
    from .engine import run_sequential
    from .evaluate import peak_rss_mib

    batches, method, method_args, device = gptq_setup(
        scheme, data, device=device, offload=offload, true_sequential=true_sequential, act_order=act_order,
        static_groups=static_groups, damp=damp, block_size=block_size, batch_size=batch_size,
    )
    method.layer_schemes = layer_schemes
    stats = run_sequential(model, batches, method, names, device=device, offload=offload,
                           true_sequential=true_sequential, progress=progress)
    log.info("GPTQ done in %.1f s; peak RSS %.0f MiB%s", stats.seconds, peak_rss_mib(),
             "" if stats.peak_device_mib is None else f", peak device memory {stats.peak_device_mib:.0f} MiB")
    model._llmsqueeze_stats = stats  # for eval scripts and the CLI summary
    model._llmsqueeze_report = method.report
    return method_args


def _quantize_autoround(model, names, scheme, data, progress, *, device, offload, iters, lr, seed, init,
                        batch_samples, float_targets, amp, token_weighting) -> dict:
    from .engine import run_sequential
    from .evaluate import peak_rss_mib
    from .quant.autoround import AutoRound, check_autoround_args

    check_autoround_args(iters, lr, batch_samples, init, 0.5)
    # one sample per engine batch: AutoRound stacks them into its own minibatches
    batches, ids, device = _engine_inputs(data, "autoround", 0.01, 128, 1, device, offload)
    method = AutoRound(scheme, names, iters=iters, lr=lr, batch_samples=batch_samples, seed=seed, init=init,
                       progress=progress, float_targets=float_targets, amp=amp, token_weighting=token_weighting)
    stats = run_sequential(model, batches, method, names, device=device, offload=offload, progress=progress)
    log.info("autoround done in %.1f s; peak RSS %.0f MiB", stats.seconds, peak_rss_mib())
    model._llmsqueeze_stats = stats
    model._llmsqueeze_report = method.report
    return {"iters": iters, "lr": method.lr, "batch_samples": method.batch_samples, "seed": seed, "init": init,
            "amin": method.amin, "float_targets": method.float_targets, "token_weighting": method.token_weighting,
            "train_dtype": str(method.train_dtype or torch.float32).replace("torch.", ""),
            "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1])}


def gptq_setup(scheme, data, *, device, offload, true_sequential, act_order, static_groups, damp, block_size,
               batch_size):
    """Check the GPTQ options and data -> (batches, GPTQ method, method_args, device)."""
    from .quant.gptq import GPTQ

    if getattr(scheme, "grid", "uniform") != "uniform" and act_order and not static_groups:
        raise LlmsqueezeError(f"grid={scheme.grid!r} fits its levels per natural-order group: use --act-order static "
                              "(the default) or off, not dynamic")
    batches, ids, device = _engine_inputs(data, "gptq", damp, block_size, batch_size, device, offload)
    if static_groups and not act_order:
        log.info("static_groups without act_order changes nothing: groups are already in natural order")
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


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "snip", "taylor")


def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | tuple[int, int] | None = None,
    data=None,
    scheme: QuantScheme | None = None,
    progress: bool = True,
    *,
    scope: str | None = None,
    owl: dict | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    device: str | None = None,
    offload: str | None = None,
    true_sequential: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 1,
    refit: bool | str | None = None,
) -> nn.Module:
    """Prune the Linears inside the decoder blocks of `model` in place and return it.

    method: magnitude (no data), wanda or sparsegpt (calibration `data`, token ids [n_samples,
    seq_len], run block by block by the shared engine), snip or taylor (gradient saliency on `data`).
    Either `sparsity` in [0, 1) (unstructured: per row for wanda, snip and taylor, per layer for
    magnitude; SparseGPT per row within each block of 128 columns, or with scope "layer" across the
    block's rows as in the paper: row was better on SmolLM2 in quick checks) or `pattern` "N:M" (keep N of every M inputs, e.g. "2:4"). `scheme` (a QuantScheme) also
    quantizes in the same pass: SparseGPT rounds each kept weight inside its OBS sweep, Wanda keeps its
    mask and runs the same sweep, magnitude rounds to nearest. `owl` (e.g. {"lam": 0.08, "m": 5})
    spreads the sparsity unevenly over layers by their outlier ratio (OWL; wanda and sparsegpt).
    `refit` (True / False / "auto"; default "auto" for sparsegpt, False for wanda) solves each row's
    kept weights for the least layer-output error once the mask is chosen (pruning/refit.py), instead
    of keeping SparseGPT's one-pass sweep (or Wanda's untouched weights); "auto" does so for a layer
    whose calibration gave at least 2 tokens per input (fewer: the refit overfits them); with a scheme
    the refit weights are then rounded by the mask-fixed OBS sweep. Pruned Linears keep their dense
    shape in memory, zeros written in; `save_quantized` stores them sparse (N:M values + indices, or a
    bitmask), or packed with q == zero when quantized.
    """
    from .pruning.masks import check_nm_width, check_sparsity, parse_nm

    if method not in PRUNE_METHODS:
        raise LlmsqueezeError(f"pruning method {method!r} is not available: use one of {', '.join(PRUNE_METHODS)}")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized or pruned: start from the dense model")
    if scheme is not None and scheme.grid != "uniform":
        raise LlmsqueezeError(f"pruning quantizes on the uniform grid; grid={scheme.grid!r} is not available with prune")
    nm = parse_nm(pattern)
    if nm is not None and sparsity is not None and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise LlmsqueezeError(f"pattern {nm[0]}:{nm[1]} fixes the sparsity at {1 - nm[0] / nm[1]:g}; drop sparsity={sparsity}")
    if nm is None:
        if sparsity is None:
            raise LlmsqueezeError("give a sparsity (e.g. 0.5) or an N:M pattern (e.g. '2:4')")
        sparsity = check_sparsity(sparsity)
    else:
        sparsity = 1 - nm[0] / nm[1]
    scope = scope or {"magnitude": "layer", "wanda": "row", "sparsegpt": "row", "snip": "row", "taylor": "row"}[method]
    allowed = ("row", "layer") if method in ("wanda", "sparsegpt") else ("row", "layer", "global")
    if scope not in allowed:
        raise LlmsqueezeError(f"scope {scope!r} is not available for {method}: use one of {', '.join(allowed)}")
    names = quantizable_modules(model, QuantScheme(include=include or [], exclude=exclude or []))
    if not names:
        raise LlmsqueezeError(f"no layer of {type(model).__name__} matches include={include} exclude={exclude}: loosen the patterns")
    if nm is not None:
        for n in names:
            check_nm_width(*nm, linear_weight(model.get_submodule(n)).shape[1], n)
    if owl is not None and method not in ("wanda", "sparsegpt"):
        raise LlmsqueezeError("owl allocation is available with wanda and sparsegpt")
    if refit not in (None, False, True, "auto"):
        raise LlmsqueezeError(f"refit={refit!r}: use True, False or 'auto'")
    if refit and method not in ("wanda", "sparsegpt"):
        raise LlmsqueezeError("refit solves the kept weights from the calibration Hessian: use it with wanda or sparsegpt")
    if owl is not None and nm is not None:
        raise LlmsqueezeError("owl allocates unstructured sparsity per layer; it does not apply to an N:M pattern")

    log.info("pruning %d layers with %s: %s", len(names), method, f"{nm[0]}:{nm[1]}" if nm else f"sparsity {sparsity}")
    args: dict = {"scope": scope}
    layer_sparsity = None
    if method == "magnitude":
        _prune_magnitude(model, names, sparsity, nm, scope, scheme, progress)
    elif method in ("snip", "taylor"):
        batches, ids, _ = _engine_inputs(data, method, damp, block_size, batch_size, device, offload)
        _prune_saliency(model, names, batches, method, sparsity, nm, scope, scheme)
        args.update(n_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    else:
        from .engine import run_sequential
        from .evaluate import peak_rss_mib
        from .pruning.sparsegpt import SparseGPT
        from .pruning.wanda import Wanda

        batches, ids, device = _engine_inputs(data, method, damp, block_size, batch_size, device, offload)
        if owl is not None:
            from .pruning.owl import owl_sparsities

            layer_sparsity = owl_sparsities(model, batches, names, sparsity, device=device, **owl)
            args["owl"] = dict(owl)
        cls = Wanda if method == "wanda" else SparseGPT
        if refit is None:
            refit = "auto" if method == "sparsegpt" else False
        elif refit != "auto":
            refit = bool(refit)
        m = cls(sparsity, nm, scheme, scope=scope, damp=damp, block_size=block_size, layer_sparsity=layer_sparsity,
                refit=refit)
        stats = run_sequential(model, batches, m, names, device=device, offload=offload,
                               true_sequential=true_sequential, progress=progress)
        log.info("%s done in %.1f s; peak RSS %.0f MiB", method, stats.seconds, peak_rss_mib())
        model._llmsqueeze_stats = stats
        model._llmsqueeze_report = m.report
        args.update(damp=damp, block_size=block_size, true_sequential=true_sequential, refit=refit,
                    n_samples=int(ids.shape[0]), seq_len=int(ids.shape[1]))
    kept = [n for n in all_linear_names(model) if n not in set(names)]
    qc = quantization_config(scheme or QuantScheme(), method, kept, args)
    qc["format_version"] = 2
    qc["scheme"] = None if scheme is None else scheme.to_dict()
    qc["sparsity"] = sparsity_config(sparsity, nm, names, scope, layer_sparsity)
    model.config.quantization_config = qc
    return model


def _prune_saliency(model, names, batches, criterion, sparsity, nm, scope, scheme) -> None:
    """SNIP / Taylor scores from the next-token loss on the calibration batches (whole model, one
    backward per batch), then masks as for magnitude."""
    from .pruning.saliency import gradient_saliency

    params = {n: model.get_submodule(n).weight for n in names}
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    with torch.enable_grad():
        scores = gradient_saliency(model, batches, params, criterion)
    model.train(was_training)
    scores = {n: (s if isinstance(model.get_submodule(n), nn.Linear) else s.t()) for n, s in scores.items()}  # [N, K]
    _prune_magnitude(model, names, sparsity, nm, scope, scheme, False, scores)


@torch.no_grad()
def _prune_magnitude(model, names, sparsity, nm, scope, scheme, progress, scores=None) -> None:
    """Magnitude pruning, or any given per-layer scores [N, K] (higher = kept)."""
    from .pruning.layer import pruned_module
    from .pruning.magnitude import apply_mask, magnitude_score
    from .pruning.masks import global_masks, nm_mask, unstructured_mask

    if scores is None:
        scores = {n: magnitude_score(linear_weight(model.get_submodule(n))) for n in names}
    if scope == "global" and nm is None:
        keeps = global_masks(scores, sparsity)
    for name in tqdm(names, desc="magnitude", disable=not progress, unit="layer"):
        layer = model.get_submodule(name)
        w = linear_weight(layer)
        if nm is not None:
            keep = nm_mask(scores.pop(name), *nm)
        elif scope == "global":
            keep = keeps.pop(name)
        else:
            keep = unstructured_mask(scores.pop(name), sparsity, scope)
        res = apply_mask(w, keep, scheme)
        set_module(model, name, pruned_module(layer, res, scheme))

"""The one orchestrator: from a scheme and a method to a compressed model, in memory or block by
block from disk into a checkpoint.

    quantize_model(model, scheme, data, method, ...)        a model held in memory (llmsqueeze.quantize)
    quantize_lazy(model_id, out, scheme, data, method, ...) blocks read from the shards one at a time
                                                            and written straight to OUT (resumable)
    prune_model(model, method, sparsity, data, ...)         pruning, optionally quantizing too

All three look their method up in the table (methods.py), build one llmsqueeze.engine.Job, and run
the same loop (`_compress`): the algorithm's engine method through `engine.run_sequential`, or its
whole-model `run`. A model on disk is just another block source: its hooks load each block before
its turn and write it out after, so the in-memory and the lazy result are equal by construction.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import (
    CalibrationOptions,
    FloatScheme,
    GGUFScheme,
    LlmsqueezeError,
    QuantScheme,
    SparsityScheme,
    W8A8Scheme,
)
from .engine import EngineStats, Job, calibration_ids, check_devices, peak_rss_mib, run_sequential
from .methods import MethodRow, check_quantize_options, prune_method, quantize_method, resolve_scheme
from .models import (
    all_linear_names,
    get_arch,
    gguf_layer_types,
    quantizable_modules,
    selected_layers,
    split_fused_experts,
    untie_lm_head,
)
from .nn import linear_weight, set_module

log = logging.getLogger("llmsqueeze")


# ------------------------------------------------------------------------------- the loop
def _build(job: Job, row: MethodRow):
    """The engine method of `row` for `job` (its inner method first, when it wraps one); fills
    job.method_args with what is known before the run. None for a whole-model method."""
    if row.run is not None:
        return None
    if isinstance(job.scheme, GGUFScheme):
        build, inner = row.build_gguf, row.inner_gguf
    elif isinstance(job.scheme, FloatScheme):
        build, inner = row.build_w8a8, row.inner_float
    elif isinstance(job.scheme, W8A8Scheme):
        build, inner = row.build_w8a8, row.inner_w8a8
    else:
        build, inner = row.build, row.inner
    return build(job, inner(job)) if inner is not None else build(job)


def _compress(job: Job, row: MethodRow, method=None, hooks: dict | None = None) -> EngineStats | None:
    """Run `row`'s algorithm on job.names of job.model, in place: block by block through the engine
    (`hooks`: a block source's block_loader, block_done, ...), or whole-model. Layers outside the
    decoder blocks (the head, with lm_head) are compressed after the blocks, by data-free methods
    only. Fills job.method_args; returns the engine's statistics (None for a whole-model method)."""
    model = job.model
    if row.run is not None:
        row.run(job)
        return None
    method = method if method is not None else _build(job, row)
    block_names, outside = _split_blocks(model, job.names, bool(job.batches))
    stats = run_sequential(model, job.batches, method, block_names, device=job.device, offload=job.options.offload,
                           true_sequential=getattr(method, "true_sequential", job.options.true_sequential),
                           progress=job.progress, compute=job.options.compute_dtype,
                           expert_min_tokens=job.options.expert_min_tokens,
                           experts_per_pass=job.options.experts_per_pass, **(hooks or {}))
    with torch.no_grad():
        for n in outside:  # data-free (checked above): the head is in memory already
            set_module(model, n, method.apply(n, model.get_submodule(n)))
    record = getattr(method, "record", None)
    if record is not None:
        job.method_args.update(record())
    if job.batches:  # a calibrated run: its statistics for eval scripts and the CLI summary
        log.info("%s done in %.1f s; peak RSS %.0f MiB%s", row.name, stats.seconds, peak_rss_mib(),
                 "" if stats.peak_device_mib is None else f", peak device memory {stats.peak_device_mib:.0f} MiB")
        model._llmsqueeze_stats = stats
        model._llmsqueeze_report = getattr(method, "all_reports", getattr(method, "report", []))
    return stats


def _split_blocks(model: nn.Module, names: list[str], calibrated: bool) -> tuple[list[str], list[str]]:
    """-> (the layers inside the decoder blocks, those outside: the head); a calibrated run refuses
    the latter in one line (the engine captures only the blocks' inputs)."""
    prefix = get_arch(model).blocks + "."
    inside = [n for n in names if n.startswith(prefix)]
    outside = [n for n in names if not n.startswith(prefix)]
    if outside and calibrated:
        raise LlmsqueezeError(f"calibrated methods handle layers inside the decoder blocks only; {outside[0]} is not: "
                              "exclude it (e.g. drop --lm-head) or use --method rtn")
    return inside, outside


def _calibration(job: Job, data, what: str, sample_batches: bool = False) -> None:
    """job.ids / job.batches / job.device from the calibration data (one-line errors first)."""
    ids = _checked_ids(job.model, data, what)
    job.options.validate()
    job.device = check_devices(job.options.device, job.options.offload)
    job.ids = ids
    job.batches = list(ids.split(1 if sample_batches else job.options.batch_size))


def _checked_ids(model: nn.Module, data, what: str) -> torch.Tensor:
    """calibration_ids, with samples past the model's learned positions refused in one line (not an
    IndexError deep in the embedding)."""
    from .lazy import check_positions

    ids = calibration_ids(data, what)
    if getattr(model, "config", None) is not None:
        check_positions(model.config, ids.shape[1], "calibration seq_len")
    return ids


def _home_device(model: nn.Module) -> str:
    """Where a data-free run computes by default: where the model's weights are (CPU when on meta)."""
    p = next((p for p in model.parameters() if not p.is_meta), None)
    return "cpu" if p is None else str(p.device)


def _new_job(model: nn.Module, scheme, names: list[str], options: CalibrationOptions | None, progress: bool,
             extra: dict | None) -> Job:
    options = options or CalibrationOptions()
    job = Job(model, names, scheme, options, progress=progress, extra=dict(extra or {}))
    job.device = options.device or _home_device(model)
    return job


def _check_scheme(model: nn.Module, scheme, method: str, avg_bits) -> tuple[MethodRow, object]:
    """The method's row and the scheme resolved for it, after the one-line checks."""
    row = quantize_method(method)
    check_quantize_options(row, getattr(scheme, "grid", "uniform"), avg_bits, _act_scheme_name(scheme) or False)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized: start from the dense model")
    if isinstance(scheme, FloatScheme):
        _check_float_shapes(model, scheme)
    if isinstance(scheme, GGUFScheme):  # each selected Linear's GGML type, saved with the scheme
        scheme = scheme.with_layer_types(gguf_layer_types(model, selected_layers(model, scheme)[0], scheme))
    return row, resolve_scheme(scheme, method)


def _act_scheme_name(scheme) -> str | None:
    """"w8a8" or the float format's name for a scheme W8A8's method runs, "gguf" for GGML's block
    formats; None for weight-only."""
    if isinstance(scheme, W8A8Scheme):
        return "w8a8"
    if isinstance(scheme, GGUFScheme):
        return "gguf"
    return scheme.format if isinstance(scheme, FloatScheme) else None


def _check_float_shapes(model: nn.Module, scheme: FloatScheme) -> None:
    """One line for the first selected layer a float format cannot hold (before any work)."""
    from .quant.fp import FORMATS, check_shape

    names, _ = selected_layers(model, scheme)
    for n in names:
        out_f, in_f = linear_weight(model.get_submodule(n)).shape
        problem = check_shape(FORMATS[scheme.format], out_f, in_f)
        if problem:
            raise LlmsqueezeError(f"{scheme.format} cannot hold {n}: {problem}; exclude it (--exclude) or use "
                                  "another format")


def _needs_data(row: MethodRow, scheme) -> str | None:
    """What to call the run in a 'needs calibration data' error, or None when it needs none."""
    if isinstance(scheme, W8A8Scheme):
        if row.calibrated or scheme.needs_data:
            return "w8a8 with SmoothQuant, static activations or GPTQ"
        return None
    if isinstance(scheme, FloatScheme):
        if row.calibrated or scheme.needs_data:
            return f"{scheme.format} with GPTQ, SmoothQuant, static fp8 activations or nvfp4's activation scale"
        return None
    return f"method {row.name!r}" if row.calibrated else None


def _quantization_config(job: Job, row: MethodRow, scheme) -> dict:
    from .formats.native import quantization_config

    return quantization_config(scheme, row.record_name, all_linear_names(job.model), job.method_args)


# ---------------------------------------------------------------------------- in memory
def quantize_model(model: nn.Module, scheme, data=None, method: str = "rtn", progress: bool = True, *,
                   options: CalibrationOptions | None = None, extra: dict | None = None,
                   avg_bits: float | None = None, bit_candidates: tuple[int, ...] = (2, 3, 4, 8),
                   sensitivity: dict | None = None) -> nn.Module:
    """Quantize `model` in place (llmsqueeze.quantize documents the arguments); returns it."""
    split_fused_experts(model)  # MoE: one Linear per expert matrix (models.MOE_LAYOUTS)
    row, scheme = _check_scheme(model, scheme, method, avg_bits)
    names, head_name = selected_layers(model, scheme)
    what = _needs_data(row, scheme)
    if what is not None or avg_bits is not None and data is not None:
        _checked_ids(model, data, what or "mixed precision")  # the one-line errors, before anything changes
    if head_name is not None:
        untie_lm_head(model, head_name)
    job = _new_job(model, scheme, names, options, progress, extra)
    mixed_report = None
    if avg_bits is not None:
        from .mixed import check_budget, measure_sensitivity, plan_bits

        o = job.options
        g_idx = row.act_order and o.act_order and not o.static_groups
        check_budget(model, names, scheme, avg_bits, bit_candidates, g_idx)  # before the slow pass
        if sensitivity is None:
            sensitivity = measure_sensitivity(model, names, data, scheme, bit_candidates, device=o.device,
                                              offload=o.offload, batch_size=o.batch_size, progress=progress)
        scheme, job.layer_schemes, mixed_report = plan_bits(model, names, scheme, avg_bits, sensitivity, g_idx)
        job.scheme = scheme
        model._llmsqueeze_mixed = mixed_report  # the sensitivity table and allocation, for the CLI and eval/
    if what is not None:
        _calibration(job, data, what, row.sample_batches)
    log.info("quantizing %d layers with %s: %s", len(names), method, scheme.to_dict())
    _compress(job, row)
    qc = _quantization_config(job, row, scheme)
    if mixed_report is not None:
        from .mixed import MIXED_FORMAT_VERSION

        if job.layer_schemes:  # (the budget may also land on one width for all: a plain checkpoint)
            qc["format_version"] = MIXED_FORMAT_VERSION  # older readers would build every layer at scheme.bits
            qc["layer_schemes"] = job.layer_schemes
        qc["method_args"].update(avg_bits=avg_bits, bit_candidates=sorted(set(bit_candidates)),
                                 bits_per_weight=mixed_report["bits_per_weight"])
    model.config.quantization_config = qc
    return model


def prune_model(model: nn.Module, method: str, sparsity: SparsityScheme, data=None, scheme: QuantScheme | None = None,
                progress: bool = True, *, include: list[str] | None = None, exclude: list[str] | None = None,
                owl: dict | None = None, refit: bool | str | None = None,
                options: CalibrationOptions | None = None) -> nn.Module:
    """Prune (and with `scheme` quantize) `model` in place (llmsqueeze.prune documents the arguments)."""
    split_fused_experts(model)
    from .pruning.masks import check_nm_width

    row = prune_method(method)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized or pruned: start from the dense model")
    if scheme is not None and scheme.grid != "uniform":
        raise LlmsqueezeError(f"pruning quantizes on the uniform grid; grid={scheme.grid!r} is not available with prune")
    scope = sparsity.scope or row.default_scope
    if scope not in row.scopes:
        raise LlmsqueezeError(f"scope {scope!r} is not available for {method}: use one of {', '.join(row.scopes)}")
    sparsity = SparsityScheme(sparsity.sparsity, sparsity.pattern, scope)
    names = quantizable_modules(model, QuantScheme(include=include or [], exclude=exclude or []))
    if not names:
        raise LlmsqueezeError(f"no layer of {type(model).__name__} matches include={include} exclude={exclude}: loosen the patterns")
    nm = sparsity.pattern
    if nm is not None:
        for n in names:
            check_nm_width(*nm, linear_weight(model.get_submodule(n)).shape[1], n)
    if owl is not None and not row.owl:
        raise LlmsqueezeError("owl allocation is available with wanda and sparsegpt")
    if refit not in (None, False, True, "auto"):
        raise LlmsqueezeError(f"refit={refit!r}: use True, False or 'auto'")
    if refit and row.refit_default is None:
        raise LlmsqueezeError("refit solves the kept weights from the calibration Hessian: use it with wanda or sparsegpt")
    if owl is not None and nm is not None:
        raise LlmsqueezeError("owl allocates unstructured sparsity per layer; it does not apply to an N:M pattern")

    log.info("pruning %d layers with %s: %s", len(names), method, nm if nm else f"sparsity {sparsity.sparsity}")
    job = _new_job(model, scheme, names, options, progress, {})
    job.sparsity = sparsity
    job.method_args = {"scope": scope}
    if row.calibrated:
        _calibration(job, data, method)
    if owl is not None:
        from .pruning.owl import owl_sparsities

        job.layer_sparsity = owl_sparsities(model, job.batches, names, sparsity.sparsity, device=job.device, **owl)
        job.method_args["owl"] = dict(owl)
    if row.refit_default is not None:
        job.extra["refit"] = row.refit_default if refit is None else (refit if refit == "auto" else bool(refit))
    _compress(job, row)
    _mark_pruned(model, method, names, sparsity, scheme, job.method_args, job.layer_sparsity)
    return model


def _mark_pruned(model: nn.Module, method: str, names: list[str], sparsity: SparsityScheme,
                 scheme: QuantScheme | None, method_args: dict, layer_sparsity: dict | None) -> None:
    """model.config.quantization_config of a pruned model (format version 2: scheme may be null)."""
    from .formats.native import quantization_config, sparsity_config

    kept = [n for n in all_linear_names(model) if n not in set(names)]
    qc = quantization_config(scheme or QuantScheme(), method, kept, method_args)
    qc["format_version"] = 2
    qc["scheme"] = None if scheme is None else scheme.to_dict()
    qc["sparsity"] = sparsity_config(sparsity.sparsity, sparsity.pattern, names, sparsity.scope, layer_sparsity)
    model.config.quantization_config = qc


# ------------------------------------------------------------------------------- training
GRADUAL_SCORES = ("magnitude", "movement", "wanda", "random")


def finetune_pruned(model: nn.Module, ids: torch.Tensor, options, teacher: nn.Module | None = None,
                    pattern=None, progress: bool = True) -> list[dict]:
    """Recovery fine-tuning of a pruned model loaded from a sparse float checkpoint, in place: its
    sparse layers become trainable Linears, train with their masks held exactly (pruning/finetune.py)
    and are checked after; the model then saves as a sparse checkpoint of the same pattern.
    `pattern` ("N:M" or None), when given, must be the checkpoint's. -> per-step records."""
    from .formats.native import decompress_sparse_layers
    from .pruning.finetune import check_text_length, finetune

    options.check()
    check_text_length(ids, options.batch_size, options.seq_len)
    qc = model.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    stored = (qc.get("sparsity") or {}).get("nm_pattern")
    wanted = SparsityScheme(None, pattern).pattern if pattern is not None else None
    if wanted is not None and (stored is None or SparsityScheme(None, stored).pattern != wanted):
        raise LlmsqueezeError(f"the checkpoint's pattern is {stored or 'unstructured'}, not {wanted[0]}:{wanted[1]}: "
                              "fine-tuning holds the checkpoint's mask; prune again to change the pattern")
    masks = decompress_sparse_layers(model)
    history = finetune(model, ids, options, masks=masks, teacher=teacher, progress=progress)
    _check_held(model, masks)
    qc = model.config.quantization_config
    qc["method_args"] = {**qc.get("method_args", {}), "finetune": _finetune_args(options, teacher, history)}
    return history


def prune_gradual(model: nn.Module, ids: torch.Tensor, sparsity: SparsityScheme, options, score: str = "magnitude",
                  end: float = 0.6, every: int | None = None, schedule: str = "cubic", regrow: str = "zero",
                  teacher: nn.Module | None = None, include: list[str] | None = None,
                  exclude: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Prune the decoder blocks' Linears of a dense `model` while it fine-tunes (pruning/schedule.py):
    from dense to `sparsity` (unstructured, uniform per layer, or N:M) on the `schedule` over the first
    `end` of the steps, masks chosen again every `every` steps (default: 10 updates) by `score`, then
    trained with the mask held. -> per-step records; the model ends pruned, marked for saving."""
    split_fused_experts(model)
    from .pruning.finetune import check_text_length, finetune
    from .pruning.masks import check_nm_width
    from .pruning.schedule import GradualPruner

    options.check()
    check_text_length(ids, options.batch_size, options.seq_len)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise LlmsqueezeError("this model is already quantized or pruned: start from the dense model")
    if score not in GRADUAL_SCORES:
        raise LlmsqueezeError(f"gradual pruning scores weights by {', '.join(GRADUAL_SCORES)}, not {score!r}")
    if not 0 < end <= 1:
        raise LlmsqueezeError(f"end={end}: the schedule must end within the steps, in (0, 1]")
    if sparsity.scope not in (None, "layer"):
        raise LlmsqueezeError(f"gradual pruning prunes the same share of every layer; scope {sparsity.scope!r} is "
                              "not available (the API's GradualPruner also ranks globally)")
    names = quantizable_modules(model, QuantScheme(include=include or [], exclude=exclude or []))
    if not names:
        raise LlmsqueezeError(f"no layer of {type(model).__name__} matches include={include} exclude={exclude}: loosen the patterns")
    if sparsity.pattern is not None:
        for n in names:
            check_nm_width(*sparsity.pattern, linear_weight(model.get_submodule(n)).shape[1], n)
    stop = max(1, round(end * options.steps))
    every = every or max(1, stop // 10)
    params = {f"{n}.weight": model.get_submodule(n).weight for n in names}
    pruner = GradualPruner(model, None if sparsity.pattern else sparsity.sparsity, pattern=sparsity.pattern, start=0,
                           end=stop, every=every, schedule=schedule, score=score, regrow=regrow, params=params,
                           seed=options.seed)
    history = finetune(model, ids, options, pruner=pruner, teacher=teacher, progress=progress)
    masks = pruner.finish()
    if not pruner.frozen:
        raise LlmsqueezeError(f"the schedule did not reach its end (step {stop} of {options.steps})")
    layer_sparsity = {n.rpartition(".")[0]: 1 - int(m.sum()) / m.numel() for n, m in masks.items()}
    method_args = {"scope": "layer", "schedule": {"kind": schedule, "score": score, "end_step": stop, "every": every,
                                                  "regrow": regrow, "updates": pruner.history},
                   "finetune": _finetune_args(options, teacher, history)}
    _mark_pruned(model, f"gradual-{score}", names, SparsityScheme(sparsity.sparsity, sparsity.pattern, "layer"),
                 None, method_args, layer_sparsity)
    return history


def _check_held(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, keep in masks.items():
        if (params[n].detach()[~keep.to(params[n].device)] != 0).any():
            raise LlmsqueezeError(f"{n} lost its pattern during fine-tuning (a bug): nothing was saved")


def _finetune_args(options, teacher, history: list[dict]) -> dict:
    return {"steps": options.steps, "lr": options.lr, "batch_size": options.batch_size, "seq_len": options.seq_len,
            "tokens": options.steps * options.batch_size * options.seq_len, "seed": options.seed,
            "distill_weight": options.distill_weight if teacher is not None else 0.0,
            "temperature": options.temperature, "bos": options.bos_token_id is not None,
            "final_loss": history[-1]["loss"] if history else None}


# ------------------------------------------------------------------------------ from disk
STOP_AFTER_BLOCK_ENV = "LLMSQUEEZE_TEST_STOP_AFTER_BLOCK"  # tests: SIGKILL self once block k is saved
BLOCK_DELAY_ENV = "LLMSQUEEZE_TEST_BLOCK_DELAY"  # tests: seconds to sleep after each block is saved


def quantize_lazy(
    model_id: str,
    out: str | os.PathLike,
    scheme: QuantScheme,
    data: torch.Tensor | None = None,
    method: str = "rtn",
    *,
    tokenizer=None,
    dtype: torch.dtype | str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    progress: bool = True,
    options: CalibrationOptions | None = None,
    **engine_options,
) -> tuple[Path, EngineStats | None]:
    """Quantize the dense model `model_id` (local dir or hub id) straight into the checkpoint dir
    `out`, one block in memory at a time; the result equals, tensor for tensor, quantize() followed
    by save_quantized(). Interrupted (Ctrl-C, SIGTERM, a crash), it leaves OUT.partial/, and the same
    call with resume=True finishes it. Raises KeyboardInterrupt (with a message) when interrupted.
    Returns (out, the engine's statistics: None when a resumed run had no block left).

    `options` (or its fields as keywords: device, offload, true_sequential, act_order, static_groups,
    damp, block_size, batch_size) say how a calibrated method runs, as for llmsqueeze.quantize."""
    from .formats.writer import prepare_output_dir
    from .lazy import LazyModel, bound_heap_growth, check_resources, dir_bytes, save_generation_config
    from .streaming import PartialCheckpoint, model_files_key, parse_size, sigterm_as_interrupt, tensor_sha256

    row = quantize_method(method)
    if _act_scheme_name(scheme):
        raise LlmsqueezeError(f"{_act_scheme_name(scheme)} runs in memory, not lazily: use llmsqueeze.quantize (--no-lazy)")
    if not row.lazy:  # awq's balancing and autoround's training run on a model in memory for now
        raise LlmsqueezeError(f"method {method!r} runs in memory, not lazily: use llmsqueeze.quantize (--no-lazy)")
    check_quantize_options(row, scheme.grid)
    scheme = scheme.with_clip_default(row.clip_search)
    if options is None:
        options = CalibrationOptions(**engine_options)
    elif engine_options:
        raise LlmsqueezeError("pass either options= or its fields as keywords, not both")
    out = prepare_output_dir(out, overwrite=overwrite, inputs=(model_id,))
    shard_bytes = parse_size(max_shard_size)
    bound_heap_growth()
    lazy = LazyModel(model_id, dtype)
    model = lazy.model
    names, head_name = selected_layers(model, scheme)
    if head_name is not None:
        lazy.load_outside(head=True)
        untie_lm_head(model, head_name)
    job = _new_job(model, scheme, names, options, progress, {})
    what = _needs_data(row, scheme)
    if what is not None:
        _calibration(job, data, what, row.sample_batches)
        lazy.load_outside()  # the embeddings, for the capture of block inputs
    qmethod = _build(job, row)
    key = {
        "model": str(lazy.path.resolve()), "model_files": model_files_key(lazy.path), "scheme": scheme.to_dict(),
        "method": method, "method_args": job.method_args, "calibration": tensor_sha256(job.ids),
        "dtype": str(lazy.dtype).removeprefix("torch."), "max_shard_size": shard_bytes, "layers": names,
    }
    block_names, outside_names = _split_blocks(model, names, bool(job.batches))  # before any work
    partial = out.parent / (out.name + ".partial")
    g_idx = row.act_order and options.act_order and not options.static_groups
    check_resources(lazy, names, scheme, out, device=job.device, offload=options.offload, data=job.ids,
                    act_order_g_idx=g_idx, max_shard_size=shard_bytes,
                    already_written=dir_bytes(partial) if resume and partial.is_dir() else 0)

    with sigterm_as_interrupt():
        run = PartialCheckpoint(out, key, len(lazy.blocks), shard_bytes, resume=resume, overwrite=overwrite)
        try:
            stop_after = int(os.environ.get(STOP_AFTER_BLOCK_ENV, "-1"))
            delay = float(os.environ.get(BLOCK_DELAY_ENV, "0"))

            def block_done(i, block, hidden):
                state = lazy.block_state(i)
                run.block_done(i, state, hidden if job.batches else None)
                lazy.release_block(i)
                if i == stop_after:
                    import signal

                    os.kill(os.getpid(), signal.SIGKILL)
                if delay:
                    import time

                    time.sleep(delay)

            # blocks already written stay meta; their Linears still become (empty) QuantLinears so
            # that modules_to_not_convert comes out as in an uninterrupted run
            for i in range(run.blocks_done):
                for n in block_names:
                    if n.startswith(lazy.block_prefix(i)):
                        set_module(model, n, _meta_quant_linear(model.get_submodule(n), scheme))
            left = run.blocks_done < len(lazy.blocks)
            if not left:  # only the head is left (with --lm-head, RTN): nothing to capture
                job.batches = []
            hooks = dict(block_loader=lazy.load_block, block_done=block_done, start_block=run.blocks_done,
                         start_hidden=run.load_inputs() if left else None,
                         on_captured=None if outside_names else lazy.release_outside)
            stats = _compress(job, row, qmethod, hooks)
            stats = stats if left else None
            model.config.quantization_config = _quantization_config(job, row, scheme)
            model.config.dtype = lazy.dtype

            def extras(d: Path) -> None:
                model.config.save_pretrained(d)
                save_generation_config(model, lazy.path, d)
                if tokenizer is not None:
                    tokenizer.save_pretrained(d)

            return run.finish(lazy.outside_entries(), extras), stats
        except KeyboardInterrupt:
            done = run.blocks_done if run.dir.exists() else 0
            raise KeyboardInterrupt(
                f"interrupted after {done} of {len(lazy.blocks)} blocks; the run is saved in {run.dir}: "
                "rerun the same command with --resume to continue"
            ) from None


def _meta_quant_linear(layer: nn.Module, scheme: QuantScheme) -> nn.Module:
    from .nn import empty_quant_linear

    n, k = linear_weight(layer).shape
    return empty_quant_linear(k, n, scheme, bias=layer.bias is not None, device="meta")

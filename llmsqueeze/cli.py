"""`llmsqueeze quantize | export | info | eval` — argument parsing and the one-line errors; the work is in
the library modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import COMPUTE_DTYPES, FLOAT_FORMATS, LlmsqueezeError

DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"llmsqueeze: error: {message} (see '{self.prog} --help')\n")


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _load_any(model: str, dtype: str, **kwargs):
    """A llmsqueeze checkpoint or a dense model, with its tokenizer (None if it has none)."""
    from transformers import AutoTokenizer

    from .api import load_dense
    from .formats.files import read_config
    from .formats.loader import from_pretrained
    from .nn import adapt_to_cpu

    path = Path(model).expanduser()
    quantized = path.is_dir() and (path / "config.json").is_file() and "quantization_config" in read_config(path)
    if quantized:
        m = from_pretrained(path, dtype=_torch_dtype(dtype), **kwargs)
    else:
        m = load_dense(model, _torch_dtype(dtype), **kwargs)
        if dtype == "auto":  # as from_pretrained does for checkpoints: float32 compute where half is slow here
            adapt_to_cpu(m)
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else model)
    except Exception:  # a model dir without a tokenizer
        tok = None
    return m.eval(), tok


def cmd_quantize(args) -> int:
    import torch

    from .api import quantize
    from .config import QuantScheme
    from .engine import check_devices
    from .formats.native import save_quantized
    from .formats.writer import prepare_output_dir
    from .methods import check_quantize_options, quantize_method

    torch.manual_seed(args.seed)
    row = quantize_method(args.method)
    gguf = _gguf_mix(args)
    w8a8 = args.scheme != "weight-only"  # int8 W8A8, a float format or gguf: in memory
    mixed = args.avg_bits is not None
    if gguf is not None:
        from .config import GGUFScheme

        if mixed:
            raise LlmsqueezeError("--avg-bits mixes integer bit widths; a gguf scheme takes llama.cpp's mix: drop --avg-bits")
        scheme = GGUFScheme(mix=gguf, include=args.include or [], exclude=args.exclude or [], lm_head=args.lm_head)
        args.scheme = "gguf"
        calibrated = row.calibrated
    elif w8a8:
        if args.grid != "uniform":
            raise LlmsqueezeError(f"--grid {args.grid} is an integer weight-only option; --scheme {args.scheme} has its "
                                  "own grid, drop --grid")
        if mixed:
            raise LlmsqueezeError(f"--avg-bits mixes integer weight-only bit widths; it does not apply to --scheme {args.scheme}")
        scheme = _w8a8_scheme(args) if args.scheme == "w8a8" else _float_scheme(args)
        calibrated = scheme.needs_data or row.calibrated
    else:
        scheme = QuantScheme(
            bits=args.bits, group_size=args.group_size, sym=args.sym, scale_dtype=args.scale_dtype,
            clip_search=args.clip_search, clip_norm=args.clip_norm, clip_weight_power=args.clip_weight_power,
            include=args.include or [], exclude=args.exclude or [], lm_head=args.lm_head, grid=args.grid,
        )
        calibrated = row.calibrated
    check_quantize_options(row, getattr(scheme, "grid", "uniform"), args.avg_bits, w8a8 and args.scheme)  # before the model loads
    if mixed:
        from .mixed import check_candidates

        check_candidates(args.bit_candidates)
        calibrated = True  # the sensitivity is measured on the calibration data, for rtn too
    extra = {}
    if row.sample_batches:  # autoround: one-line errors before the model loads
        from .quant.autoround import check_autoround_args

        check_autoround_args(args.iters, args.lr, 8, args.autoround_init, 0.5)
        if gguf is not None:
            from .quant.autoround import check_gguf_args
            from .quant.ggml import MIXES

            check_gguf_args([MIXES[gguf].default if gguf in MIXES else gguf], args.autoround_init)
        if args.resume:
            raise LlmsqueezeError("--resume continues a lazy run; autoround runs in memory, start it again")
        extra = {"iters": args.iters, "lr": args.lr, "seed": args.seed, "init": args.autoround_init,
                 "float_targets": args.autoround_targets == "float",
                 "amp": {"auto": None, "on": True, "off": False}[args.amp],
                 "token_weighting": args.autoround_loss == "capped"}
    # before the slow part; --out never over or inside what is read
    prepare_output_dir(args.out, args.overwrite, inputs=(args.model, args.calib if calibrated else None))
    if calibrated:
        calib_texts = _calibration_texts(args)  # a bad --calib fails before the model loads
        check_devices(args.device, args.offload)  # ... and so does a bad --device / --offload
        args.seq_len = _seq_len_for(args.model, args.seq_len)  # ... and a --seq-len past learned positions is clipped
    # W8A8's SmoothQuant and AWQ fold scales into the norms, mixed precision needs every layer's
    # sensitivity before the first is quantized, autoround trains whole blocks: in memory
    lazy = args.lazy and not w8a8 and not mixed and row.lazy
    if args.resume and (w8a8 or not row.lazy):
        raise LlmsqueezeError("--resume continues a lazy weight-only run; W8A8, the float formats and AWQ run in memory, "
                              "start it again")
    if lazy:
        from .lazy import has_safetensors, resolve_model_dir

        model_dir = resolve_model_dir(args.model)
        if not has_safetensors(model_dir) and not args.resume:
            logging.getLogger("llmsqueeze").warning("%s has no safetensors weights: loading it whole (--no-lazy)", args.model)
            lazy = False
    elif args.resume:
        if mixed:
            raise LlmsqueezeError("--resume continues a lazy run; --avg-bits runs in memory, start it again")
        raise LlmsqueezeError("--resume continues a lazy run; drop --no-lazy")
    if lazy:
        return _quantize_lazy(args, scheme, model_dir, calib_texts if row.calibrated else None)
    model, tok, data = _model_tokenizer_data(args, calib_texts if calibrated else None)
    quantize(
        model, scheme, data=data, method=args.method, device=args.device, offload=args.offload,
        true_sequential=args.true_sequential, act_order=args.act_order != "off", static_groups=args.act_order == "static",
        damp=args.damp, block_size=args.block_size, batch_size=args.batch_size, compute_dtype=args.compute_dtype,
        expert_min_tokens=args.expert_min_tokens, experts_per_pass=args.experts_per_pass,
        **({"avg_bits": args.avg_bits, "bit_candidates": tuple(args.bit_candidates)} if mixed else {}), **extra,
    )
    _print_stats(args.method, getattr(model, "_llmsqueeze_stats", None))
    out = save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    _print_coverage(out)
    if mixed:  # the sensitivity table and the allocation, beside the weights
        report = model._llmsqueeze_mixed
        (out / "sensitivity.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"mixed precision: {report['bits_per_weight']:.4f} bits/weight (budget {args.avg_bits}), layers per width "
              f"{report['histogram']}; sensitivity in {out / 'sensitivity.json'}", file=sys.stderr)
    print(out)
    return 0


def _gguf_mix(args) -> str | None:
    """The llama.cpp mix or GGML type of --scheme gguf:MIX (or --grid gguf:TYPE), else None; any other
    --scheme must be one of the named ones."""
    from .config import GGUF_MIXES, GGUF_TYPES

    for opt, value in (("--scheme", args.scheme), ("--grid", args.grid)):
        if value.lower().startswith("gguf:"):
            if opt == "--grid" and args.scheme != "weight-only":
                raise LlmsqueezeError(f"--grid {value} and --scheme {args.scheme}: pass one of them")
            return value.lower()
    if args.scheme not in ("weight-only", "w8a8") + FLOAT_FORMATS:
        raise LlmsqueezeError(f"--scheme {args.scheme!r} is not known: use weight-only, w8a8, {', '.join(FLOAT_FORMATS)} "
                              f"or gguf:MIX with MIX one of {', '.join(GGUF_MIXES)} (or a GGML type: {', '.join(GGUF_TYPES)})")
    return None


def _smooth_alpha(args, default: str):
    a = default if args.smooth_alpha is None else args.smooth_alpha
    if a not in ("auto", "off"):
        try:
            a = float(a)
        except ValueError:
            raise LlmsqueezeError(f"--smooth-alpha {a!r} is not valid: use a number in [0, 1], auto or off") from None
    return None if a == "off" else a


def _w8a8_scheme(args):
    """--smooth-alpha/--act/--static-clip/--include/--exclude/--lm-head as a W8A8Scheme."""
    from .config import W8A8Scheme

    return W8A8Scheme(act=args.act, static_clip=args.static_clip or "mse", smooth_alpha=_smooth_alpha(args, "auto"),
                      include=args.include or [], exclude=args.exclude or [], lm_head=args.lm_head)


def _float_scheme(args):
    """--scheme FORMAT with --act/--static-clip/--smooth-alpha/--scale-search/... as a FloatScheme."""
    from .config import FloatScheme

    search = {"auto": None, "on": True, "off": False}[args.scale_search]
    # unset: the scheme's default (auto where activations are quantized); set on a weight-only format:
    # refused by the scheme in one line
    smooth = "default" if args.smooth_alpha is None else _smooth_alpha(args, "off")
    return FloatScheme(format=args.scheme, act=args.act, static_clip=args.static_clip or "max",
                       smooth_alpha=smooth, scale_search=search,
                       include=args.include or [], exclude=args.exclude or [], lm_head=args.lm_head)


def _calibration_texts(args) -> list[str]:
    """--calib read and --n-samples/--seq-len checked (one-line errors), before any model is loaded."""
    from .data import load_calibration_texts

    if args.n_samples < 1 or args.seq_len < 2:
        raise LlmsqueezeError(f"--n-samples {args.n_samples} --seq-len {args.seq_len}: use at least 1 sample of 2 tokens")
    return load_calibration_texts(args.calib)


def _seq_len_for(model: str, seq_len: int, what: str = "--seq-len") -> int:
    """`seq_len` checked against the model's positions before the model loads (lazy.check_positions):
    clipped with a one-line notice where the positions are learned (GPT-2, OPT), a one-line warning
    past a RoPE model's max_position_embeddings."""
    from .lazy import check_positions, model_config

    config = model_config(model)
    return seq_len if config is None else check_positions(config, seq_len, what, clip=True)


def _model_tokenizer_data(args, calib_texts):
    """-> (dense model, tokenizer or None, calibration token ids or None when calib_texts is None)."""
    from .api import load_dense

    model = load_dense(args.model, _torch_dtype(args.dtype))  # a bad model is the error, before the tokenizer
    return (model, *_tokenizer_and_data(args, os.path.expanduser(args.model), calib_texts))


def _tokenizer_and_data(args, model_dir: str, calib_texts):
    """-> (the tokenizer beside the model, or None with a warning; the calibration token ids of
    calib_texts, BOS first where the tokenizer puts it first, or None when calib_texts is None)."""
    from transformers import AutoTokenizer

    from .data import calibration_batches

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        if calib_texts is not None:  # the one line, without a warning about saving that will not happen
            raise LlmsqueezeError(f"{args.model} has no tokenizer to read --calib with; save one beside the model") from None
        logging.getLogger("llmsqueeze").warning("no tokenizer found beside %s; saving the model without one", args.model)
        return None, None
    if calib_texts is None:
        return tok, None
    return tok, calibration_batches(tok, calib_texts, args.n_samples, args.seq_len, args.seed, name=args.calib)


def _quantize_lazy(args, scheme, model_dir, calib_texts) -> int:
    """quantize, block by block from the shards into the output dir (resumable)."""
    from .lazy import dense_config
    from .pipeline import quantize_lazy

    dense_config(str(model_dir))  # a bad config.json is the error, before the tokenizer is looked for
    tok, data = _tokenizer_and_data(args, str(model_dir), calib_texts)
    out, stats = quantize_lazy(
        str(model_dir), args.out, scheme, data=data, method=args.method, tokenizer=tok, dtype=_torch_dtype(args.dtype),
        resume=args.resume, overwrite=args.overwrite, max_shard_size=args.max_shard_size, device=args.device,
        offload=args.offload, true_sequential=args.true_sequential, act_order=args.act_order != "off",
        static_groups=args.act_order == "static", damp=args.damp, block_size=args.block_size, batch_size=args.batch_size,
        compute_dtype=args.compute_dtype, expert_min_tokens=args.expert_min_tokens, experts_per_pass=args.experts_per_pass,
    )
    _print_stats(args.method, stats)
    _print_coverage(out)
    print(out)
    return 0


def _print_coverage(out) -> None:
    """After a save: the share of the parameters compressed and any weights left dense in modules
    llmsqueeze does not handle (info.coverage_lines), on stderr."""
    from .info import checkpoint_info, coverage_lines

    for label, line in zip(("share", "left dense"), coverage_lines(checkpoint_info(out))):
        print(f"{label}: {line}", file=sys.stderr)


def _print_stats(method: str, stats) -> None:
    if stats is not None:
        dev = "" if stats.peak_device_mib is None else f", peak device memory {stats.peak_device_mib:,.0f} MiB"
        print(f"{method}: {stats.layers} layers in {stats.blocks} blocks, {stats.seconds:.1f} s, "
              f"peak RSS {stats.peak_rss_mib:,.0f} MiB{dev}", file=sys.stderr)


def cmd_prune(args) -> int:
    import torch

    from .api import prune
    from .config import QuantScheme, SparsityScheme
    from .formats.native import save_quantized
    from .formats.writer import prepare_output_dir
    from .methods import prune_method

    torch.manual_seed(args.seed)
    if args.schedule == "gradual":
        return _prune_gradual(args)
    if args.steps is not None or args.data is not None or args.distill is not None:
        raise LlmsqueezeError("--steps, --data and --distill go with --schedule gradual (pruning while fine-tuning)")
    args.batch_size = args.batch_size or 1
    structured = args.structured
    if structured:
        from transformers import AutoConfig

        from .pruning.structured import check_ratio, check_structured

        check_ratio(args.mlp_ratio)
        if isinstance(args.attn_ratio, bool) or not (0 < args.attn_ratio <= 1):
            raise LlmsqueezeError(f"--attn-ratio {args.attn_ratio} must lie in (0, 1]: the fraction of key/value groups kept")
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(args.model))
        except (OSError, ValueError):
            config = None  # load_dense below says what is wrong with the model
        if config is not None:
            check_structured(config, args.mlp_ratio)
        if args.sparsity is not None or args.pattern is not None or args.bits is not None:
            raise LlmsqueezeError("--structured removes MLP channels (--mlp-ratio); it does not take --sparsity, --pattern or --bits")
    else:
        row = prune_method(args.method)
        if (args.sparsity is None) == (args.pattern is None):
            raise LlmsqueezeError("give exactly one of --sparsity S (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
        sparsity = SparsityScheme(args.sparsity, args.pattern, args.scope)  # parsed and checked once
    scheme = None
    if args.bits is not None:
        scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym)
    needs_data = structured and args.score == "activation" or not structured and row.calibrated
    prepare_output_dir(args.out, args.overwrite, inputs=(args.model, args.calib if needs_data else None))
    if needs_data:
        calib_texts = _calibration_texts(args)
        args.seq_len = _seq_len_for(args.model, args.seq_len)
    model, tok, data = _model_tokenizer_data(args, calib_texts if needs_data else None)
    if structured:
        from .pruning.structured import prune_attention_groups, prune_mlp_channels, save_structured

        if args.attn_ratio < 1:
            prune_attention_groups(model, args.attn_ratio, score=args.score, data=data)
        if args.mlp_ratio < 1:
            prune_mlp_channels(model, args.mlp_ratio, score=args.score, data=data, progress=not args.quiet)
        print(save_structured(model, args.out, tokenizer=tok, overwrite=args.overwrite))
        return 0
    owl = {"lam": args.owl_lambda, "m": args.owl_m} if args.owl else None
    prune(model, args.method, sparsity, data=data, scheme=scheme, progress=not args.quiet, owl=owl, device=args.device, offload=args.offload,
          true_sequential=args.true_sequential, damp=args.damp, block_size=args.block_size, batch_size=args.batch_size,
          refit=args.refit, compute_dtype=args.compute_dtype, expert_min_tokens=args.expert_min_tokens,
          experts_per_pass=args.experts_per_pass)
    stats = getattr(model, "_llmsqueeze_stats", None)
    if stats is not None:
        print(f"{args.method}: {stats.layers} layers in {stats.blocks} blocks, {stats.seconds:.1f} s, "
              f"peak RSS {stats.peak_rss_mib:,.0f} MiB", file=sys.stderr)
    out = save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    _print_coverage(out)
    print(out)
    return 0


def _training_run(args, model_dir: str):
    """--data read and tokenized, the fine-tuning options checked, --out prepared, the teacher loaded:
    -> (token ids [T], tokenizer, FinetuneOptions, teacher or None)."""
    import torch
    from transformers import AutoTokenizer

    from .data import bos_token_id
    from .evaluate import load_eval_text, tokenize_text
    from .formats.writer import prepare_output_dir
    from .pruning.finetune import FinetuneOptions, check_text_length

    if args.data is None or args.steps is None:
        raise LlmsqueezeError("give the training text and the number of steps: --data FILE --steps N")
    options = FinetuneOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size or 4, seq_len=args.seq_len,
                              distill_weight=args.distill_weight, temperature=args.temperature, seed=args.seed).check()
    prepare_output_dir(args.out, args.overwrite, inputs=(model_dir, args.data, args.distill))  # before the slow part
    options.seq_len = _seq_len_for(model_dir, options.seq_len)
    text = load_eval_text(args.data)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(model_dir))
    except Exception:
        raise LlmsqueezeError(f"{model_dir} has no tokenizer to read --data with; save one beside the model") from None
    ids = tokenize_text(tok, text)
    check_text_length(ids, options.batch_size, options.seq_len)
    options.bos_token_id = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    teacher = None
    if args.distill:
        from .api import load_dense

        teacher = load_dense(args.distill, torch.float32).eval()
    return ids, tok, options, teacher


def _prune_gradual(args) -> int:
    import torch

    from .api import load_dense, prune_during_finetune
    from .formats.native import save_quantized
    from .pipeline import GRADUAL_SCORES

    if args.structured or args.bits is not None or args.owl:
        raise LlmsqueezeError("--schedule gradual prunes unstructured or N:M weights in float: drop --structured, --bits, --owl")
    if (args.sparsity is None) == (args.pattern is None):
        raise LlmsqueezeError("give exactly one of --sparsity S (e.g. 0.5) or --pattern N:M (e.g. 2:4)")
    if args.method not in GRADUAL_SCORES:
        raise LlmsqueezeError(f"--schedule gradual scores weights by --method {', '.join(GRADUAL_SCORES)}, not {args.method!r}")
    ids, tok, options, teacher = _training_run(args, args.model)
    model = load_dense(args.model, torch.float32)
    prune_during_finetune(model, ids, args.sparsity, args.pattern, options.steps, score=args.method, end=args.prune_end,
                          every=args.every, regrow=args.regrow, lr=options.lr, batch_size=options.batch_size,
                          seq_len=options.seq_len, teacher=teacher, distill_weight=options.distill_weight,
                          temperature=options.temperature, seed=args.seed, bos_token_id=options.bos_token_id,
                          progress=not args.quiet)
    out = save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    _print_coverage(out)
    print(out)
    return 0


def cmd_finetune(args) -> int:
    import torch

    from .api import finetune
    from .formats import check_checkpoint, from_pretrained
    from .formats.native import save_quantized

    torch.manual_seed(args.seed)
    path = Path(args.model).expanduser()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise LlmsqueezeError(f"{args.model} is not a checkpoint directory with a config.json: give a pruned "
                              "llmsqueeze checkpoint (llmsqueeze prune --out DIR)") from None
    if "quantization_config" not in config:
        raise LlmsqueezeError(f"{args.model} is a dense model, so there is no mask to hold: prune it first "
                              "(llmsqueeze prune), or prune while fine-tuning (llmsqueeze prune --schedule gradual)")
    qc = check_checkpoint(path)
    if qc.get("sparsity") is None:
        raise LlmsqueezeError(f"{args.model} holds no pruned layers, so there is no mask to hold: prune it first "
                              "(llmsqueeze prune), or prune while fine-tuning (llmsqueeze prune --schedule gradual)")
    if qc.get("scheme") is not None:
        raise LlmsqueezeError(f"{args.model} is pruned and quantized; fine-tuning trains float weights: fine-tune the "
                              "pruned float checkpoint (llmsqueeze prune without --bits)")
    if args.pattern is not None:
        from .config import NMPattern

        NMPattern.parse(args.pattern)
    ids, tok, options, teacher = _training_run(args, args.model)
    model = from_pretrained(path, dtype=torch.float32)
    finetune(model, ids, options.steps, lr=options.lr, batch_size=options.batch_size, seq_len=options.seq_len,
             teacher=teacher, distill_weight=options.distill_weight, temperature=options.temperature,
             pattern=args.pattern, seed=args.seed, bos_token_id=options.bos_token_id, progress=not args.quiet)
    print(save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite, max_shard_size=args.max_shard_size))
    return 0


def cmd_info(args) -> int:
    from .info import checkpoint_info, format_info

    info = checkpoint_info(args.dir)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_export(args) -> int:
    from .formats import export

    if args.format != "gguf" and (args.type or args.dense_type):
        raise LlmsqueezeError(f"--type and --dense-type apply to --format gguf, not {args.format}")
    gguf = {"type": args.type, "dense_type": args.dense_type} if args.format == "gguf" else {}
    print(export(args.dir, args.format, args.out, overwrite=args.overwrite, checkpoint_format=args.gptq_format,
                 scale_dtype=args.scale_dtype, **gguf))
    return 0


def cmd_eval_ppl(args) -> int:
    from .data import bos_token_id
    from .evaluate import load_eval_text, perplexity, tokenize_text

    text = load_eval_text(args.data)  # bad --data fails before the model loads
    seq_len = _seq_len_for(args.model, args.seq_len)  # ... and windows past learned positions are clipped
    model, tok = _load_any(args.model, args.dtype)
    if tok is None:
        raise LlmsqueezeError(f"{args.model} has no tokenizer; save one beside the model to measure perplexity")
    ids = tokenize_text(tok, text)
    res = perplexity(model, ids, seq_len=seq_len, windows=None if args.full else args.windows,
                     bos_token_id=bos_token_id(tok))
    res.update(model=args.model, data=args.data, dtype=args.dtype)
    bos = ", BOS first" if res["bos"] else ""
    print(f"perplexity {res['ppl']:.4f}  ({res['windows']} windows of {res['seq_len']} tokens{bos}, {args.data})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def cmd_env(args) -> int:
    """This machine as llmsqueeze sees it: CPU instruction sets, the dtype and kernels it picks."""
    import platform

    import torch
    import transformers

    from .kernels import cpu

    info = cpu.cpu()
    lib = cpu.library()
    print(f"llmsqueeze on {platform.machine()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} torch threads")
    print(f"cpu         {info.describe()} (flags from {info.source})")
    print(f"auto dtype  bfloat16 checkpoints compute in {str(cpu.auto_dtype(torch.bfloat16)).removeprefix('torch.')}, "
          f"float16 in {str(cpu.auto_dtype(torch.float16)).removeprefix('torch.')}, on the CPU")
    print("kernels     " + (f"float32 C kernels (AVX2+FMA+F16C, GEMV {lib.lsq_wide()} columns a vector) "
                            f"loaded from {lib._name}" if lib is not None else
                            "float32 C kernels off: torch's paths (int4 kernel for bf16 decode, dequantize + matmul)"))
    if lib is not None:
        print("compiled    " + ("torch.compile'd graphs call them as C++ operators (torch.ops.llmsqueeze_c)"
                                if cpu.c_ops_available() else "torch.compile'd graphs call them as Python custom ops "
                                "(no C++ compiler: about 60 us more per call)"))
    print("int8        " + ("torch._int_mm (native int8 dot products)" if info.native_int8 else
                            "no native int8: W8A8 integer GEMMs run as exact float32 GEMMs"))
    print(f"cuda        {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    return 0


def cmd_eval_latency(args) -> int:
    import torch

    from .evaluate import compute_summary, latency

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _load_any(args.model, args.dtype)
    if args.dtype == "auto":
        print(f"dtype auto: {compute_summary(model)}")
    res = latency(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch, compile=args.compile)
    print(
        f"prefill {res['prefill_tok_s']:.1f} tok/s (ttft {res['ttft_s'] * 1000:.1f} ms)  "
        f"decode {res['decode_tok_s']:.2f} tok/s  peak RSS {res['peak_rss_mib']:.0f} MiB"
    )
    return 0


# Options that `quantize` and `prune` (and `export`) share, declared once; a command may word a help
# text for itself (its own method's name) without declaring the option again.
SHARED = {
    "model": dict(help="a hub id (org/name) or a local model directory"),
    "--calib": dict(default="wikitext2", help="calibration text: wikitext2, c4, pileval, or a .txt/.jsonl file or datasets dir"),
    "--n-samples": dict(type=int, default=128, help="calibration samples (default 128)"),
    "--seq-len": dict(type=int, default=512, help="tokens per calibration sample (default 512)"),
    "--batch-size": dict(type=int, default=1, help="calibration samples per forward (default 1)"),
    "--true-sequential": dict(action="store_true", help="calibrate each block's Linears in order"),
    "--damp": dict(type=float, default=0.01, help="damping, fraction of the mean Hessian diagonal"),
    "--block-size": dict(type=int, default=128, help="columns per block of the Hessian sweep (default 128)"),
    "--expert-min-tokens": dict(type=int, default=32,
                                help="mixtures of experts: an expert routed fewer calibration tokens than this in a "
                                     "block is calibrated on all of the block's tokens (default 32)"),
    "--experts-per-pass": dict(type=int, default=None,
                               help="mixtures of experts: calibrate this many experts per pass over a block, holding "
                                    "only their statistics (GPTQ Hessians) at once; same result (default: all)"),
    "--device": dict(default=None, help="where blocks are calibrated: cuda or cpu (default: cuda if present)"),
    "--offload": dict(default=None, help="where activations wait between blocks (e.g. cpu)"),
    "--dtype": dict(default="auto", choices=DTYPES, help="dtype to load the dense model in"),
    "--compute-dtype": dict(default="auto", choices=COMPUTE_DTYPES,
                            help="what each block computes in while calibrated (auto: float32 on a CPU without native "
                                 "bfloat16, else the model's dtype; `llmsqueeze env` says which)"),
    "--out": dict(required=True, help="output directory (must be empty or absent)"),
    "--overwrite": dict(action="store_true", help="replace a non-empty --out"),
    "--max-shard-size": dict(default="2GB", help="largest safetensors shard (default 2GB)"),
    "--seed": dict(type=int, default=0),
}


def _shared(p: argparse.ArgumentParser, *flags: str, **help_for) -> None:
    """Add the SHARED options `flags` to `p`; help_for={"damp": "..."} words one for this command."""
    for flag in flags:
        kw = dict(SHARED[flag])
        key = flag.lstrip("-").replace("-", "_")
        if key in help_for:
            kw["help"] = help_for[key]
        p.add_argument(flag, **kw)


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="training text: a .txt file (or wikitext2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, warm-up then cosine; default 1e-4)")
    p.add_argument("--distill", default=None, metavar="DENSE_DIR", help="distil the logits of this dense model")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="with --distill: share of the loss that is distillation (default 1: KL only)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --distill: softmax temperature (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from .methods import PRUNE, QUANTIZE, describe

    p = _Parser(prog="llmsqueeze", description="Make Hugging Face causal LMs small and fast.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model and save a packed checkpoint")
    _shared(q, "model")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="inputs per scale; -1 = per output channel (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (zero point fixed at mid-grid)")
    q.add_argument("--avg-bits", type=float, default=None,
                   help="mixed precision: bits per layer from --bit-candidates, chosen by each layer's measured "
                        "sensitivity so that the stored bits per weight (scales and zeros included) average at most "
                        "this (e.g. 3.5); needs --calib data, also with --method rtn; replaces --bits")
    q.add_argument("--bit-candidates", type=int, nargs="+", default=[2, 3, 4, 8], metavar="B",
                   help="with --avg-bits: the widths a layer may get (default 2 3 4 8)")
    q.add_argument("--method", default="rtn", help=describe(QUANTIZE))
    q.add_argument("--scheme", default="weight-only",
                   help="weight-only (default: integer --bits/--group-size), gguf:MIX (GGML's block formats as "
                        "llama-quantize mixes them, e.g. gguf:q4_k_m, gguf:q3_k_m, gguf:q4_0; or one GGML type for all, "
                        "e.g. gguf:q4_k; export with --format gguf), w8a8 (int8 weights and activations, "
                        "integer GEMM), or a floating-point format: fp8 (E4M3 weights per channel, fp8 activations per "
                        "token or static), fp8-block (128x128 weight blocks, 1x128 activation groups), fp8-weight, "
                        "nvfp4 (FP4 weights and activations in groups of 16, FP8 scales), nvfp4-a16 (weights only), "
                        "mxfp4 (FP4 weights in groups of 32, power-of-two scales); --bits/--group-size do not apply "
                        "to these")
    q.add_argument("--smooth-alpha", default=None,
                   help="w8a8 and float formats with quantized activations: SmoothQuant migration strength in [0, 1], "
                        "auto (searched per block, the default) or off")
    q.add_argument("--act", choices=("dynamic", "static"), default="dynamic",
                   help="w8a8 / fp8 activations: per-token scales at run time (dynamic) or one calibrated scale per layer")
    q.add_argument("--static-clip", choices=("mse", "max"), default=None,
                   help="--act static: the scale's fraction of max|x| searched for the least layer-output "
                        "error on calibration tokens (mse, default for w8a8) or max|x| itself (max, default for fp8)")
    q.add_argument("--scale-search", choices=("auto", "on", "off"), default="auto",
                   help="float formats: search each weight group's scale as a fraction of its max|w| for the least "
                        "error (Hessian-weighted under gptq); auto: on for calibrated methods")
    _shared(q, "--calib", calib="gptq calibration text: wikitext2, c4, pileval, or a .txt/.jsonl file or datasets dir")
    _shared(q, "--n-samples")
    _shared(q, "--seq-len")
    _shared(q, "--batch-size")
    q.add_argument("--act-order", choices=("static", "dynamic", "off"), default="static",
                   help="gptq column order: by decreasing Hessian diagonal with group scales fixed up front "
                        "(static, default: no g_idx, fast kernels apply), with groups in that order (dynamic: "
                        "stores g_idx), or natural order (off)")
    _shared(q, "--true-sequential", true_sequential="gptq: calibrate each block's Linears in order (attention in, attention out, MLP in, MLP out)")
    _shared(q, "--damp", damp="gptq damping, fraction of the mean Hessian diagonal")
    _shared(q, "--block-size", block_size="gptq lazy-update block (default 128)")
    _shared(q, "--expert-min-tokens")
    _shared(q, "--experts-per-pass")
    q.add_argument("--iters", type=int, default=200, help="autoround: sign-SGD steps per block (default 200)")
    q.add_argument("--lr", type=float, default=None, help="autoround: step size (default 1/iters, 2/iters at <= 3 bits)")
    q.add_argument("--autoround-targets", choices=("float", "quantized"), default="float",
                   help="autoround: match the float model's block outputs (default) or the float block's on the "
                        "quantized inputs")
    q.add_argument("--autoround-loss", choices=("capped", "mse"), default="capped",
                   help="autoround: block-output MSE with massive-activation tokens weighted as median-norm ones "
                        "(capped, default) or the plain MSE")
    q.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="autoround: train under bfloat16 autocast (auto: where the hardware has bfloat16)")
    q.add_argument("--autoround-init", choices=("rtn", "clip"), default="rtn",
                   help="autoround: start from round-to-nearest min/max (default) or the clip-searched grid")
    _shared(q, "--device")
    _shared(q, "--offload")
    q.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="grid-search the clipping range per group (default: on for gptq, off for rtn)")
    q.add_argument("--clip-norm", type=float, default=2.0, help="error norm p of the clip search (default 2)")
    q.add_argument("--clip-weight-power", type=float, default=1.0,
                   help="weigh each weight's error by |w|**this in the clip search (default 1; 0 = plain MSE)")
    q.add_argument("--grid", default="uniform",
                   help="levels: uniform (default, integer grid with scale and zero), nf (normal-float levels x group "
                        "absmax, 2-4 bits), kmeans (a fitted 2**bits-level codebook per group, 2-4 bits) or gguf:TYPE "
                        "(the same as --scheme gguf:TYPE)")
    q.add_argument("--scale-dtype", default="float16", help="float16 (default), bfloat16 or float32")
    q.add_argument("--include", action="append", metavar="REGEX", help="quantize only layers matching (repeatable)")
    q.add_argument("--exclude", action="append", metavar="REGEX", help="keep layers matching in full precision")
    q.add_argument("--lm-head", action="store_true", help="quantize the output head too")
    _shared(q, "--dtype", "--compute-dtype")
    _shared(q, "--out")
    _shared(q, "--overwrite")
    _shared(q, "--max-shard-size")
    q.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="read one block at a time from the shards and write it straight to --out, so memory holds "
                        "one block (default); --no-lazy loads the whole model first")
    q.add_argument("--resume", action="store_true",
                   help="continue the interrupted run saved in OUT.partial (same options and data required)")
    _shared(q, "--seed")
    q.set_defaults(func=cmd_quantize)

    pr = sub.add_parser("prune", help="prune a model (optionally also quantize) and save it")
    _shared(pr, "model")
    pr.add_argument("--method", default="wanda", help=describe(PRUNE, oxford=True))
    pr.add_argument("--sparsity", type=float, default=None, help="fraction of weights set to zero, in [0, 1)")
    pr.add_argument("--pattern", default=None, help="N:M: keep N of every M inputs (e.g. 2:4)")
    pr.add_argument("--scope", default=None, choices=("row", "layer", "global"),
                    help="unstructured comparison group (default: row, within each column block for sparsegpt; "
                         "layer for magnitude; global: not for wanda/sparsegpt)")
    pr.add_argument("--bits", type=int, default=None, help="also quantize the kept weights to this many bits")
    pr.add_argument("--group-size", type=int, default=128, help="with --bits: inputs per scale (default 128)")
    pr.add_argument("--sym", action="store_true", help="with --bits: symmetric grid")
    pr.add_argument("--owl", action="store_true", help="outlier-weighted per-layer sparsity (wanda, sparsegpt)")
    pr.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                    help="solve each row's kept weights for the least layer-output error once the mask is chosen "
                         "(wanda, sparsegpt; default: sparsegpt refits each layer calibrated on >= 2 tokens per "
                         "input, wanda does not)")
    pr.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: largest deviation from the mean sparsity")
    pr.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold, multiples of the mean score")
    pr.add_argument("--structured", action="store_true", help="remove MLP channels: a physically smaller model")
    pr.add_argument("--mlp-ratio", type=float, default=0.75, help="--structured: fraction of MLP channels kept")
    pr.add_argument("--attn-ratio", type=float, default=1.0,
                    help="--structured: fraction of attention key/value groups kept (each with its query heads; default 1)")
    pr.add_argument("--score", default="activation", choices=("l2", "activation"),
                    help="--structured: channel ranking (default activation: needs --calib; l2 is data-free)")
    _shared(pr, "--calib", calib="calibration text: wikitext2, c4, pileval, or a .txt/.jsonl file or datasets dir")
    _shared(pr, "--n-samples")
    _shared(pr, "--seq-len")
    _shared(pr, "--batch-size", batch_size="calibration samples per forward (default 1); --schedule gradual: windows "
            "per training step (default 4)")
    _shared(pr, "--true-sequential", true_sequential="calibrate each block's Linears in order")
    _shared(pr, "--damp", damp="sparsegpt damping, fraction of the mean Hessian diagonal")
    _shared(pr, "--block-size", block_size="sparsegpt columns per mask block (default 128)")
    _shared(pr, "--expert-min-tokens")
    _shared(pr, "--experts-per-pass")
    _shared(pr, "--device")
    _shared(pr, "--offload")
    _shared(pr, "--dtype", "--compute-dtype")
    _shared(pr, "--out")
    _shared(pr, "--overwrite")
    _shared(pr, "--max-shard-size")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    _shared(pr, "--seed")
    pr.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                    help="gradual: prune while fine-tuning on --data for --steps (cubic schedule, masks chosen again "
                         "every --every steps by --method magnitude, movement, wanda or random)")
    pr.add_argument("--prune-end", type=float, default=0.6,
                    help="--schedule gradual: fraction of the steps by which the final sparsity is reached (default 0.6)")
    pr.add_argument("--every", type=int, default=None, help="--schedule gradual: steps between mask updates "
                    "(default: 10 updates)")
    pr.add_argument("--regrow", choices=("shadow", "zero"), default="zero",
                    help="--schedule gradual: pruned weights are zeroed (zero, default) or keep training in a "
                         "shadow copy and may come back with their own values (shadow)")
    _training_flags(pr)
    pr.set_defaults(func=cmd_prune, batch_size=None)

    ft = sub.add_parser("finetune", help="recovery fine-tuning of a pruned checkpoint, its mask held exactly")
    ft.add_argument("model", help="a sparse llmsqueeze checkpoint (llmsqueeze prune, without --bits)")
    ft.add_argument("--pattern", default=None, help="N:M the checkpoint must have (checked; fine-tuning never changes it)")
    _training_flags(ft)
    ft.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    ft.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    _shared(ft, "--out")
    _shared(ft, "--overwrite")
    _shared(ft, "--max-shard-size")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    _shared(ft, "--seed")
    ft.set_defaults(func=cmd_finetune)

    en = sub.add_parser("env", help="this machine as llmsqueeze sees it: CPU instruction sets, chosen dtype and kernels")
    en.set_defaults(func=cmd_env)

    i = sub.add_parser("info", help="describe a llmsqueeze checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("export", help="write a llmsqueeze checkpoint in a format serving engines load")
    x.add_argument("dir", help="a llmsqueeze checkpoint directory")
    x.add_argument("--format", required=True, help="compressed-tensors (pack-quantized, vLLM), gptq (transformers, TGI, "
                   "vLLM) or gguf (one .gguf file for llama.cpp, Ollama, LM Studio)")
    x.add_argument("--type", default=None, help="gguf: the GGML type or llama.cpp mix the checkpoint must map to "
                   "(checked; a 4-bit sym checkpoint is q4_0, asym q4_1, 8-bit sym q8_0, a gguf:MIX one its MIX)")
    x.add_argument("--dense-type", default=None, help="gguf: type of the embeddings and an untied dense head (default: "
                   "llama-quantize's choice under the mix; f16, f32, bf16 or a GGML type such as q8_0)")
    x.add_argument("--gptq-format", default="gptq", choices=("gptq", "gptq_v2"),
                   help="gptq checkpoint_format: gptq (v1, zero - 1, read everywhere; default) or gptq_v2 (GPTQModel)")
    x.add_argument("--scale-dtype", choices=("float32",), default=None,
                   help="compressed-tensors: store scales in float32, so its loader's dense weights equal ours exactly "
                        "(it dequantizes in the scales' dtype; default: the checkpoint's own scale dtype)")
    x.add_argument("--out", required=True, help="output directory (must be empty or absent); gguf: the .gguf file")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="measure a model")
    esub = e.add_subparsers(dest="what", required=True, parser_class=_Parser)
    ppl = esub.add_parser("ppl", help="perplexity (protocol of the project README)")
    ppl.add_argument("model", help="a llmsqueeze checkpoint dir, a dense model dir or a hub id")
    ppl.add_argument("--data", default="wikitext2", help="a .txt file or a dataset name (wikitext2)")
    ppl.add_argument("--windows", type=int, default=8, help="number of windows (default 8: the quick protocol)")
    ppl.add_argument("--full", action="store_true", help="all windows")
    ppl.add_argument("--seq-len", type=int, default=2048)
    ppl.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    ppl.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ppl.set_defaults(func=cmd_eval_ppl)
    lat = esub.add_parser("latency", help="prefill and decode speed")
    lat.add_argument("model")
    lat.add_argument("--dtype", default="auto", choices=DTYPES,
                     help="auto (default): the checkpoint's dtype, float32 compute where half precision is not "
                          "native on this CPU (see `llmsqueeze env`)")
    lat.add_argument("--prompt-len", type=int, default=128)
    lat.add_argument("--new-tokens", type=int, default=32)
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    lat.add_argument("--compile", action="store_true", help="a static KV cache and torch.compile'd steps, as "
                     "generate(cache_implementation='static') runs them (compilation is not timed)")
    lat.set_defaults(func=cmd_eval_latency)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # errors after loading stay one line
    try:
        return args.func(args)
    except LlmsqueezeError as e:
        print(f"llmsqueeze: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        print(f"llmsqueeze: {e}" if str(e) else "llmsqueeze: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

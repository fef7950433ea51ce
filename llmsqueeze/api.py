"""The user's verbs: quantize or prune a model in memory (llmsqueeze.pipeline runs them), load a dense
model with clear errors (llmsqueeze.lazy)."""
from __future__ import annotations

from torch import nn

from .config import CalibrationOptions, FloatScheme, LlmsqueezeError, QuantScheme, SparsityScheme, W8A8Scheme
from .lazy import load_dense  # noqa: F401 (one of the user's verbs, defined beside the dense-model source)
from .pipeline import finetune_pruned, prune_gradual, prune_model, quantize_model


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
    compute_dtype: str = "auto",
    expert_min_tokens: int = 32,
    experts_per_pass: int | None = None,
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
    architecture's order; offload keeps block activations on that device between blocks;
    compute_dtype what each block computes in while calibrated ("auto": the model's dtype, float32 on
    a CPU without native half precision; "model", "float32", "bfloat16"; CalibrationOptions).

    Mixtures of experts (Mixtral, Qwen2/Qwen3-MoE, gpt-oss, DeepSeek-V3): the fused experts become
    one Linear per expert matrix (llmsqueeze.models.MOE_LAYOUTS), each calibrated on the tokens the
    real router sends it, unweighted by the router weights; an expert routed fewer than
    `expert_min_tokens` calibration tokens in its block is calibrated on all of that block's tokens
    (logged per expert; llmsqueeze.engine). Routers stay dense. `experts_per_pass` (e.g. 8)
    calibrates that many experts per pass over a block, so only their statistics are held at once
    (the same result, one block pass per chunk).

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
    of massive-activation tokens in the loss at that of a median-norm token. With a GGUFScheme it learns
    inside each Linear's GGML type (the offsets and the sub-block step/min multipliers, trained
    through the format's own scale quantization) and gives GGUFLinear layers.
    """
    if scheme is None:
        scheme = QuantScheme(**scheme_kwargs)
    elif scheme_kwargs:
        if isinstance(scheme, (W8A8Scheme, FloatScheme)) and set(scheme_kwargs) <= {"search_batches"}:
            pass  # W8A8's own option
        else:
            raise LlmsqueezeError("pass either a QuantScheme or scheme keyword arguments, not both")
    options = CalibrationOptions(device, offload, true_sequential, act_order, static_groups, damp, block_size, batch_size,
                                 compute_dtype, expert_min_tokens, experts_per_pass)
    extra = {"iters": iters, "lr": lr, "seed": seed, "init": init, "batch_samples": batch_samples,
             "float_targets": float_targets, "amp": amp, "token_weighting": token_weighting, **scheme_kwargs}
    return quantize_model(model, scheme, data, method, progress, options=options, extra=extra, avg_bits=avg_bits,
                          bit_candidates=bit_candidates, sensitivity=sensitivity)


def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float | SparsityScheme | None = None,
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
    compute_dtype: str = "auto",
    expert_min_tokens: int = 32,
    experts_per_pass: int | None = None,
) -> nn.Module:
    """Prune the Linears inside the decoder blocks of `model` in place and return it.

    method: magnitude (no data), wanda or sparsegpt (calibration `data`, token ids [n_samples,
    seq_len], run block by block by the shared engine), snip or taylor (gradient saliency on `data`).
    Either `sparsity` (a SparsityScheme, or) in [0, 1) (unstructured: per row for wanda, snip and taylor, per layer for
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
    options = CalibrationOptions(device, offload, true_sequential, damp=damp, block_size=block_size,
                                 batch_size=batch_size, compute_dtype=compute_dtype, expert_min_tokens=expert_min_tokens,
                                 experts_per_pass=experts_per_pass)
    if not isinstance(sparsity, SparsityScheme):
        sparsity = SparsityScheme(sparsity, pattern, scope)
    elif pattern is not None or scope is not None:
        raise LlmsqueezeError("pass the pattern and scope inside the SparsityScheme, not beside it")
    return prune_model(model, method, sparsity, data, scheme, progress, include=include,
                       exclude=exclude, owl=owl, refit=refit, options=options)


def _finetune_options(steps, lr, batch_size, seq_len, distill_weight, temperature, seed, bos_token_id):
    from .pruning.finetune import FinetuneOptions

    return FinetuneOptions(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, distill_weight=distill_weight,
                           temperature=temperature, seed=seed, bos_token_id=bos_token_id)


def finetune(
    model: nn.Module,
    data,
    steps: int = 100,
    *,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 512,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    pattern: str | None = None,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Recovery fine-tuning of a pruned model loaded with llmsqueeze.from_pretrained from a sparse float
    checkpoint, in place: the kept weights train on `data` (token ids [T] of a text), the pruned ones
    stay exactly zero, optionally distilling `teacher`'s (the dense model's) logits with `distill_weight`
    of the loss (llmsqueeze.pruning.finetune). `pattern` ("2:4"), when given, must be the checkpoint's.
    `bos_token_id` (llmsqueeze.data.bos_token_id(tokenizer), for a tokenizer that puts BOS first) leads
    each training window, seq_len tokens long all the same. Save with save_quantized: the same pattern,
    checked again by the loaders. -> per-step records."""
    options = _finetune_options(steps, lr, batch_size, seq_len, distill_weight, temperature, seed, bos_token_id)
    return finetune_pruned(model, data, options, teacher, pattern, progress)


def prune_during_finetune(
    model: nn.Module,
    data,
    sparsity: float | None = None,
    pattern: str | None = None,
    steps: int = 100,
    *,
    score: str = "magnitude",
    end: float = 0.6,
    every: int | None = None,
    schedule: str = "cubic",
    regrow: str = "zero",
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 512,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
    bos_token_id: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Gradual pruning of a dense model while it fine-tunes on `data` (token ids [T]): from dense to
    `sparsity` (each layer) or an N:M `pattern` along the cubic (or linear) `schedule` over the first
    `end` of the `steps`, masks chosen again every `every` steps by `score` (magnitude, movement, wanda
    or random), pruned weights zeroed (`regrow` "zero", default) or kept training in a shadow
    copy so that they can come back with their own values ("shadow"); then trained with the mask held (llmsqueeze.pruning.schedule). The model
    ends pruned; save it with save_quantized. `bos_token_id` as for finetune(). -> per-step records."""
    options = _finetune_options(steps, lr, batch_size, seq_len, distill_weight, temperature, seed, bos_token_id)
    return prune_gradual(model, data, SparsityScheme(sparsity, pattern), options, score, end, every, schedule, regrow,
                         teacher, include, exclude, progress)

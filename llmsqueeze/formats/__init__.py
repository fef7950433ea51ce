"""Checkpoint formats: ours (native.py), and the peers' that we export to and import from.

  export:  llmsqueeze checkpoint ──► compressed-tensors pack-quantized | GPTQ (v1 or v2)
           (pruned checkpoints ──► compressed-tensors' sparse formats: ct_sparse.py)
  import:  GPTQ | AWQ (GEMM) | compressed-tensors pack-quantized ──► our QuantLinear, through our
           HfQuantizer: config.json's quantization_config is translated to ours (with a `source`
           entry), and transformers' loader converts each tensor on the way in (`weight_conversions`).

Modules: files.py reads a model dir (config, shard headers, tensor index, its Linears); writer.py
is the one way any checkpoint dir is written (temp dir renamed at the end, shards, index, side
files); native.py is our format and its loader; one module per peer format (gptq.py, awq.py,
compressed_tensors.py; ct_sparse.py writes pruned checkpoints as compressed-tensors).

Adding a format: a module with the names below, and an entry in FORMATS (and EXPORT_FORMATS if written).
  import:  MARKER (the tensor that marks a quantized Linear), LAYER_TENSORS (every tensor such a
           Linear may have), REQUIRED (those it must have), IMPORTED_METHOD (our `method` for it),
           check_import(path, qc) (refuse before reading tensors), import_scheme(path, qc, keys,
           prefixes) -> (scheme dict, method_args, source entries, unsupported fields),
           finish_import(method_args, keys, prefixes, shapes, scheme) (what the tensors say),
           expected_shapes(scheme, n, k), ignored_on_import(source, method_args),
           weight_conversions(source, op), describe(source)
  export:  export_check(job), export_layer(name, QuantLinear, job) -> tensors, export_config(job),
           with job a writer.ExportJob
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import CheckpointError, LlmsqueezeError, QuantScheme
from . import awq, compressed_tensors, gptq
from .files import linear_shapes, skeleton, tensor_index
from .writer import ExportJob

FORMATS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors}  # quant_method -> module
IMPORT_METHODS = tuple(FORMATS)
EXPORT_FORMATS = ("compressed-tensors", "gptq")
LAYER_TENSORS = {name: fmt.LAYER_TENSORS for name, fmt in FORMATS.items()}  # (for `llmsqueeze info`)


# ====================================================================================== import
def imported_config(path: Path, config: dict, keys: dict) -> dict:
    """A peer's quantization_config -> ours, with `source` saying how to convert its tensors.
    Raises CheckpointError naming the fields we cannot read."""
    from .native import FORMAT_VERSION, QUANT_METHOD

    qc = config["quantization_config"]
    method = qc.get("quant_method")
    fmt = FORMATS[method]
    fmt.check_import(path, qc)
    marker = fmt.MARKER
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith("." + marker)})
    if not prefixes:
        raise CheckpointError(f"{path}: a {method} checkpoint without quantized weights (no *.{marker}); re-download it")
    for p in prefixes:
        missing = [s for s in fmt.REQUIRED if f"{p}.{s}" not in keys]
        if missing:
            raise CheckpointError(f"{path}: layer {p} lacks {', '.join(missing)}; the checkpoint is corrupt, re-download it")
    scheme, args, extra, bad = fmt.import_scheme(path, qc, keys, prefixes)
    source = {"format": method, **extra}
    if bad:
        raise CheckpointError(f"{path}: {method} checkpoint with fields llmsqueeze does not read: {'; '.join(bad)}")
    try:
        QuantScheme.from_dict(scheme)
    except LlmsqueezeError as e:
        raise CheckpointError(f"{path}: {method} checkpoint with an unsupported scheme ({e})") from None
    model, _ = skeleton(path)
    shapes = linear_shapes(model)
    unknown = [p for p in prefixes if p not in shapes]
    if unknown:
        raise CheckpointError(f"{path}: quantized tensors for {unknown[0]}, which is not a Linear of this model")
    for p in prefixes:
        n, k, _ = shapes[p]
        for suffix, want in fmt.expected_shapes(scheme, n, k).items():
            got = keys.get(f"{p}.{suffix}", (None, {"shape": None}))[1]["shape"]
            if got is not None and list(got) not in want:
                raise CheckpointError(
                    f"{path}: {p}.{suffix} has shape {list(got)}, but a {k}->{n} layer with bits={scheme['bits']} "
                    f"group_size={scheme['group_size']} needs {want[0]}: config.json does not match the weights; re-download it"
                )
    fmt.finish_import(args, keys, prefixes, shapes, scheme)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": fmt.IMPORTED_METHOD,
        "scheme": scheme,
        "method_args": args,
        "modules_to_not_convert": sorted(set(shapes) - set(prefixes)),
        "source": source,
    }


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    """Regexes of checkpoint tensors that carry nothing our layout needs."""
    return FORMATS[source["format"]].ignored_on_import(source, method_args)


def _op_class():
    from transformers.core_model_loading import ConversionOps

    class _Convert(ConversionOps):
        """One checkpoint tensor -> our buffer(s), by a function of (tensor, the target QuantLinear)."""

        llmsqueeze_import = True  # dropped after loading: the model then holds our layout

        def __init__(self, fn, suffix: str):
            self.fn, self.suffix = fn, suffix

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            (value,) = input_dict.values()
            value = value[0] if isinstance(value, list) else value
            layer_name = kwargs["full_layer_name"].rsplit(".", 1)[0]
            module = kwargs["model"].get_submodule(layer_name)
            out = self.fn(value, module)
            if isinstance(out, dict):
                return out
            return {target_patterns[0]: out}

        def __repr__(self):
            return f"llmsqueeze.convert({self.suffix})"

    return _Convert


def weight_conversions(source: dict) -> list:
    """transformers WeightConverters that turn a peer checkpoint's tensors into our buffers."""
    return FORMATS[source["format"]].weight_conversions(source, _op_class())


def describe_source(qc: dict) -> str:
    """'gptq checkpoint (checkpoint_format gptq), imported' or 'llmsqueeze format v1', for `llmsqueeze info`."""
    from .native import describe

    src = qc.get("source") or {}
    fmt = FORMATS.get(src.get("format"))
    return describe(qc) if fmt is None else fmt.describe(src)


# ====================================================================================== export
def export(src: str | os.PathLike, format: str, out: str | os.PathLike, overwrite: bool = False,
           checkpoint_format: str = "gptq", scale_dtype: str | None = None) -> Path:
    """Write the llmsqueeze checkpoint `src` as a `format` checkpoint in `out` (temp dir renamed at
    the end). format: "compressed-tensors" (pack-quantized) or "gptq" (checkpoint_format "gptq" = v1,
    or "gptq_v2"). A scheme the format cannot express is refused before anything is written.

    scale_dtype="float32" (compressed-tensors only) widens the stored scales: compressed-tensors
    dequantizes in the scales' dtype, so float16 scales give fp16((q - zero) * scale), rounded,
    where ours is exact in float32; float32 scales make its dense weights equal ours bit for bit."""
    from safetensors import safe_open

    from ..nn import QuantLinear
    from .files import read_config
    from .native import LAYER_TENSORS as OURS
    from .native import check_checkpoint
    from .writer import atomic_output_dir, copy_side_files, prepare_output_dir, write_config, write_shards

    if format not in EXPORT_FORMATS:
        raise LlmsqueezeError(f"--format {format!r} is not an export format: use one of {', '.join(EXPORT_FORMATS)}")
    if scale_dtype not in (None, "float32") or (scale_dtype and format != "compressed-tensors"):
        raise LlmsqueezeError(f"--scale-dtype {scale_dtype!r}: only float32, and only with --format compressed-tensors")
    src = Path(src).expanduser()
    qc = check_checkpoint(src)
    if qc.get("source"):
        raise LlmsqueezeError(
            f"{src} is a {qc['source']['format']} checkpoint; export reads llmsqueeze checkpoints: load it with "
            "llmsqueeze.from_pretrained and save_quantized it first"
        )
    if qc.get("layer_schemes"):
        raise LlmsqueezeError(
            f"cannot export {src} to {format}: it is mixed precision (bits per layer in layer_schemes), which "
            "this exporter does not write; serve it with llmsqueeze, or quantize with one --bits to export"
        )
    config = read_config(src)
    sparse = qc.get("sparsity")
    # pruned: ct_sparse.py (a pruned + quantized layer that stays a packed QuantLinear exports to GPTQ here)
    if sparse is not None and (format == "compressed-tensors" or sparse.get("format") != "quant"):
        from . import ct_sparse

        return ct_sparse.export(src, qc, config, tensor_index(src), prepare_output_dir(out, overwrite), scale_dtype,
                                format)
    scheme = QuantScheme.from_dict(qc["scheme"])
    if scheme.grid != "uniform":
        raise LlmsqueezeError(
            f"cannot export to {format}: the checkpoint has grid={scheme.grid!r} (non-uniform levels), and {format} "
            "stores only uniform integer grids; re-quantize with grid='uniform' to export"
        )
    args = qc.get("method_args") or {}
    g_idx_stored = bool(args.get("act_order")) and not args.get("static_groups")
    keys = tensor_index(src)
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".qweight")})
    model, _ = skeleton(src)
    shapes = linear_shapes(model)
    layers = {p: shapes[p][:2] for p in prefixes}
    writer = FORMATS[format]
    job = ExportJob(scheme, layers, dense=[p for p in shapes if p not in prefixes],
                    conv1d=[p for p in prefixes if not shapes[p][2]], g_idx_stored=g_idx_stored,
                    method=qc.get("method", "rtn"), method_args=args,
                    not_converted=list(qc.get("modules_to_not_convert", [])), head=_head_name(model),
                    checkpoint_format=checkpoint_format, scale_dtype=scale_dtype)
    writer.export_check(job)
    out = prepare_output_dir(out, overwrite)

    opened: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        f = keys[name][0]
        if f not in opened:
            opened[f] = safe_open(f, "pt")
        return opened[f].get_tensor(name)

    def convert_layer(p: str) -> dict[str, torch.Tensor]:
        n, k = layers[p]
        layer = QuantLinear(k, n, scheme.bits, scheme.group_size, bias=False, scale_dtype=get(f"{p}.scales").dtype,
                            act_order=g_idx_stored, device="cpu")
        layer.qweight, layer.qzeros, layer.scales = get(f"{p}.qweight"), get(f"{p}.qzeros"), get(f"{p}.scales")
        if g_idx_stored:
            layer.g_idx = get(f"{p}.g_idx")
        return writer.export_layer(p, layer, job)

    def tensors_of(name: str) -> dict[str, torch.Tensor]:
        prefix, _, suffix = name.rpartition(".")
        if prefix in layers and suffix in OURS:
            return convert_layer(prefix) if suffix == "qweight" else {}
        return {name: get(name)}

    with atomic_output_dir(out) as tmp:
        write_shards(src, keys, tmp, tensors_of)
        copy_side_files(src, tmp)
        config["quantization_config"] = writer.export_config(job)
        write_config(tmp, config)
    return out


def _head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None

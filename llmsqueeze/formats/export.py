"""Export: a llmsqueeze checkpoint written again in a peer's format (the format's module converts
each layer and writes its quantization_config; writer.py writes the files)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import LlmsqueezeError, QuantScheme
from ..nn import QuantLinear
from .files import linear_shapes, read_config, skeleton, tensor_getter, tensor_index
from .loader import check_checkpoint
from .native import LAYER_TENSORS as OURS
from .peers import EXPORT_FORMATS, FORMATS
from .writer import (
    ExportJob,
    atomic_output_dir,
    check_apart,
    copy_side_files,
    prepare_output_dir,
    write_config,
    write_shards,
)


def export(src: str | os.PathLike, format: str, out: str | os.PathLike, overwrite: bool = False,
           checkpoint_format: str = "gptq", scale_dtype: str | None = None, **gguf) -> Path:
    """Write the llmsqueeze checkpoint `src` as a `format` checkpoint in `out` (temp dir renamed at
    the end). format: "compressed-tensors" (pack-quantized) or "gptq" (checkpoint_format "gptq" = v1,
    or "gptq_v2"). A scheme the format cannot express is refused before anything is written.

    format "gguf" writes one .gguf file `out` (formats/gguf_export.py; `gguf` takes its type=, dense_type=
    and progress=).

    scale_dtype="float32" (compressed-tensors only) widens the stored scales: compressed-tensors
    dequantizes in the scales' dtype, so float16 scales give fp16((q - zero) * scale), rounded,
    where ours is exact in float32; float32 scales make its dense weights equal ours bit for bit."""
    check_apart(out, (src,))  # before any format's own checks: never write over or into the checkpoint read
    if format == "gguf":
        if scale_dtype is not None:
            raise LlmsqueezeError("--scale-dtype applies to compressed-tensors; GGUF stores fp16 block scales")
        from .gguf_export import export as export_gguf

        return export_gguf(src, out, overwrite, **gguf)
    if gguf:
        raise LlmsqueezeError(f"{', '.join(gguf)} apply to format gguf, not {format}")
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
    if (qc.get("scheme") or {}).get("type") == "float":
        if format != "compressed-tensors":
            raise LlmsqueezeError(f"cannot export {src} to {format}: it holds a floating-point format "
                                  f"({qc['scheme']['format']}), which {format} does not store; use --format "
                                  "compressed-tensors")
        if scale_dtype is not None:
            raise LlmsqueezeError(f"--scale-dtype applies to integer checkpoints; {src} stores "
                                  f"{qc['scheme']['format']}'s own scale types: drop --scale-dtype")
        from .compressed_tensors import export_float

        return export_float(src, qc, config, tensor_index(src), prepare_output_dir(out, overwrite))
    if (qc.get("scheme") or {}).get("type") == "w8a8":
        raise LlmsqueezeError(f"cannot export {src} with this command: it is int8 W8A8; load it and call "
                              "llmsqueeze.formats.compressed_tensors.write_int_quantized")
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

    get = tensor_getter(keys)

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

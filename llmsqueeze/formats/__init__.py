"""Peer checkpoint formats: export ours to what serving engines load, import theirs into QuantLinear.

  export:  llmsqueeze checkpoint ──► compressed-tensors pack-quantized | GPTQ (v1 or v2)
  import:  GPTQ | AWQ (GEMM) | compressed-tensors pack-quantized ──► our QuantLinear, through our
           HfQuantizer: config.json's quantization_config is translated to ours (with a `source`
           entry), and transformers' loader converts each tensor on the way in (`weight_conversions`).

The tensor conversions are small pure functions in gptq.py, awq.py and compressed_tensors.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import CheckpointError, LlmsqueezeError, QuantScheme
from . import awq, compressed_tensors, gptq
from .files import linear_shapes, skeleton, tensor_index

EXPORT_FORMATS = ("compressed-tensors", "gptq")
IMPORT_METHODS = ("gptq", "awq", "compressed-tensors")
# per format: the tensor that marks a quantized Linear, and every tensor a quantized Linear may have
MARKER = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}
LAYER_TENSORS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
    "llmsqueeze": ("qweight", "qzeros", "scales", "g_idx"),
}
REQUIRED = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
            "compressed-tensors": ("weight_packed", "weight_scale")}


# ====================================================================================== import
def imported_config(path: Path, config: dict, keys: dict) -> dict:
    """A peer's quantization_config -> ours, with `source` saying how to convert its tensors.
    Raises CheckpointError naming the fields we cannot read."""
    from .native import FORMAT_VERSION, QUANT_METHOD

    qc = config["quantization_config"]
    method = qc.get("quant_method")
    marker = MARKER[method]
    sparse_fmt = (qc.get("sparsity_config") or {}).get("format") if method == "compressed-tensors" else None
    if sparse_fmt not in (None, "dense"):
        raise CheckpointError(f"{path}: compressed-tensors sparsity_config format {sparse_fmt!r} is not imported "
                              "(read: pack-quantized, sparsity_config format 'dense'); llmsqueeze's own pruned "
                              "checkpoint of the model is what it loads")
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith("." + marker)})
    if not prefixes:
        raise CheckpointError(f"{path}: a {method} checkpoint without quantized weights (no *.{marker}); re-download it")
    for p in prefixes:
        missing = [s for s in REQUIRED[method] if f"{p}.{s}" not in keys]
        if missing:
            raise CheckpointError(f"{path}: layer {p} lacks {', '.join(missing)}; the checkpoint is corrupt, re-download it")
    source = {"format": method}
    if method == "gptq":
        scheme, args, bad = gptq.import_scheme(qc)
        source["checkpoint_format"] = qc.get("checkpoint_format", "gptq")
    elif method == "awq":
        scheme, args, bad = awq.import_scheme(qc)
    else:
        dtype = keys[f"{prefixes[0]}.weight_scale"][1]["dtype"]
        names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
        if dtype not in names:
            raise CheckpointError(f"{path}: weight_scale dtype {dtype} is not read (float16, bfloat16, float32)")
        scheme, args, bad = compressed_tensors.import_scheme(qc, names[dtype])
        source["sym"] = scheme["sym"]
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
        for suffix, want in expected_shapes(method, scheme, n, k).items():
            got = keys.get(f"{p}.{suffix}", (None, {"shape": None}))[1]["shape"]
            if got is not None and list(got) not in want:
                raise CheckpointError(
                    f"{path}: {p}.{suffix} has shape {list(got)}, but a {k}->{n} layer with bits={scheme['bits']} "
                    f"group_size={scheme['group_size']} needs {want[0]}: config.json does not match the weights; re-download it"
                )
    if method == "gptq" and not args["act_order"] and _any_permuted_g_idx(keys, prefixes, shapes, scheme):
        args.update(act_order=True, static_groups=False)  # desc_act false, yet a g_idx that is not arange(K)//G
    if args.get("act_order") and method == "compressed-tensors":
        args["act_order"] = any(f"{p}.weight_g_idx" in keys for p in prefixes)
        args["static_groups"] = not args["act_order"]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": "gptq" if method == "gptq" else ("awq" if method == "awq" else "imported"),
        "scheme": scheme,
        "method_args": args,
        "modules_to_not_convert": sorted(set(shapes) - set(prefixes)),
        "source": source,
    }


def _any_permuted_g_idx(keys: dict, prefixes: list[str], shapes: dict, scheme: dict) -> bool:
    """Whether some layer's stored g_idx differs from the natural arange(K) // G (a few KB to read)."""
    from safetensors import safe_open

    for p in prefixes:
        entry = keys.get(f"{p}.g_idx")
        if entry is None:
            continue
        k = shapes[p][1]
        with safe_open(entry[0], "pt") as f:
            g_idx = f.get_tensor(f"{p}.g_idx")
        if not torch.equal(g_idx.long(), torch.arange(k) // (k if scheme["group_size"] == -1 else scheme["group_size"])):
            return True
    return False


def expected_shapes(method: str, scheme: dict, n: int, k: int) -> dict[str, list[list[int]]]:
    """The shapes each tensor of a quantized k->n Linear may have in `method`'s layout."""
    b = scheme["bits"]
    ng = -(-k // (k if scheme["group_size"] == -1 else scheme["group_size"]))
    words_k, words_n = -(-k * b // 32), -(-n * b // 32)
    pad_k, pad_n = -(-k // 32) * b, -(-n // 32) * b  # our padding to runs of 32 values
    if method == "gptq":
        return {"qweight": [[words_k, n], [pad_k, n]], "scales": [[ng, n]], "qzeros": [[ng, words_n], [ng, pad_n]]}
    if method == "awq":
        return {"qweight": [[k, n // 8]], "scales": [[ng, n]], "qzeros": [[ng, n // 8]]}
    return {"weight_packed": [[n, words_k]], "weight_scale": [[n, ng]], "weight_zero_point": [[words_n, ng]]}


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    """Regexes of checkpoint tensors that carry nothing our layout needs."""
    if source["format"] == "compressed-tensors":
        return [r"\.weight_shape$"]
    if source["format"] == "gptq" and not method_args.get("act_order"):
        return [r"\.g_idx$"]  # arange(K) // G: natural order
    return []


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
    from transformers.core_model_loading import WeightConverter

    op = _op_class()
    fmt = source["format"]
    if fmt == "gptq":
        cf = source.get("checkpoint_format", "gptq")
        return [
            WeightConverter(["qweight"], ["qweight"], [op(lambda t, m: gptq.qweight_from_gptq(t, m.bits, m.in_features), "qweight")]),
            WeightConverter(["qzeros"], ["qzeros"],
                            [op(lambda t, m: gptq.qzeros_from_gptq(t, m.bits, m.out_features, cf), "qzeros")]),
        ]
    if fmt == "awq":
        return [
            WeightConverter(["qweight"], ["qweight"], [op(lambda t, m: awq.qweight_from_awq(t, m.out_features), "qweight")]),
            WeightConverter(["qzeros"], ["qzeros"], [op(lambda t, m: awq.qzeros_from_awq(t, m.out_features), "qzeros")]),
        ]
    ct = compressed_tensors
    convs = [
        WeightConverter(["weight_packed"], ["qweight"],
                        [op(lambda t, m: ct.weight_packed_to_ours(t, m.bits, m.in_features), "weight_packed")]),
        WeightConverter(["weight_g_idx"], ["g_idx"], [op(lambda t, m: t.to(torch.int32), "weight_g_idx")]),
    ]
    if source.get("sym"):
        # no zero points in the file: the scale's converter also writes the constant mid-grid zeros
        convs.append(WeightConverter(["weight_scale"], ["scales", "qzeros"], [op(
            lambda t, m: {"scales": t.t().contiguous(),
                          "qzeros": ct.symmetric_qzeros(t.shape[1], m.out_features, m.bits)}, "weight_scale")]))
    else:
        convs += [
            WeightConverter(["weight_scale"], ["scales"], [op(lambda t, m: t.t().contiguous(), "weight_scale")]),
            WeightConverter(["weight_zero_point"], ["qzeros"],
                            [op(lambda t, m: ct.zero_point_to_ours(t, m.bits, m.out_features), "weight_zero_point")]),
        ]
    return convs


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
    if format == "gptq":
        gptq.export_check(scheme, layers, g_idx_stored, checkpoint_format)
        inside = [n for n in qc.get("modules_to_not_convert", []) if n != _head_name(model)]
        if inside:
            raise LlmsqueezeError(
                f"cannot export to gptq: modules_to_not_convert has layers inside the decoder blocks ({inside[0]}, ...), "
                "which GPTQ configs cannot name; export to --format compressed-tensors (it has an ignore list)"
            )
    else:
        compressed_tensors.export_check(scheme, layers, g_idx_stored, [p for p in prefixes if not shapes[p][2]])
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
        if format == "gptq":
            return _gptq_layer(p, layer, checkpoint_format)
        return _ct_layer(p, layer, scheme.sym, scale_dtype)

    def tensors_of(name: str) -> dict[str, torch.Tensor]:
        prefix, _, suffix = name.rpartition(".")
        if prefix in layers and suffix in LAYER_TENSORS["llmsqueeze"]:
            return convert_layer(prefix) if suffix == "qweight" else {}
        return {name: get(name)}

    with atomic_output_dir(out) as tmp:
        write_shards(src, keys, tmp, tensors_of)
        copy_side_files(src, tmp)
        head = _head_name(model)
        if format == "gptq":
            config["quantization_config"] = gptq.export_config(
                scheme, qc.get("method", "rtn"), args, g_idx_stored, head in prefixes, checkpoint_format)
        else:
            config["quantization_config"] = compressed_tensors.export_config(
                scheme, args, [p for p in shapes if p not in prefixes])
        write_config(tmp, config)
    return out


def _head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _gptq_layer(p: str, layer, checkpoint_format: str) -> dict[str, torch.Tensor]:
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    if checkpoint_format == "gptq":
        zeros = gptq.count_zero_zeros(layer.qzeros, bits, n)
        if zeros:
            raise LlmsqueezeError(
                f"cannot export to gptq: {p} has {zeros} group zero point(s) of 0, which checkpoint_format 'gptq' "
                "(zero - 1) cannot store; use --gptq-format gptq_v2 (GPTQModel), --format compressed-tensors, or --sym"
            )
    scales = layer.scales
    if scales.dtype != torch.float16:
        half = scales.to(torch.float16)
        if not torch.equal(half.to(scales.dtype), scales):
            raise LlmsqueezeError(
                f"cannot export to gptq: scale_dtype={str(scales.dtype).replace('torch.', '')} scales of {p} are not "
                "exactly float16 (GPTQ stores float16); re-quantize with --scale-dtype float16 or export to compressed-tensors"
            )
        scales = half
    g_idx = layer.g_idx if layer.g_idx is not None else gptq.natural_g_idx(k, layer.group_size)
    return {
        f"{p}.qweight": gptq.qweight_to_gptq(layer.qweight, bits, k),
        f"{p}.qzeros": gptq.qzeros_to_gptq(layer.qzeros, bits, n, checkpoint_format),
        f"{p}.scales": scales.contiguous(),
        f"{p}.g_idx": g_idx.to(torch.int32).contiguous(),
    }


def _ct_layer(p: str, layer, sym: bool, scale_dtype: str | None) -> dict[str, torch.Tensor]:
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    scales = layer.scales if scale_dtype is None else layer.scales.to(getattr(torch, scale_dtype))  # widening: exact
    out = {
        f"{p}.weight_packed": compressed_tensors.weight_packed_from_ours(layer.qweight, bits, k),
        f"{p}.weight_scale": scales.t().contiguous(),
        f"{p}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        out[f"{p}.weight_zero_point"] = compressed_tensors.zero_point_from_ours(layer.qzeros, bits, n)
    return out


def describe_source(qc: dict) -> str:
    """'gptq checkpoint (checkpoint_format gptq)' for `llmsqueeze info`."""
    src = qc.get("source") or {}
    fmt = src.get("format")
    if fmt == "gptq":
        return f"gptq checkpoint (checkpoint_format {src.get('checkpoint_format', 'gptq')}), imported"
    if fmt == "awq":
        return "awq checkpoint (GEMM), imported"
    if fmt == "compressed-tensors":
        return "compressed-tensors checkpoint (pack-quantized), imported"
    return f"llmsqueeze format v{qc.get('format_version')}"

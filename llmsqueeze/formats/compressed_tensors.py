"""compressed-tensors "pack-quantized" checkpoints (quant_method "compressed-tensors"): what
llm-compressor writes and vLLM loads (its WNA16 / Marlin path).

Per Linear of K inputs, N outputs, group size G (K when per-channel: strategy "channel"), b in {4, 8}:
  weight_packed     int32 [N, ceil(K*b/32)]   packed along K, 32 values per b words, first value in
                                              the low bits; values stored as q_signed + 2**(b-1),
                                              which is our unsigned q
  weight_scale      [N, K/G]                  in the checkpoint's scale dtype
  weight_zero_point int32 [ceil(N*b/32), K/G] asymmetric only, packed along N, stored as
                                              zp_signed + 2**(b-1), which is our unsigned zero
  weight_shape      int64 [2]                 (N, K)
  w = (q_signed - zp_signed) * scale = (q - zero) * scale;  symmetric means zero = 2**(b-1)

compressed-tensors' dequantize refuses K % G != 0 (and vLLM's kernels need it), so a shorter last
group is refused on export. Activation order with a stored g_idx ("group" actorder) was removed from
compressed-tensors (0.20 decompresses it in natural order), so only static act-order ("weight")
exports; a checkpoint with weight_g_idx still imports.

W8A8 models are written as "int-quantized" (`write_int_quantized`: what vLLM's W8A8 int8 path reads):
  weight int8 [N, K], weight_scale [N, 1] (per channel), input_scale [1] (static activations only)
Float formats (FloatScheme) are written as "float-quantized" (fp8, fp8-block, fp8-weight),
"nvfp4-pack-quantized" (nvfp4, nvfp4-a16) or "mxfp4-pack-quantized" (mxfp4) by `export_float`: our
FloatLinear already holds compressed-tensors' tensors (weight / weight_packed, weight_scale,
weight_global_scale, input_scale, input_global_scale), so only the config is new; its scheme is
compressed-tensors' own preset (FP8_DYNAMIC, FP8_BLOCK, NVFP4, NVFP4A16, MXFP4A16) or built from
its preset's arguments (fp8 static, fp8-weight).
Pruned checkpoints go to its sparse formats in ct_sparse.py.
"""
from __future__ import annotations

import os

import torch

from ..config import CheckpointError, FloatScheme, LlmsqueezeError, W8A8Scheme
from ..quant.pack import pack_cols, pack_rows, unpack_cols, unpack_rows
from .writer import ExportJob, save_model_dir

BITS = (4, 8)
MARKER = "weight_packed"  # the tensor that marks a quantized Linear
LAYER_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
REQUIRED = ("weight_packed", "weight_scale")
IMPORTED_METHOD = "imported"  # `method` in our quantization_config of an imported checkpoint
SCALE_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}  # safetensors dtype -> ours


def _library():
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise LlmsqueezeError(
            "exporting to compressed-tensors needs the compressed-tensors package: pip install 'compressed-tensors>=0.15'"
        ) from None
    return compressed_tensors, QuantizationArgs, QuantizationScheme, QuantizationConfig


# ------------------------------------------------------------------------------ tensor conversions
def weight_packed_from_ours(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Our qweight [K_pad*b/32, N] -> weight_packed [N, ceil(K*b/32)] (b divides 32)."""
    return qweight[: -(-k * bits // 32)].t().contiguous()


def weight_packed_to_ours(weight_packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """weight_packed [N, ceil(K*b/32)] -> our qweight [K_pad*b/32, N] (zero words for the padding)."""
    q = unpack_rows(weight_packed.t().contiguous(), bits, k)  # [K, N]
    return pack_rows(q, bits)


def zero_point_from_ours(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Our qzeros [ng, N_pad*b/32] -> weight_zero_point [ceil(N*b/32), ng]."""
    zero = unpack_cols(qzeros, bits, n)  # [ng, N]
    return pack_rows(zero.t(), bits)[: -(-n * bits // 32)].contiguous()


def zero_point_to_ours(zero_point: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """weight_zero_point [ceil(N*b/32), ng] -> our qzeros [ng, N_pad*b/32]."""
    zero = unpack_rows(zero_point, bits, n)  # [N, ng]
    return pack_cols(zero.t(), bits)


def symmetric_qzeros(ng: int, n: int, bits: int) -> torch.Tensor:
    """Our qzeros for a symmetric layer: every zero at mid-grid 2**(b-1)."""
    return pack_cols(torch.full((ng, n), 2 ** (bits - 1), dtype=torch.int32), bits)


# ------------------------------------------------------------------------------ export
def export_check(job: ExportJob) -> None:
    """Refuse, in one line naming the fields, what pack-quantized readers cannot take."""
    scheme, layers = job.scheme, job.layers
    problems = []
    if scheme.bits not in BITS:
        problems.append(f"bits={scheme.bits} (pack-quantized loaders take {', '.join(map(str, BITS))})")
    if job.g_idx_stored:
        problems.append("act_order with g_idx (--act-order dynamic; compressed-tensors dropped actorder 'group': "
                        "export to --format gptq, or re-quantize with --act-order static)")
    if job.conv1d:
        problems.append(f"Conv1D layers ({job.conv1d[0]}, ...; compressed-tensors targets nn.Linear)")
    for name, (_, k) in layers.items():
        g = k if scheme.group_size == -1 else scheme.group_size
        if k % g:
            divisors = [d for d in (256, 128, 64, 32, 16) if all(kk % d == 0 for _, kk in layers.values())]
            problems.append(f"group_size={g} does not divide in_features={k} of {name} "
                            f"(re-quantize with --group-size {divisors[0] if divisors else -1})")
            break
    if problems:
        raise LlmsqueezeError("cannot export to compressed-tensors: " + "; ".join(problems))


def export_layer(p: str, layer, job: ExportJob) -> dict[str, torch.Tensor]:
    """One of our QuantLinears (named p) -> its pack-quantized tensors."""
    return pack_layer(p, layer, job.scheme.sym, job.scale_dtype)


def pack_layer(p: str, layer, sym: bool, scale_dtype: str | None) -> dict[str, torch.Tensor]:
    """A QuantLinear named p -> weight_packed, weight_scale (widened to scale_dtype if given),
    weight_shape, and weight_zero_point unless symmetric."""
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    scales = layer.scales if scale_dtype is None else layer.scales.to(getattr(torch, scale_dtype))  # widening: exact
    out = {
        f"{p}.weight_packed": weight_packed_from_ours(layer.qweight, bits, k),
        f"{p}.weight_scale": scales.t().contiguous(),
        f"{p}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not sym:
        out[f"{p}.weight_zero_point"] = zero_point_from_ours(layer.qzeros, bits, n)
    return out


def export_config(job: ExportJob) -> dict:
    """config.json's quantization_config, built and validated with compressed-tensors' own classes."""
    scheme = job.scheme
    ct, QuantizationArgs, QuantizationScheme, QuantizationConfig = _library()
    args = QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.sym, dynamic=False,
        strategy="channel" if scheme.group_size == -1 else "group",
        group_size=None if scheme.group_size == -1 else scheme.group_size,
        actorder="weight" if job.method_args.get("act_order") else None,
    )
    group = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    cfg = QuantizationConfig(config_groups={"group_0": group}, format="pack-quantized", ignore=sorted(job.dense),
                             quantization_status="compressed")
    return {"quant_method": "compressed-tensors", "version": ct.__version__, "sparsity_config": {},
            "transform_config": {}, **cfg.model_dump(exclude=["quant_method"])}


# ------------------------------------------------------------------------------ W8A8: int-quantized
def int_quantized_config(scheme: W8A8Scheme, ignore: list[str]) -> dict:
    """The `quantization_config` of a compressed-tensors "int-quantized" checkpoint (what vLLM's
    W8A8 int8 path reads) describing this scheme."""
    act = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
           "strategy": "token" if scheme.act == "dynamic" else "tensor", "dynamic": scheme.act == "dynamic",
           "observer": "memoryless" if scheme.act == "dynamic" else ("mse" if scheme.static_clip == "mse" else "minmax"),
           "observer_kwargs": {},
           "actorder": None, "block_structure": None}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "actorder": None,
               "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": act,
                                      "output_activations": None, "format": "int-quantized"}},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def write_int_quantized(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False):
    """Write a W8A8 model (llmsqueeze.quantize with a W8A8Scheme, or a loaded W8A8 checkpoint) as a
    compressed-tensors int-quantized checkpoint for vLLM: the same int8 `weight` [N, K], `weight_scale`
    as [N, 1], `input_scale` [1] (static only), dense modules unchanged. For the general export
    command to call; the directory is written through formats.writer (temp dir, renamed at the end).
    Not yet loaded by vLLM here (no GPU): checked only against the format's published field names."""
    from ..nn_int8 import Int8Linear

    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    if not qc or (qc.get("scheme") or {}).get("type") != "w8a8":
        raise LlmsqueezeError("export to compressed-tensors int-quantized needs a W8A8 model: quantize it with "
                              "--scheme w8a8 first")
    scheme = W8A8Scheme.from_dict(qc["scheme"])
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    old = [(m, m.weight_scale) for m in layers]
    for m in layers:  # compressed-tensors keeps the channel scale as a column [N, 1]
        m._buffers["weight_scale"] = m.weight_scale.view(-1, 1)
    model.config.quantization_config = int_quantized_config(scheme, qc.get("modules_to_not_convert", []))
    try:
        return save_model_dir(model, out, tokenizer=tokenizer, overwrite=overwrite)
    finally:
        model.config.quantization_config = qc
        for m, s in old:
            m._buffers["weight_scale"] = s


# ------------------------------------------------------------------------------ float formats
FLOAT_CT_FORMAT = {"fp8": "float-quantized", "fp8-block": "float-quantized", "fp8-weight": "float-quantized",
                   "nvfp4": "nvfp4-pack-quantized", "nvfp4-a16": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def float_config(scheme: FloatScheme, ignore: list[str]) -> dict:
    """config.json's quantization_config for a float-format checkpoint, from compressed-tensors' presets."""
    ct, _, QuantizationScheme, QuantizationConfig = _library()
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    preset = {"fp8": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "fp8-weight": "FP8_DYNAMIC", "nvfp4": "NVFP4",
              "nvfp4-a16": "NVFP4A16", "mxfp4": "MXFP4A16"}[scheme.format]
    qs = preset_name_to_scheme(preset, ["Linear"])
    if scheme.format == "fp8-weight":
        qs = QuantizationScheme(targets=["Linear"], weights=qs.weights)
    elif scheme.format == "fp8" and scheme.act == "static":  # per-channel weights, one static input scale
        qs = QuantizationScheme(targets=["Linear"], weights=qs.weights,
                                input_activations=preset_name_to_scheme("FP8", ["Linear"]).input_activations)
    fmt = FLOAT_CT_FORMAT[scheme.format]
    qs.format = fmt
    cfg = QuantizationConfig(config_groups={"group_0": qs}, format=fmt, ignore=sorted(ignore),
                             quantization_status="compressed")
    return {"quant_method": "compressed-tensors", "version": ct.__version__, "sparsity_config": {},
            "transform_config": {}, **cfg.model_dump(mode="json", exclude=["quant_method"])}


def export_float(src, qc: dict, config: dict, keys: dict, out) -> "os.PathLike":
    """A llmsqueeze float-format checkpoint `src` (its quantization_config qc, config.json, tensor
    index) -> a compressed-tensors checkpoint in `out` (prepared): every tensor as stored, a new config."""
    from .files import linear_shapes, skeleton, tensor_getter
    from .writer import atomic_output_dir, copy_side_files, write_config, write_shards

    scheme = FloatScheme.from_dict(qc["scheme"])  # smoothing is already folded into the norms and weights
    model, _ = skeleton(src)
    shapes = linear_shapes(model)  # name -> (N, K, is nn.Linear)
    keep = set(qc.get("modules_to_not_convert", []))
    conv1d = [n for n, v in shapes.items() if n not in keep and not v[2]]
    if conv1d:
        raise LlmsqueezeError(f"cannot export to compressed-tensors: Conv1D layers ({conv1d[0]}, ...; compressed-tensors "
                              "targets nn.Linear)")
    if scheme.format == "fp8-block":  # its 1x128 activation groups and vLLM's block GEMM need whole blocks
        ragged = next((n for n, v in shapes.items() if n not in keep and (v[0] % 128 or v[1] % 128)), None)
        if ragged is not None:
            n_out, k = shapes[ragged][:2]
            raise LlmsqueezeError(f"cannot export fp8-block to compressed-tensors: {ragged} is {k} -> {n_out}, not whole "
                                  "128x128 blocks (compressed-tensors quantizes activations in groups of 128, and vLLM's "
                                  "block GEMM wants every output partition in whole blocks); serve it with llmsqueeze, or "
                                  "use --scheme fp8")
    get = tensor_getter(keys)

    def tensors_of(name: str) -> dict:
        return {name: get(name)}

    with atomic_output_dir(out) as tmp:
        write_shards(src, keys, tmp, tensors_of)
        copy_side_files(src, tmp)
        config["quantization_config"] = float_config(scheme, list(qc.get("modules_to_not_convert", [])))
        write_config(tmp, config)
    return out


# ------------------------------------------------------------------------------ import
def check_import(path, qc: dict) -> None:
    """Refuse a sparse compressed-tensors checkpoint before its tensors are read."""
    sparse_fmt = (qc.get("sparsity_config") or {}).get("format")
    if sparse_fmt not in (None, "dense"):
        raise CheckpointError(f"{path}: compressed-tensors sparsity_config format {sparse_fmt!r} is not imported "
                              "(read: pack-quantized, sparsity_config format 'dense'); llmsqueeze's own pruned "
                              "checkpoint of the model is what it loads")


def import_scheme(path, qc: dict, keys: dict, prefixes: list[str]) -> tuple[dict, dict, dict, list[str]]:
    """A compressed-tensors quantization_config -> (our scheme dict, method_args, source entries,
    unsupported fields); the scale dtype is the stored weight_scale's."""
    dtype = keys[f"{prefixes[0]}.weight_scale"][1]["dtype"]
    if dtype not in SCALE_DTYPES:
        raise CheckpointError(f"{path}: weight_scale dtype {dtype} is not read (float16, bfloat16, float32)")
    scale_dtype = SCALE_DTYPES[dtype]
    bad = []
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not groups or any(w != weights[0] for w in weights):
        bad.append("config_groups (read: one weight scheme for all quantized layers)")
        weights = weights[:1] or [{}]
    w = weights[0]
    fmt = qc.get("format") or (groups[0].get("format") if groups else None)
    if fmt != "pack-quantized":
        bad.append(f"format={fmt!r} (read: pack-quantized)")
    if any(g.get("input_activations") or g.get("output_activations") for g in groups):
        bad.append("input/output activation quantization (read: weight-only)")
    if w.get("num_bits") not in BITS:
        bad.append(f"num_bits={w.get('num_bits')!r} (read: {', '.join(map(str, BITS))})")
    if w.get("type", "int") != "int":
        bad.append(f"type={w.get('type')!r} (read: int)")
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "channel")
    if strategy not in ("group", "channel"):
        bad.append(f"strategy={strategy!r} (read: group, channel)")
    if w.get("dynamic"):
        bad.append("dynamic=true")
    if qc.get("sparsity_config") and (qc["sparsity_config"].get("format") not in (None, "dense")):
        bad.append(f"sparsity_config format {qc['sparsity_config'].get('format')!r}")
    if qc.get("transform_config"):
        bad.append("transform_config")
    scheme = {"bits": w.get("num_bits"), "group_size": w.get("group_size") if strategy == "group" else -1,
              "sym": bool(w.get("symmetric", True)), "scale_dtype": scale_dtype}
    g_idx = w.get("actorder") in ("group", "dynamic")
    return scheme, {"act_order": g_idx, "static_groups": not g_idx}, {"sym": scheme["sym"]}, bad


def finish_import(args: dict, keys: dict, prefixes: list[str], shapes: dict, scheme: dict) -> None:
    """act_order with a stored weight_g_idx (dynamic, "group") or without (static, "weight")."""
    if args.get("act_order"):
        args["act_order"] = any(f"{p}.weight_g_idx" in keys for p in prefixes)
        args["static_groups"] = not args["act_order"]


def expected_shapes(scheme: dict, n: int, k: int) -> dict[str, list[list[int]]]:
    """The shapes each tensor of a quantized k->n Linear may have."""
    b = scheme["bits"]
    ng = -(-k // (k if scheme["group_size"] == -1 else scheme["group_size"]))
    words_k, words_n = -(-k * b // 32), -(-n * b // 32)
    return {"weight_packed": [[n, words_k]], "weight_scale": [[n, ng]], "weight_zero_point": [[words_n, ng]]}


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    """Regexes of checkpoint tensors that carry nothing our layout needs."""
    return [r"\.weight_shape$"]


def weight_conversions(source: dict, op) -> list:
    """transformers WeightConverters, each tensor through `op(fn(tensor, our QuantLinear), suffix)`."""
    from transformers.core_model_loading import WeightConverter

    convs = [
        WeightConverter(["weight_packed"], ["qweight"],
                        [op(lambda t, m: weight_packed_to_ours(t, m.bits, m.in_features), "weight_packed")]),
        WeightConverter(["weight_g_idx"], ["g_idx"], [op(lambda t, m: t.to(torch.int32), "weight_g_idx")]),
    ]
    if source.get("sym"):
        # no zero points in the file: the scale's converter also writes the constant mid-grid zeros
        convs.append(WeightConverter(["weight_scale"], ["scales", "qzeros"], [op(
            lambda t, m: {"scales": t.t().contiguous(),
                          "qzeros": symmetric_qzeros(t.shape[1], m.out_features, m.bits)}, "weight_scale")]))
    else:
        convs += [
            WeightConverter(["weight_scale"], ["scales"], [op(lambda t, m: t.t().contiguous(), "weight_scale")]),
            WeightConverter(["weight_zero_point"], ["qzeros"],
                            [op(lambda t, m: zero_point_to_ours(t, m.bits, m.out_features), "weight_zero_point")]),
        ]
    return convs


def describe(source: dict) -> str:
    return "compressed-tensors checkpoint (pack-quantized), imported"

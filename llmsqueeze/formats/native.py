"""llmsqueeze's own checkpoint format (quant_method "llmsqueeze"): what config.json's
quantization_config says (`quantization_config`, `sparsity_config`), writing it (`save_quantized`:
pruned layers compressed first, then the model dir through formats.writer), verifying a directory
in this format before any model is built (`check_native`; formats.loader.check_checkpoint calls it),
and building the empty layers transformers' loader fills (`replace_with_quant_linear`, used by the
HfQuantizer of formats/loader.py) and checking them once filled (`verify_sparse_layers`).

Per quantized Linear (uniform grid): qweight, scales, qzeros (+ g_idx with dynamic act-order);
non-uniform grids: qweight + scales (nf) or codebook (kmeans); GGML block formats: blocks (the GGUF
bytes, nn_gguf.GGUFLinear; scheme.layer_types names each layer's type); W8A8: int8 weight + weight_scale
(+ input_scale when static); float formats: FloatLinear's buffers (float_suffixes); pruned layers: values (or qvalues.*) + indices (N:M) or bitmask.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..config import (
    CheckpointError,
    FloatScheme,
    GGUFScheme,
    LlmsqueezeError,
    NMPattern,
    QuantScheme,
    W8A8Scheme,
    check_layer_schemes,
    first_line,
    scheme_for,
    scheme_from_dict,
)
from .files import read_safetensors_header, weight_files
from .writer import prepare_output_dir, save_model_dir

log = logging.getLogger("llmsqueeze")

FORMAT_VERSION = 3  # the newest we write and read; plain quantized checkpoints still say 1, mixed precision 3
QUANT_METHOD = "llmsqueeze"
QUANT_SUFFIXES = ("qweight", "scales", "qzeros")
W8A8_SUFFIXES = ("weight", "weight_scale")
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # every tensor of a uniform-grid quantized Linear


# ---------------------------------------------------------------------------------------- config
def quantization_config(scheme: QuantScheme, method: str, modules_to_not_convert: list[str],
                        method_args: dict | None = None) -> dict:
    """What `config.json` carries so the checkpoint says how to read itself."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": 1,  # prune() writes 2 (sparsity, scheme may be null)
        "method": method,
        "scheme": scheme.to_dict(),
        "method_args": dict(method_args or {}),
        "modules_to_not_convert": modules_to_not_convert,
    }


def sparsity_config(sparsity: float, nm: tuple[int, int] | None, layers: list[str], scope: str | None,
                    layer_sparsity: dict[str, float] | None = None) -> dict:
    """What `quantization_config["sparsity"]` says of a pruned model; the saver adds the storage format."""
    return {
        "sparsity": sparsity,
        "nm_pattern": None if nm is None else f"{nm[0]}:{nm[1]}",
        "scope": scope,
        "layers": list(layers),
        "layer_sparsity": dict(layer_sparsity or {}),
    }


def describe(qc: dict) -> str:
    """'llmsqueeze format v1' for `llmsqueeze info`."""
    return f"llmsqueeze format v{qc.get('format_version')}"


# ---------------------------------------------------------------------------------------- save
def save_quantized(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
) -> Path:
    """Write the quantized model (safetensors shards + config.json with quantization_config,
    generation config, tokenizer) to a temp dir beside `out`, then rename it into place."""
    if getattr(getattr(model, "config", None), "quantization_config", None) is None:
        raise LlmsqueezeError("the model is not quantized: call llmsqueeze.quantize(model, scheme) first")
    out = prepare_output_dir(out, overwrite)
    compress_sparse_layers(model)
    return save_model_dir(model, out, tokenizer, overwrite, max_shard_size)


def compress_sparse_layers(model: nn.Module) -> None:
    """Pruned layers -> SparseLinear, in place: N:M as values + packed indices (the values quantized on
    the compressed matrix when the model is also quantized and the group size is a multiple of M),
    unstructured as bitmask + values; a quantized unstructured layer stays a QuantLinear (q == zero
    where pruned). Records the storage format (and each bitmask layer's nonzero count) in
    quantization_config["sparsity"]."""
    from ..nn import QuantLinear, SparseLinear, is_linear, linear_weight, set_module

    qc = model.config.quantization_config
    sp = qc.get("sparsity") if isinstance(qc, dict) else None
    if sp is None or "format" in sp:
        return
    nm = NMPattern.parse(sp.get("nm_pattern"))
    if qc.get("scheme") is not None:
        g = qc["scheme"]["group_size"]
        if nm is None or (g != -1 and g % nm[1]):
            sp["format"] = "quant"
            return
        for name in sp["layers"]:
            layer = model.get_submodule(name)
            if isinstance(layer, QuantLinear):
                set_module(model, name, SparseLinear.from_quant_linear(layer, nm))
        sp["format"] = "nm"
        return
    sp["format"] = "nm" if nm else "bitmask"
    nnz = sp.setdefault("nnz", {})
    for name in sp["layers"]:
        layer = model.get_submodule(name)
        if is_linear(layer):
            layer = SparseLinear.from_dense(linear_weight(layer).detach(), layer.bias, nm)
            set_module(model, name, layer)
        if nm is None:
            nnz[name] = layer.values.numel()


def decompress_sparse_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of compress_sparse_layers for a sparse float checkpoint, in place: each SparseLinear
    back to a trainable nn.Linear (float32) holding its dense weight; the storage format is forgotten,
    so saving compresses again. -> {"<layer>.weight": keep mask [N, K] bool}, the pattern to hold."""
    from ..nn import SparseLinear, set_module

    qc = model.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    sp = qc.get("sparsity")
    if sp is None:
        raise LlmsqueezeError("the checkpoint holds no pruned layers, so there is no mask to hold: prune it first "
                              "(llmsqueeze prune), or prune while fine-tuning (llmsqueeze prune --schedule gradual)")
    if qc.get("scheme") is not None:
        raise LlmsqueezeError("the checkpoint is pruned and quantized; fine-tuning trains float weights: fine-tune the "
                              "pruned float checkpoint (llmsqueeze prune without --bits), quantize afterwards")
    masks = {}
    for name in sp["layers"]:
        layer = model.get_submodule(name)
        if not isinstance(layer, SparseLinear):
            raise LlmsqueezeError(f"{name} is a {type(layer).__name__}, not a sparse layer: re-create the checkpoint")
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.values.device if hasattr(layer, "values") else None)
        with torch.no_grad():
            dense.weight.copy_(layer.to_dense(torch.float32))
            if layer.bias is not None:
                dense.bias.copy_(layer.bias.float())
        masks[f"{name}.weight"] = layer.keep_mask()
        set_module(model, name, dense)
    sp = {k: v for k, v in sp.items() if k not in ("format", "nnz")}
    model.config.quantization_config = {**qc, "sparsity": sp}
    return masks


# ---------------------------------------------------------------------------------------- verify
def check_native(path: Path, qc: dict) -> dict:
    """Verify a checkpoint in our own format (qc: its quantization_config): a version we read,
    a valid scheme, every quantized layer with all its tensors. Returns qc."""
    version = qc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}, this llmsqueeze reads up to {FORMAT_VERSION}: upgrade llmsqueeze"
        )
    sparse = qc.get("sparsity")
    try:
        scheme = scheme_from_dict(qc.get("scheme") or {}) if qc.get("scheme") is not None or sparse is None else None
        if sparse is not None:
            _check_sparsity_config(sparse)
        layer_schemes = check_layer_schemes(qc.get("layer_schemes"))
        if layer_schemes and not isinstance(scheme, QuantScheme):
            raise LlmsqueezeError("layer_schemes needs a weight-only scheme")
        if layer_schemes and scheme.grid != "uniform":
            raise LlmsqueezeError(f"layer_schemes (mixed precision) applies to the uniform grid, not grid={scheme.grid!r}")
    except (LlmsqueezeError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path} has an invalid scheme or sparsity in config.json ({first_line(e)}); "
                              "re-create the checkpoint") from None
    header: dict[str, dict] = {}
    for f in weight_files(path):
        header.update(read_safetensors_header(f))
    keys = set(header) - {"__metadata__"}
    fmt = None if sparse is None else sparse.get("format")
    marker = "qweight"
    if fmt in ("nm", "bitmask"):  # compressed sparse layers
        values = ("values",) if qc.get("scheme") is None else tuple(f"qvalues.{x}" for x in QUANT_SUFFIXES)
        suffixes = values + (("indices",) if fmt == "nm" else ("bitmask",))
        prefixes = set(sparse["layers"])
        if not all(f"{p}.{suffixes[-1]}" in keys for p in prefixes):
            # the names on disk may be transformers' renamings of the model's (Mixtral's block_sparse_moe. for
            # mlp.): check the layers the files hold, as many as the config lists
            held = {k[: -len(suffixes[-1]) - 1] for k in keys if k.endswith("." + suffixes[-1])}
            if len(held) < len(prefixes):
                p = min(prefixes - held)
                raise CheckpointError(f"{path}: layer {p} lacks {', '.join(suffixes)}; the checkpoint is corrupt, "
                                      "re-create it")
            prefixes = held
    else:
        suffixes = QUANT_SUFFIXES
        if isinstance(scheme, W8A8Scheme):
            marker, suffixes = "weight_scale", W8A8_SUFFIXES + (("input_scale",) if scheme.act == "static" else ())
        if isinstance(scheme, FloatScheme):
            marker, suffixes = "weight_scale", float_suffixes(scheme)
        if isinstance(scheme, GGUFScheme):
            marker, suffixes = "blocks", ("blocks",)
        prefixes = {k.rsplit(".", 1)[0] for k in keys if k.endswith("." + marker)}
    lut = fmt not in ("nm", "bitmask") and getattr(scheme, "grid", "uniform") != "uniform"
    if lut:  # non-uniform grid: indices + nf scales or k-means codebook, no zero points
        suffixes = ("qweight", "scales" if scheme.grid == "nf" else "codebook")
    if not prefixes:
        raise CheckpointError(f"{path} holds no quantized or sparse weights (no *.{marker}); re-create the checkpoint")
    if isinstance(scheme, GGUFScheme):
        _check_gguf_layers(path, scheme, header, prefixes)
    for p in sorted(prefixes):
        if isinstance(scheme, FloatScheme):
            problem = _float_dtype_problem(header, p, scheme)
            if problem:
                raise CheckpointError(f"{path}: layer {p} {problem}; the checkpoint is corrupt, re-create it")
        elif marker == "weight_scale" and header.get(f"{p}.weight", {}).get("dtype", "I8") != "I8":
            raise CheckpointError(f"{path}: layer {p} has a {header[p + '.weight']['dtype']} weight, w8a8 stores int8; "
                                  "the checkpoint is corrupt, re-create it")
        missing = [s for s in suffixes if f"{p}.{s}" not in keys]
        if missing:
            raise CheckpointError(f"{path}: layer {p} lacks {', '.join(missing)}; the checkpoint is corrupt, re-create it")
        if lut:
            problem = _lut_shape_problem({s: header[f"{p}.{s}"] for s in suffixes}, scheme)
            if problem:
                raise CheckpointError(f"{path}: layer {p}: {problem}; the checkpoint is corrupt, re-create it")
    if layer_schemes:
        _check_layer_bits(path, scheme, layer_schemes, header, prefixes)
    return qc


FLOAT_DTYPES = {"weight": "F8_E4M3", "weight_packed": "U8", "weight_global_scale": "F32", "input_scale": "F32",
                "input_global_scale": "F32"}


def float_suffixes(scheme: FloatScheme) -> tuple[str, ...]:
    """The tensors each layer of a float-format checkpoint holds (nn_float.FloatLinear's buffers)."""
    from ..quant.fp import FORMATS

    fmt = FORMATS[scheme.format]
    out = ("weight" if fmt.element == "e4m3" else "weight_packed", "weight_scale")
    if fmt.scale == "e4m3":
        out += ("weight_global_scale",)
    if fmt.act == "nvfp4":
        out += ("input_global_scale",)
    if scheme.act == "static":
        out += ("input_scale",)
    return out


def _float_dtype_problem(header: dict, p: str, scheme: FloatScheme) -> str | None:
    from ..quant.fp import FORMATS

    want = dict(FLOAT_DTYPES, weight_scale={"fp32": "F32", "e4m3": "F8_E4M3", "e8m0": "U8"}[FORMATS[scheme.format].scale])
    for s in float_suffixes(scheme):
        got = header.get(f"{p}.{s}", {}).get("dtype")
        if got is not None and got != want[s]:
            return f"stores {s} as {got}, {scheme.format} stores {want[s]}"
    return None


def _check_gguf_layers(path: Path, scheme: GGUFScheme, header: dict, prefixes: set[str]) -> None:
    """Every layer named in layer_types stored, and each one's bytes [N, K/block*nbytes] uint8 a
    whole number of its type's blocks."""
    from ..quant.ggml import get_type

    missing = sorted(set(scheme.layer_types) ^ prefixes)
    if missing:
        raise CheckpointError(f"{path}: layer {missing[0]} is in {'the scheme' if missing[0] in scheme.layer_types else 'the weights'} "
                              "but not in the other; the checkpoint is corrupt, re-create it")
    for p in sorted(prefixes):
        h = header[f"{p}.blocks"]
        t = get_type(scheme.layer_types[p])
        if h["dtype"] != "U8" or len(h["shape"]) != 2 or h["shape"][1] % t.nbytes:
            raise CheckpointError(f"{path}: layer {p} stores {h['dtype']} {h['shape']}, not {t.name} blocks of "
                                  f"{t.nbytes} bytes; the checkpoint is corrupt, re-create it")


def _lut_shape_problem(tensors: dict[str, dict], scheme) -> str | None:
    """What is wrong with one non-uniform layer's safetensors entries (shape, dtype), or None.
    qweight int32 [K_pad*bits/32, N]; scales [ng, N] (nf) or codebook [ng, N, 2**bits] (kmeans),
    with ng groups of the scheme's size over K (K itself is known only up to its padding to 32)."""
    qw = tensors["qweight"]
    if qw["dtype"] != "I32" or len(qw["shape"]) != 2 or qw["shape"][0] % scheme.bits:
        return f"qweight is {qw['dtype']} {qw['shape']}, expected int32 [K_pad*{scheme.bits}/32, N]"
    k_pad, n = qw["shape"][0] * 32 // scheme.bits, qw["shape"][1]
    name = "scales" if scheme.grid == "nf" else "codebook"
    t = tensors[name]
    want_tail = [n] if scheme.grid == "nf" else [n, 2**scheme.bits]
    if t["dtype"] not in ("F16", "BF16", "F32") or len(t["shape"]) != 1 + len(want_tail) or t["shape"][1:] != want_tail:
        return f"{name} is {t['dtype']} {t['shape']}, expected a float [n_groups, {', '.join(map(str, want_tail))}]"
    ng = t["shape"][0]
    if scheme.group_size != -1:
        lo, hi = -(-max(k_pad - 31, 1) // scheme.group_size), -(-k_pad // scheme.group_size)
        if not lo <= ng <= hi:
            return f"{name} has {ng} groups, but K of {k_pad - 31}..{k_pad} in groups of {scheme.group_size} gives {lo}..{hi}"
    elif ng != 1:
        return f"{name} has {ng} groups, per-channel (group_size -1) stores 1"
    return None


def _check_layer_bits(path: Path, scheme, layer_schemes: dict, header: dict, prefixes: set[str]) -> None:
    """Mixed precision: every overridden layer is stored, and each layer's qzeros width [ng, N_pad*bits/32]
    matches its bits (N from scales [ng, N]), so a config that disagrees with the weights is one line."""
    from ..quant.pack import padded

    unknown = sorted(set(layer_schemes) - prefixes)
    if unknown:
        raise CheckpointError(f"{path}: layer_schemes names {unknown[0]}, which holds no quantized weights; "
                              "the checkpoint is corrupt, re-create it")
    for p in sorted(prefixes):
        bits = layer_schemes.get(p, {}).get("bits", scheme.bits)
        n = header[f"{p}.scales"]["shape"][-1]
        cols = header[f"{p}.qzeros"]["shape"][-1]
        if cols != padded(n) * bits // 32:
            raise CheckpointError(f"{path}: layer {p} stores {cols * 32 // padded(n)}-bit zeros but config.json says "
                                  f"{bits} bits; the checkpoint is corrupt, re-create it")


def _check_sparsity_config(sp: dict) -> None:
    NMPattern.parse(sp.get("nm_pattern"))
    if sp.get("format", "nm" if sp.get("nm_pattern") else "bitmask") not in ("nm", "bitmask", "quant"):
        raise LlmsqueezeError(f"sparse format {sp.get('format')!r} is unknown")
    if not isinstance(sp["layers"], list):
        raise LlmsqueezeError("sparsity.layers must list the pruned layers")


def replace_with_quant_linear(model: nn.Module, qc: dict) -> list[str]:
    """Swap every Linear not in modules_to_not_convert for an empty QuantLinear of the same shape
    (on whatever device the skeleton is, usually meta); the loader then fills its buffers."""
    from ..models import all_linear_names, split_fused_experts
    from ..nn import SparseLinear, empty_quant_linear, linear_weight, set_module

    split_fused_experts(model)  # MoE: the checkpoint stores each expert's matrices under its own names
    sp = qc.get("sparsity")
    if sp is not None and sp.get("format") == "nm" and qc.get("scheme") is not None:  # N:M, values quantized
        scheme = scheme_from_dict(qc["scheme"])
        n, m = NMPattern.parse(sp["nm_pattern"])
        for name in sp["layers"]:
            layer = model.get_submodule(name)
            w = linear_weight(layer)
            n_out, k = w.shape
            g = scheme.group_size_for(k)
            cg = k // m * n if -(-k // g) == 1 else g // m * n
            set_module(model, name, SparseLinear(k, n_out, "nm", (n, m), bias=layer.bias is not None, dtype=w.dtype,
                                                 device=w.device, quant=(scheme.bits, cg),
                                                 scale_dtype=scheme.torch_scale_dtype))
        return list(sp["layers"])
    if qc.get("scheme") is None:  # pruned only
        nm = NMPattern.parse(sp.get("nm_pattern"))
        for name in sp["layers"]:
            layer = model.get_submodule(name)
            w = linear_weight(layer)
            n_out, k = w.shape
            nnz = None if nm else int(sp["nnz"][name])
            set_module(model, name, SparseLinear(k, n_out, "nm" if nm else "bitmask", nm, nnz, bias=layer.bias is not None,
                                                 dtype=w.dtype, device=w.device))
        return list(sp["layers"])
    scheme = scheme_from_dict(qc["scheme"])
    layer_schemes = qc.get("layer_schemes")  # mixed precision: per-layer bits
    args = qc.get("method_args") or {}
    act_order = bool(args.get("act_order")) and not args.get("static_groups")  # only then is g_idx stored
    keep = set(qc.get("modules_to_not_convert", []))
    names = [n for n in all_linear_names(model) if n not in keep]
    for name in names:
        layer = model.get_submodule(name)
        w = linear_weight(layer)
        n_out, k = w.shape
        if isinstance(scheme, W8A8Scheme):
            from ..nn_int8 import Int8Linear

            set_module(model, name, Int8Linear(k, n_out, bias=layer.bias is not None, static=scheme.act == "static",
                                               bias_dtype=w.dtype, device=w.device))
            continue
        if isinstance(scheme, GGUFScheme):
            from ..nn_gguf import GGUFLinear

            if name not in scheme.layer_types:
                continue
            set_module(model, name, GGUFLinear(k, n_out, scheme.layer_types[name], bias=layer.bias is not None,
                                               bias_dtype=w.dtype, device=w.device))
            continue
        if isinstance(scheme, FloatScheme):
            from ..nn_float import FloatLinear

            set_module(model, name, FloatLinear(k, n_out, scheme.format, bias=layer.bias is not None,
                                                static=scheme.act == "static", bias_dtype=w.dtype, device=w.device))
            continue
        set_module(model, name, empty_quant_linear(k, n_out, scheme_for(scheme, layer_schemes, name),
                                                   bias=layer.bias is not None, bias_dtype=w.dtype,
                                                   act_order=act_order, device=w.device))
    return names


def verify_sparse_layers(model: nn.Module, qc: dict) -> None:
    """Refuse a loaded model whose sparse layers break their pattern: SparseLinear's own check, and
    for sparse+quantized layers at most N nonzero codes (q != zero) in every group of M inputs."""
    from ..nn import QuantLinear, SparseLinear
    from ..pruning.masks import is_nm

    sp = qc.get("sparsity")
    if sp is None:
        return
    nm = NMPattern.parse(sp.get("nm_pattern"))
    for name in sp["layers"]:
        layer = model.get_submodule(name)
        problem = None
        if isinstance(layer, SparseLinear):
            problem = layer.verify()
        elif isinstance(layer, QuantLinear) and nm is not None:
            q, _, zero = layer.unpack()
            g = layer.group_size
            nonzero = q != zero.repeat_interleave(g, dim=1)[:, : layer.in_features]
            if not is_nm(nonzero, *nm):
                problem = f"its codes break the {nm[0]}:{nm[1]} pattern"
        if problem:
            raise CheckpointError(f"layer {name}: {problem}; the checkpoint is corrupt, re-create it")

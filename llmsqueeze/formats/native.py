"""llmsqueeze's own checkpoint format (quant_method "llmsqueeze"): what config.json's
quantization_config says (`quantization_config`, `sparsity_config`), writing it (`save_quantized`:
pruned layers compressed first, then the model dir through formats.writer), verifying a directory
before any model is built (`check_checkpoint`), and loading it through transformers' own
`from_pretrained` via a registered HfQuantizer (which also loads the peer formats of formats/,
translated to ours).

Per quantized Linear (uniform grid): qweight, scales, qzeros (+ g_idx with dynamic act-order);
non-uniform grids: qweight + scales (nf) or codebook (kmeans); W8A8: int8 weight + weight_scale
(+ input_scale when static); pruned layers: values (or qvalues.*) + indices (N:M) or bitmask.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import (
    CheckpointError,
    LlmsqueezeError,
    NMPattern,
    QuantScheme,
    W8A8Scheme,
    check_layer_schemes,
    first_line,
    scheme_for,
    scheme_from_dict,
)
from .files import read_config, read_safetensors_header, tensor_index, weight_files
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


# ---------------------------------------------------------------------------------------- verify
def check_checkpoint(path: str | os.PathLike) -> dict:
    """Verify a llmsqueeze checkpoint dir before any model is built: ours, a version we read,
    complete shards, every quantized layer with all its tensors. Returns its quantization_config."""
    from . import IMPORT_METHODS, imported_config

    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    config = read_config(path)
    qc = config.get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{path} is not quantized (no quantization_config); load it with transformers or quantize it first")
    method = qc.get("quant_method")
    if method in IMPORT_METHODS:  # a peer's checkpoint: translated to ours, converted while loading
        return imported_config(path, config, tensor_index(path))
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{path} was made by another tool (quant_method={method!r}); llmsqueeze reads its own format "
            f"'{QUANT_METHOD}' and imports {', '.join(IMPORT_METHODS)}: load it with transformers, or re-quantize "
            "the dense model with llmsqueeze"
        )
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
    else:
        suffixes = QUANT_SUFFIXES
        if isinstance(scheme, W8A8Scheme):
            marker, suffixes = "weight_scale", W8A8_SUFFIXES + (("input_scale",) if scheme.act == "static" else ())
        prefixes = {k.rsplit(".", 1)[0] for k in keys if k.endswith("." + marker)}
    lut = fmt not in ("nm", "bitmask") and getattr(scheme, "grid", "uniform") != "uniform"
    if lut:  # non-uniform grid: indices + nf scales or k-means codebook, no zero points
        suffixes = ("qweight", "scales" if scheme.grid == "nf" else "codebook")
    if not prefixes:
        raise CheckpointError(f"{path} holds no quantized or sparse weights (no *.{marker}); re-create the checkpoint")
    for p in sorted(prefixes):
        if marker == "weight_scale" and header.get(f"{p}.weight", {}).get("dtype", "I8") != "I8":
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


# ---------------------------------------------------------------------------------------- load
class LlmsqueezeConfig(QuantizationConfigMixin):
    """transformers' view of our `quantization_config` (quant_method 'llmsqueeze')."""

    def __init__(self, scheme=None, method="rtn", format_version=FORMAT_VERSION, modules_to_not_convert=None,
                 method_args=None, source=None, sparsity=None, layer_schemes=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.source = dict(source) if source else None  # a peer format being imported (formats/)
        self.format_version = format_version
        self.method = method
        self.method_args = dict(method_args or {})
        self.sparsity = None if sparsity is None else dict(sparsity)
        self.scheme = None if scheme is None and sparsity is not None else dict(scheme or {})
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.layer_schemes = {k: dict(v) for k, v in check_layer_schemes(layer_schemes).items()}
        if self.scheme is not None:
            scheme_from_dict(self.scheme)  # validate

    def to_dict(self) -> dict:
        d = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "method": self.method,
            "scheme": None if self.scheme is None else dict(self.scheme),
            "method_args": dict(self.method_args),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            **({"source": dict(self.source)} if self.source else {}),
        }
        if self.sparsity is not None:
            d["sparsity"] = dict(self.sparsity)
        if self.layer_schemes:  # mixed precision (format_version 3)
            d["layer_schemes"] = {k: dict(v) for k, v in self.layer_schemes.items()}
        return d

    def to_diff_dict(self) -> dict:
        return self.to_dict()


class LlmsqueezeHfQuantizer(HfQuantizer):
    """Loads llmsqueeze checkpoints inside `from_pretrained`: swaps Linears for empty QuantLinears
    on the meta skeleton, then transformers fills their packed buffers from the shards."""

    requires_calibration = True  # only pre-quantized checkpoints; quantizing is llmsqueeze.quantize()

    def _process_model_before_weight_loading(self, model, **kwargs):
        names = replace_with_quant_linear(model, self.quantization_config.to_dict())
        if self.quantization_config.source:  # tensors of the peer format that our layout does without
            from . import ignored_on_import

            model._keys_to_ignore_on_load_unexpected = {
                *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                *ignored_on_import(self.quantization_config.source, self.quantization_config.method_args),
            }
        # The checkpoint holds every packed buffer, so transformers' random init must not visit the
        # QuantLinears, nor their parents, whose _init_weights may reach for `child.weight` (GPT-2
        # rescales c_proj.weight in GPT2Attention/GPT2MLP).
        for name in names:
            model.get_submodule(name)._is_hf_initialized = True
            parent = name.rpartition(".")[0]
            if parent:
                model.get_submodule(parent)._is_hf_initialized = True

    def get_weight_conversions(self):
        if not self.quantization_config.source:
            return super().get_weight_conversions()
        from . import weight_conversions

        return weight_conversions(self.quantization_config.source)

    def _process_model_after_weight_loading(self, model, **kwargs):
        verify_sparse_layers(model, self.quantization_config.to_dict())
        # the buffers now hold our layout: saving the model writes a plain llmsqueeze checkpoint, so
        # neither the config nor transformers' save (which reverts load-time conversions) may recall
        # the peer format
        self.quantization_config.source = None
        convs = getattr(model, "_weight_conversions", None)
        if convs:
            model._weight_conversions = [
                c for c in convs if not any(getattr(op, "llmsqueeze_import", False) for op in getattr(c, "operations", ()))
            ]
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False


def replace_with_quant_linear(model: nn.Module, qc: dict) -> list[str]:
    """Swap every Linear not in modules_to_not_convert for an empty QuantLinear of the same shape
    (on whatever device the skeleton is, usually meta); the loader then fills its buffers."""
    from ..models import all_linear_names
    from ..nn import SparseLinear, empty_quant_linear, linear_weight, set_module

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


_REGISTERED = False


def register_with_transformers() -> None:
    """Make `transformers.AutoModelForCausalLM.from_pretrained` read llmsqueeze checkpoints."""
    global _REGISTERED
    if _REGISTERED:
        return
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LlmsqueezeHfQuantizer:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded module's stale classes
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LlmsqueezeConfig)
        register_quantizer(QUANT_METHOD)(LlmsqueezeHfQuantizer)
    _REGISTERED = True


def from_pretrained(path: str | os.PathLike, device_map=None, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """Load a llmsqueeze checkpoint (local dir, verified first; or a hub id) as a causal LM."""
    from transformers import AutoModelForCausalLM

    register_with_transformers()
    local = Path(str(path)).expanduser()
    if local.exists() or str(path).startswith((".", "/", "~")):
        qc = check_checkpoint(local)
        path = str(local)
        if qc.get("source") and "config" not in kwargs:  # a peer's checkpoint: load it as ours
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            config.quantization_config = qc
            kwargs["config"] = config
    try:
        return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **kwargs)
    except OSError as e:
        first = first_line(e)
        raise CheckpointError(f"cannot load {path}: {first}") from None

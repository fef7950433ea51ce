"""Pruned checkpoints -> compressed-tensors: its sparse formats, and sparse + quantized as pack-quantized.

What each of our sparse storages becomes (config.json `quantization_config.sparsity_config` is the
block compressed-tensors' SparsityCompressionConfig dumps: format, sparsity_structure, targets
["Linear"], ignore (the Linear layers left dense), global_sparsity (zero parameters / all
parameters of the model, as llm-compressor counts it), registry_requires_subclass):

  pruned 2:4, values dense       "sparse-24-bitmask", per pruned Linear W [N, K]:
                                   compressed  [N, K/2]  the 2 kept values of each group of 4, row-major
                                                         (a group with fewer than 2 nonzeros keeps zeros)
                                   bitmask     uint8 [N, ceil(K/8)]  input j of row i is bit j % 8
                                                         (least significant first) of byte [i, j // 8];
                                                         exactly 2 bits set in each group of 4
                                   shape       int64 [2, 1]  (N, K)
  pruned otherwise (unstructured, "sparse-bitmask": compressed 1-D, the marked values row-major;
  or N:M other than 2:4)           bitmask as above; shape int64 [2]; row_offsets int64 [N] (index in
                                   `compressed` where each row starts). sparsity_structure is
                                   "unstructured" for N:M other than 2:4: the SparsityStructure enum
                                   that readers parse knows only "2:4", "unstructured" and "0:0", so
                                   llm-compressor never writes another pattern there.
  pruned + quantized (any N:M,     quantization as our pack-quantized export (compressed_tensors.py;
  unstructured)                    the pruned weights are codes equal to the zero point: exactly 0),
                                   sparsity_config format "dense" with the structure: what
                                   llm-compressor writes for weight-only quantization of a sparse model
                                   (it turns sparse-24-bitmask off whenever the weights are quantized
                                   without activations). Not "marlin-24": that format has no
                                   decompressor in any compressed-tensors release (0.20 dropped its
                                   compressor), takes symmetric 4-bit with group 128 or per channel
                                   only, and vLLM has removed its kernel.

w = 0 wherever a bitmask bit is clear, else the next value of `compressed`. The tensors are written
here from that description (tests/test_sparse_export.py decodes them with a decoder of its own;
eval/sparse_export_check.py with compressed-tensors 0.10.2's own decompressors, the last releases to
ship them). compressed-tensors 0.20 still dumps and validates the config block, so it builds it.
"""
from __future__ import annotations

import torch

from ..config import CheckpointError, LlmsqueezeError, NMPattern
from ..nn import QuantLinear, SparseLinear, pack_bits, unpack_bits
from . import compressed_tensors

SPARSE_24 = "sparse-24-bitmask"
SPARSE_BITMASK = "sparse-bitmask"
DENSE = "dense"
# tensors of one layer in our sparse storages; everything else of the layer (bias) is copied as is
OURS = ("values", "indices", "bitmask", "qvalues.qweight", "qvalues.scales", "qvalues.qzeros", "qweight", "scales",
        "qzeros", "g_idx")


# ------------------------------------------------------------------------------ tensor conversions
def nm_mask(layer: SparseLinear) -> torch.Tensor:
    """bool [N, K]: the slots an N:M layer stores (its kept values, and the zeros that fill a group
    with fewer than n nonzeros)."""
    n, m = layer.nm
    mask = torch.zeros(layer.out_features, layer.in_features // m, m, dtype=torch.bool)
    return mask.scatter_(-1, layer._positions(), True).view(layer.out_features, layer.in_features)


def sparse24_tensors(layer: SparseLinear) -> dict[str, torch.Tensor]:
    """A 2:4 SparseLinear with dense values -> sparse-24-bitmask {compressed, bitmask, shape}: our
    values are already the kept values in row-major order, 2 per group of 4."""
    n_out, k = layer.out_features, layer.in_features
    return {"compressed": layer.values.contiguous(), "bitmask": pack_bits(nm_mask(layer)),
            "shape": torch.tensor([[n_out], [k]], dtype=torch.int64)}


def bitmask_tensors(layer: SparseLinear) -> dict[str, torch.Tensor]:
    """Any pruned SparseLinear with dense values -> sparse-bitmask {compressed, bitmask, shape, row_offsets}."""
    n_out, k = layer.out_features, layer.in_features
    if layer.fmt == "bitmask":
        bitmask, values = layer.bitmask, layer.values  # already the format's bitmask and value order
        counts = unpack_bits(bitmask, k).sum(1)
    else:
        mask = nm_mask(layer)
        bitmask, values = pack_bits(mask), layer.values.reshape(-1)  # row-major = the mask's order
        counts = mask.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    return {"compressed": values.contiguous(), "bitmask": bitmask.contiguous(),
            "shape": torch.tensor([n_out, k], dtype=torch.int64), "row_offsets": offsets.to(torch.int64)}


def dense_quant_linear(layer: SparseLinear, group_size: int) -> QuantLinear:
    """An N:M SparseLinear with quantized values -> the QuantLinear of its whole [N, K] weight: the
    kept codes at their positions, every other code at its group's zero point (dequantizes to 0).
    group_size is the scheme's (dense) group, -1 per channel; the compressed matrix's groups are the
    same groups with n/m of their columns."""
    n, m = layer.nm
    q, scale, zero = layer.qvalues.unpack()  # [N, K*n/m], [N, ng], [N, ng]
    n_out, k = layer.out_features, layer.in_features
    g = k if group_size == -1 else group_size
    codes = zero.repeat_interleave(g, dim=1)[:, :k].contiguous()
    codes.view(n_out, k // m, m).scatter_(-1, layer._positions(), q.view(n_out, k // m, n))
    return QuantLinear.from_quantized(codes, scale, zero, layer.qvalues.bits, group_size,
                                      scale_dtype=layer.qvalues.scales.dtype)


# ------------------------------------------------------------------------------ config
def structure(nm: tuple[int, int] | None) -> str:
    return "2:4" if nm == (2, 4) else "unstructured"


def sparsity_config(fmt: str, nm: tuple[int, int] | None, ignore: list[str], global_sparsity: float) -> dict:
    """The sparsity_config block, built and validated by compressed-tensors' own config class."""
    ct, *_ = compressed_tensors._library()
    from compressed_tensors.config import SparsityCompressionConfig

    cfg = SparsityCompressionConfig.load_from_registry(
        fmt, targets=["Linear"], ignore=sorted(ignore), global_sparsity=global_sparsity,
        sparsity_structure=structure(nm))
    return cfg.model_dump()


def sparse_only_config(sparsity: dict) -> dict:
    """quantization_config of a pruned, unquantized model: exactly the three keys compressed-tensors
    writes then (any other key would read as a quantization config without config_groups)."""
    ct, *_ = compressed_tensors._library()
    return {"quant_method": "compressed-tensors", "version": ct.__version__, "sparsity_config": sparsity}


# ------------------------------------------------------------------------------ export
def export(src, qc: dict, config: dict, keys: dict, out, scale_dtype: str | None, format: str):
    """Write the pruned llmsqueeze checkpoint `src` (quantization_config `qc`, tensor index `keys`)
    as compressed-tensors into `out` (prepared by the caller). See the module docstring."""
    from ..config import QuantScheme
    from .files import linear_shapes, skeleton, tensor_getter
    from .writer import ExportJob, atomic_output_dir, copy_side_files, write_config, write_shards

    sp = qc["sparsity"]
    fmt = sp.get("format")
    nm = NMPattern.parse(sp.get("nm_pattern"))
    quantized = qc.get("scheme") is not None
    if format != "compressed-tensors":
        what = ("N:M values stored compressed (sparsity.format 'nm'), which GPTQ cannot store" if quantized
                else "pruned but not quantized (scheme null); GPTQ stores quantized weights only")
        raise LlmsqueezeError(f"cannot export to {format}: {src} is {what}; export to --format compressed-tensors")
    if not quantized and scale_dtype:
        raise LlmsqueezeError(f"--scale-dtype {scale_dtype}: {src} is pruned, not quantized: it has no scales")
    model, _ = skeleton(src)
    shapes = linear_shapes(model)
    layers = list(sp["layers"])
    unknown = [p for p in layers if p not in shapes]
    if unknown:
        raise CheckpointError(f"{src}: sparsity.layers names {unknown[0]}, which is not a Linear of this model; "
                              "re-create the checkpoint")
    conv1d = [p for p in layers if not shapes[p][2]]
    scheme = QuantScheme.from_dict(qc["scheme"]) if quantized else None
    # packed QuantLinears: the quantized layers of a "quant" sparse storage, and any quantized layer left unpruned
    packed = sorted({k[: -len(".qweight")] for k in keys if k.endswith(".qweight") and not k.endswith(".qvalues.qweight")})
    nm_quant = layers if quantized and fmt == "nm" else []
    owned = set(layers) | set(packed)
    if quantized:
        qlayers = sorted(set(packed) | set(nm_quant))
        args = qc.get("method_args") or {}
        job = ExportJob(scheme, {p: shapes[p][:2] for p in qlayers}, dense=[p for p in shapes if p not in owned],
                        conv1d=[p for p in qlayers if not shapes[p][2]],
                        g_idx_stored=bool(args.get("act_order")) and not args.get("static_groups"),
                        method=qc.get("method", "rtn"), method_args=args, scale_dtype=scale_dtype)
        compressed_tensors.export_check(job)
    elif conv1d:
        raise LlmsqueezeError(f"cannot export to compressed-tensors: Conv1D layers ({conv1d[0]}, ...; "
                              "its sparse formats target nn.Linear weights [N, K])")

    get = tensor_getter(keys)

    def sparse_layer(p: str) -> SparseLinear:
        n_out, k = shapes[p][:2]
        if fmt == "bitmask":
            values = get(f"{p}.values")
            layer = SparseLinear(k, n_out, "bitmask", nnz=values.numel(), dtype=values.dtype)
            layer.values, layer.bitmask = values, get(f"{p}.bitmask")
        elif quantized:
            g = scheme.group_size_for(k)
            cg = k // nm[1] * nm[0] if -(-k // g) == 1 else g // nm[1] * nm[0]
            layer = SparseLinear(k, n_out, "nm", nm, quant=(scheme.bits, cg), scale_dtype=get(f"{p}.qvalues.scales").dtype)
            q = layer.qvalues
            q.qweight, q.scales, q.qzeros = (get(f"{p}.qvalues.{s}") for s in ("qweight", "scales", "qzeros"))
        else:
            values = get(f"{p}.values")
            layer = SparseLinear(k, n_out, "nm", nm, dtype=values.dtype)
            layer.values = values
        if fmt == "nm":
            layer.indices = get(f"{p}.indices")
        problem = layer.verify()
        if problem:
            raise CheckpointError(f"{src}: layer {p}: {problem}; the checkpoint is corrupt, re-create it")
        return layer

    zeros = [0, 0]  # zero parameters, all parameters: global_sparsity

    def count(w: torch.Tensor) -> None:
        zeros[0] += int((w == 0).sum())
        zeros[1] += w.numel()

    def convert(p: str) -> dict[str, torch.Tensor]:
        if quantized:
            if p in nm_quant:
                q = dense_quant_linear(sparse_layer(p), scheme.group_size)
            else:
                n_out, k = shapes[p][:2]
                q = QuantLinear(k, n_out, scheme.bits, scheme.group_size, scale_dtype=get(f"{p}.scales").dtype,
                                device="cpu")
                q.qweight, q.qzeros, q.scales = get(f"{p}.qweight"), get(f"{p}.qzeros"), get(f"{p}.scales")
            count(q.dequantize_weight())
            return compressed_tensors.export_layer(p, q, job)
        layer = sparse_layer(p)
        count(layer.to_dense())
        tensors = sparse24_tensors(layer) if nm == (2, 4) else bitmask_tensors(layer)
        return {f"{p}.{s}": t for s, t in tensors.items()}

    def tensors_of(name: str) -> dict[str, torch.Tensor]:
        prefix, _, suffix = name.rpartition(".")
        if prefix.endswith(".qvalues"):
            prefix, suffix = prefix[: -len(".qvalues")], "qvalues." + suffix
        if prefix in owned and suffix in OURS:
            return convert(prefix) if suffix in ("values", "qvalues.qweight", "qweight") else {}
        t = get(name)
        if t.is_floating_point():
            count(t)
        return {name: t}

    with atomic_output_dir(out) as tmp:
        write_shards(src, keys, tmp, tensors_of)
        copy_side_files(src, tmp)
        ignore = [p for p in shapes if p not in layers]
        if quantized:
            block = sparsity_config(DENSE, nm, ignore, zeros[0] / zeros[1])
            config["quantization_config"] = {**compressed_tensors.export_config(job), "sparsity_config": block}
        else:
            fmt_out = SPARSE_24 if nm == (2, 4) else SPARSE_BITMASK
            config["quantization_config"] = sparse_only_config(sparsity_config(fmt_out, nm, ignore, zeros[0] / zeros[1]))
        write_config(tmp, config)
    return out

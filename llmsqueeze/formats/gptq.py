"""GPTQ checkpoints (quant_method "gptq"): the AutoGPTQ / GPTQModel layout that transformers, TGI
and vLLM's GPTQ and Marlin paths read.

Per Linear of K inputs, N outputs, group size G (K when per-channel), b bits:
  qweight int32 [K*b/32, N]    32 values per b words along K, first value in the low bits
                               (the same bit stream as ours, without our padding of K to 32)
  qzeros  int32 [K/G, N*b/32]  packed along N; checkpoint_format "gptq" (v1) stores zero - 1,
                               "gptq_v2" (GPTQModel) stores the zero itself
  scales  float16 [K/G, N]
  g_idx   int32 [K]            group of each input column: arange(K) // G unless desc_act
  bias    [N]
  w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

Readers size scales as K // G rows (vLLM checks it), so a shorter last group is refused on export.
v1 cannot store a zero point of 0 (its z - 1 is -1): readers add 1 to the stored b-bit value, or add
0x11111111 to the packed word and carry into the next zero; such layers are refused for v1.
"""
from __future__ import annotations

import torch

from ..config import LlmsqueezeError
from ..quant.pack import pack_cols, unpack_cols, unpack_rows
from .writer import ExportJob

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
MARKER = "qweight"  # the tensor that marks a quantized Linear
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # every tensor a quantized Linear may have
REQUIRED = ("qweight", "qzeros", "scales")
IMPORTED_METHOD = "gptq"  # `method` in our quantization_config of an imported checkpoint


def zero_offset(checkpoint_format: str) -> int:
    """What the file stores is zero - offset: 1 for v1 ("gptq"), 0 for "gptq_v2"."""
    return 1 if checkpoint_format == "gptq" else 0


# ------------------------------------------------------------------------------ tensor conversions
def qweight_to_gptq(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Our qweight [K_pad*b/32, N] -> GPTQ [K*b/32, N] (K*b a multiple of 32: drop our padding)."""
    return qweight[: k * bits // 32].contiguous()


def qweight_from_gptq(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """GPTQ qweight [K*b/32, N] -> ours [K_pad*b/32, N] (zero words for the padding)."""
    rows = -(-k // 32) * bits
    if qweight.shape[0] == rows:
        return qweight.contiguous()
    return torch.cat([qweight, qweight.new_zeros(rows - qweight.shape[0], qweight.shape[1])]).contiguous()


def qzeros_to_gptq(qzeros: torch.Tensor, bits: int, n: int, checkpoint_format: str) -> torch.Tensor:
    """Our qzeros (true zeros) [ng, N_pad*b/32] -> GPTQ [ng, N*b/32] storing zero - offset."""
    zero = unpack_cols(qzeros, bits, n)  # [ng, N]
    stored = (zero - zero_offset(checkpoint_format)) & (2**bits - 1)
    return pack_cols(stored, bits)[:, : n * bits // 32].contiguous()


def qzeros_from_gptq(qzeros: torch.Tensor, bits: int, n: int, checkpoint_format: str) -> torch.Tensor:
    """GPTQ qzeros [ng, N*b/32] -> ours [ng, N_pad*b/32] with true zeros."""
    words = -(-n // 32) * bits
    if qzeros.shape[1] < words:
        qzeros = torch.cat([qzeros, qzeros.new_zeros(qzeros.shape[0], words - qzeros.shape[1])], dim=1)
    zero = (unpack_cols(qzeros, bits, n) + zero_offset(checkpoint_format)) & (2**bits - 1)
    return pack_cols(zero, bits)


def natural_g_idx(k: int, group_size: int) -> torch.Tensor:
    """[K] int32: the group of each column when columns are in their natural order."""
    return (torch.arange(k) // group_size).to(torch.int32)


def count_zero_zeros(qzeros: torch.Tensor, bits: int, n: int) -> int:
    """How many group zero points are 0 (the value GPTQ v1 cannot store)."""
    return int((unpack_cols(qzeros, bits, n) == 0).sum())


def unpack_qweight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight [*, N] -> q [K, N]; the same stream layout for GPTQ and ours."""
    return unpack_rows(qweight, bits, k)


# ------------------------------------------------------------------------------ export
def export_check(job: ExportJob) -> None:
    """Refuse, in one line naming the fields, what GPTQ readers cannot take."""
    scheme, layers, checkpoint_format = job.scheme, job.layers, job.checkpoint_format
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise LlmsqueezeError(f"gptq checkpoint_format {checkpoint_format!r}: use one of {', '.join(CHECKPOINT_FORMATS)}")
    problems = []
    for name, (n, k) in layers.items():
        g = k if scheme.group_size == -1 else scheme.group_size
        if k % g:
            divisors = [d for d in (256, 128, 64, 32, 16) if all(kk % d == 0 for _, kk in layers.values())]
            problems.append(
                f"group_size={g} does not divide in_features={k} of {name} (GPTQ readers expect K/G groups; "
                f"re-quantize with --group-size {divisors[0] if divisors else -1})"
            )
            break
        if (k * scheme.bits) % 32 or (n * scheme.bits) % 32 or (scheme.bits == 3 and (k % 32 or n % 32)):
            problems.append(f"{scheme.bits}-bit packing needs in/out features that fill whole int32 words ({name}: {k}->{n})")
            break
    if problems:
        raise LlmsqueezeError("cannot export to gptq: " + "; ".join(problems))
    inside = [n for n in job.not_converted if n != job.head]
    if inside:
        raise LlmsqueezeError(
            f"cannot export to gptq: modules_to_not_convert has layers inside the decoder blocks ({inside[0]}, ...), "
            "which GPTQ configs cannot name; export to --format compressed-tensors (it has an ignore list)"
        )


def export_layer(p: str, layer, job: ExportJob) -> dict[str, torch.Tensor]:
    """One of our QuantLinears (named p) -> its GPTQ tensors."""
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    if job.checkpoint_format == "gptq":
        zeros = count_zero_zeros(layer.qzeros, bits, n)
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
    g_idx = layer.g_idx if layer.g_idx is not None else natural_g_idx(k, layer.group_size)
    return {
        f"{p}.qweight": qweight_to_gptq(layer.qweight, bits, k),
        f"{p}.qzeros": qzeros_to_gptq(layer.qzeros, bits, n, job.checkpoint_format),
        f"{p}.scales": scales.contiguous(),
        f"{p}.g_idx": g_idx.to(torch.int32).contiguous(),
    }


def export_config(job: ExportJob) -> dict:
    """config.json's quantization_config for GPTQ readers (transformers GPTQConfig, vLLM, TGI)."""
    scheme, method_args = job.scheme, job.method_args
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": job.g_idx_stored,
        "sym": scheme.sym,
        "static_groups": bool(method_args.get("static_groups", False)),
        "true_sequential": bool(method_args.get("true_sequential", False)),
        "damp_percent": method_args.get("damp", 0.01),
        "lm_head": job.head in job.layers,
        "checkpoint_format": job.checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["llmsqueeze:0.1.0"], "method": job.method},
    }


# ------------------------------------------------------------------------------ import
def check_import(path, qc: dict) -> None:
    """Nothing in a GPTQ config refuses the checkpoint before its tensors are read."""


def import_scheme(path, qc: dict, keys: dict, prefixes: list[str]) -> tuple[dict, dict, dict, list[str]]:
    """A GPTQ quantization_config -> (our scheme dict, method_args, source entries, unsupported fields)."""
    bad = []
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        bad.append(f"checkpoint_format={fmt!r} (read: {', '.join(CHECKPOINT_FORMATS)})")
    if qc.get("bits") not in (2, 3, 4, 8):
        bad.append(f"bits={qc.get('bits')!r} (read: 2, 3, 4, 8)")
    if qc.get("dynamic"):
        bad.append("dynamic (per-module overrides)")
    if qc.get("pack_dtype", "int32") != "int32":
        bad.append(f"pack_dtype={qc.get('pack_dtype')!r} (read: int32)")
    scheme = {"bits": qc.get("bits"), "group_size": qc.get("group_size", 128), "sym": bool(qc.get("sym", True)),
              "scale_dtype": "float16"}
    desc_act = bool(qc.get("desc_act", False))
    return scheme, {"act_order": desc_act, "static_groups": not desc_act}, {"checkpoint_format": fmt}, bad


def finish_import(args: dict, keys: dict, prefixes: list[str], shapes: dict, scheme: dict) -> None:
    """desc_act false, yet a g_idx that is not arange(K)//G: the columns are permuted after all."""
    if not args["act_order"] and _any_permuted_g_idx(keys, prefixes, shapes, scheme):
        args.update(act_order=True, static_groups=False)


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


def expected_shapes(scheme: dict, n: int, k: int) -> dict[str, list[list[int]]]:
    """The shapes each tensor of a quantized k->n Linear may have: exact, or with our padding to 32."""
    b = scheme["bits"]
    ng = -(-k // (k if scheme["group_size"] == -1 else scheme["group_size"]))
    words_k, words_n = -(-k * b // 32), -(-n * b // 32)
    pad_k, pad_n = -(-k // 32) * b, -(-n // 32) * b  # our padding to runs of 32 values
    return {"qweight": [[words_k, n], [pad_k, n]], "scales": [[ng, n]], "qzeros": [[ng, words_n], [ng, pad_n]]}


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    """Regexes of checkpoint tensors that carry nothing our layout needs."""
    return [] if method_args.get("act_order") else [r"\.g_idx$"]  # arange(K) // G: natural order


def weight_conversions(source: dict, op) -> list:
    """transformers WeightConverters, each tensor through `op(fn(tensor, our QuantLinear), suffix)`."""
    from transformers.core_model_loading import WeightConverter

    cf = source.get("checkpoint_format", "gptq")
    return [
        WeightConverter(["qweight"], ["qweight"], [op(lambda t, m: qweight_from_gptq(t, m.bits, m.in_features), "qweight")]),
        WeightConverter(["qzeros"], ["qzeros"], [op(lambda t, m: qzeros_from_gptq(t, m.bits, m.out_features, cf), "qzeros")]),
    ]


def describe(source: dict) -> str:
    return f"gptq checkpoint (checkpoint_format {source.get('checkpoint_format', 'gptq')}), imported"

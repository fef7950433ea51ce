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

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


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


# ------------------------------------------------------------------------------ config
def export_check(scheme, layers: dict, act_order_g_idx: bool, checkpoint_format: str) -> None:
    """Refuse, in one line naming the fields, what GPTQ readers cannot take."""
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


def export_config(scheme, method: str, method_args: dict, act_order_g_idx: bool, lm_head: bool,
                  checkpoint_format: str) -> dict:
    """config.json's quantization_config for GPTQ readers (transformers GPTQConfig, vLLM, TGI)."""
    return {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": act_order_g_idx,
        "sym": scheme.sym,
        "static_groups": bool(method_args.get("static_groups", False)),
        "true_sequential": bool(method_args.get("true_sequential", False)),
        "damp_percent": method_args.get("damp", 0.01),
        "lm_head": lm_head,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["llmsqueeze:0.1.0"], "method": method},
    }


def import_scheme(qc: dict) -> tuple[dict, dict, list[str]]:
    """A GPTQ quantization_config -> (our scheme dict, method_args, unsupported fields)."""
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
    return scheme, {"act_order": desc_act, "static_groups": not desc_act}, bad

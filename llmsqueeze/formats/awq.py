"""AWQ checkpoints (quant_method "awq", version "gemm"): the AutoAWQ GEMM layout, imported only.

Per Linear of K inputs, N outputs, group size G, 4 bits:
  qweight int32 [K, N/8]   packed along N: nibble i (bits 4i..4i+3) of word c holds column
                           8c + AWQ_ORDER[i]
  qzeros  int32 [K/G, N/8] the same packing, true zero points
  scales  float16 [K/G, N]
  w[k, n] = (q[k, n] - zero[k // G, n]) * scales[k // G, n]
"""
from __future__ import annotations

import torch

from ..quant.pack import pack_cols, pack_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column offset stored in nibble i
MARKER = "qweight"  # the tensor that marks a quantized Linear
LAYER_TENSORS = ("qweight", "qzeros", "scales")  # every tensor a quantized Linear may have
REQUIRED = ("qweight", "qzeros", "scales")
IMPORTED_METHOD = "awq"  # `method` in our quantization_config of an imported checkpoint


def unpack_awq(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [R, N/8] in AWQ order -> int32 [R, N] values in [0, 15]."""
    r, words = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)  # nibble i at 4i
    nibbles = (packed.unsqueeze(2) >> shifts) & 0xF  # [R, N/8, 8]: nibble i of each word
    out = torch.empty_like(nibbles)
    out[:, :, list(AWQ_ORDER)] = nibbles  # nibble i -> column offset AWQ_ORDER[i]
    return out.reshape(r, words * 8)[:, :n]


def qweight_from_awq(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """AWQ qweight [K, N/8] -> ours [K_pad/8, N]."""
    return pack_rows(unpack_awq(qweight, n), 4)


def qzeros_from_awq(qzeros: torch.Tensor, n: int) -> torch.Tensor:
    """AWQ qzeros [ng, N/8] -> ours [ng, N_pad/8]."""
    return pack_cols(unpack_awq(qzeros, n), 4)


# ------------------------------------------------------------------------------ import (no export)
def check_import(path, qc: dict) -> None:
    """Nothing in an AWQ config refuses the checkpoint before its tensors are read."""


def import_scheme(path, qc: dict, keys: dict, prefixes: list[str]) -> tuple[dict, dict, dict, list[str]]:
    """An AWQ quantization_config -> (our scheme dict, method_args, source entries, unsupported fields)."""
    bad = []
    bits = qc.get("bits", qc.get("w_bit"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        bad.append(f"bits={bits!r} (read: 4)")
    if version != "gemm":
        bad.append(f"version={qc.get('version')!r} (read: gemm)")
    if not qc.get("zero_point", True):
        bad.append("zero_point=false (read: true)")
    if qc.get("modules_to_fuse") or qc.get("do_fuse"):
        bad.append("fused modules")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    return {"bits": 4, "group_size": group, "sym": False, "scale_dtype": "float16"}, {}, {}, bad


def finish_import(args: dict, keys: dict, prefixes: list[str], shapes: dict, scheme: dict) -> None:
    """Nothing in AWQ's tensors changes the method options."""


def expected_shapes(scheme: dict, n: int, k: int) -> dict[str, list[list[int]]]:
    """The shapes each tensor of a quantized k->n Linear may have."""
    ng = -(-k // (k if scheme["group_size"] == -1 else scheme["group_size"]))
    return {"qweight": [[k, n // 8]], "scales": [[ng, n]], "qzeros": [[ng, n // 8]]}


def ignored_on_import(source: dict, method_args: dict) -> list[str]:
    return []


def weight_conversions(source: dict, op) -> list:
    """transformers WeightConverters, each tensor through `op(fn(tensor, our QuantLinear), suffix)`."""
    from transformers.core_model_loading import WeightConverter

    return [
        WeightConverter(["qweight"], ["qweight"], [op(lambda t, m: qweight_from_awq(t, m.out_features), "qweight")]),
        WeightConverter(["qzeros"], ["qzeros"], [op(lambda t, m: qzeros_from_awq(t, m.out_features), "qzeros")]),
    ]


def describe(source: dict) -> str:
    return "awq checkpoint (GEMM), imported"

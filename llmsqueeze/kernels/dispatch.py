"""Which kernel runs a call, with which tile sizes: launch heuristics by M and a tiny cached autotune.

    M <= GEMV_MAX_M        gemv (split-K), one row of x per program row: weights stream once per row
                           and the re-reads of the few rows hit L2
    M <= SPLITK_MAX_M      gemm with BM = 16 and split-K: tl.dot on a padded 16-row tile
    otherwise              gemm (prefill), tiles of 32..128 rows
    3-bit                  dequantize kernel + torch matmul (values straddle words; no fused kernel)

On a GPU the first call of each (kernel, M bucket, N, K, bits, group mode, dtype) times a handful of
configs with triton.testing.do_bench and caches the fastest (LLMSQUEEZE_AUTOTUNE=0: first config
only). Under TRITON_INTERPRET=1 one fixed config runs, so tests stay quick.

`quant_matmul` is registered as the torch custom op llmsqueeze::quant_matmul, so torch.compile
treats it as one opaque call and CUDA graphs capture its launches.
"""
from __future__ import annotations

import os

import torch

from . import quant_matmul as qm

GEMV_MAX_M = 4
SPLITK_MAX_M = 16

# (block_n, block_kw, split_k, num_warps); block_kw counts int32 words along K
GEMV_CONFIGS = [
    (128, 8, 4, 4), (64, 8, 4, 4), (128, 16, 2, 4), (256, 8, 2, 8),
    (64, 16, 8, 4), (128, 8, 8, 4), (256, 16, 1, 8), (64, 8, 1, 4),
]
# (block_m, block_n, block_k, split_k, word_tile, num_warps, num_stages)
SPLITK_CONFIGS = [
    (16, 64, 128, 4, False, 4, 3), (16, 128, 64, 4, False, 4, 3), (16, 64, 64, 8, False, 4, 4),
    (16, 128, 128, 2, True, 4, 3), (16, 256, 64, 2, True, 8, 3), (16, 64, 128, 4, True, 4, 4),
]
GEMM_CONFIGS = [
    (64, 128, 64, 1, False, 4, 4), (128, 128, 64, 1, False, 8, 3), (128, 256, 64, 1, True, 8, 3),
    (128, 128, 64, 1, True, 8, 3), (64, 128, 64, 1, True, 4, 4), (32, 64, 128, 1, False, 4, 4),
]
INTERPRET_GEMV = (64, 8, 1, 4)  # few, large programs: the interpreter's cost is per program
INTERPRET_GEMM = (32, 64, 64, 1, True, 4, 1)

_best: dict[tuple, tuple] = {}


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()  # next power of two


def _run(kind: str, cfg: tuple, x, packed: tuple, g_idx, bits, group_size, k):
    """One launch of `kind` with `cfg`; packed = (qweight, scales, qzeros)."""
    if kind == "gemv":
        bn, bkw, split, warps = cfg
        return qm.gemv(x, *packed, g_idx, bits, group_size, k, block_n=bn, block_kw=bkw, split_k=split, num_warps=warps)
    bm, bn, bk, split, word_tile, warps, stages = cfg
    return qm.gemm(x, *packed, g_idx, bits, group_size, k, block_m=bm, block_n=bn, block_k=bk, split_k=split,
                   word_tile=word_tile, num_warps=warps, num_stages=stages)


def _choose(kind: str, x, packed: tuple, g_idx, bits, group_size, k) -> tuple:
    """The config for this call: fixed under the interpreter, else timed once per shape and cached."""
    if qm.interpreting():
        return INTERPRET_GEMV if kind == "gemv" else INTERPRET_GEMM
    configs = {"gemv": GEMV_CONFIGS, "splitk": SPLITK_CONFIGS, "gemm": GEMM_CONFIGS}[kind]
    key = (kind, _bucket(x.shape[0]), packed[0].shape[1], k, bits, group_size, g_idx is not None, x.dtype)
    cfg = _best.get(key)
    if cfg is not None:
        return cfg
    if os.environ.get("LLMSQUEEZE_AUTOTUNE", "1") == "0" or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return configs[0]
    from triton.testing import do_bench

    times = []
    for c in configs:
        try:
            times.append((do_bench(lambda c=c: _run(kind, c, x, packed, g_idx, bits, group_size, k), warmup=5, rep=20), c))
        except Exception:  # a config this GPU cannot run (out of shared memory): skip it
            continue
    cfg = min(times)[1] if times else configs[0]
    _best[key] = cfg
    return cfg


def kernel_for(m: int, bits: int) -> str:
    if 32 % bits:
        return "dequant"
    if m <= GEMV_MAX_M:
        return "gemv"
    return "splitk" if m <= SPLITK_MAX_M else "gemm"


@torch.library.custom_op("llmsqueeze::quant_matmul", mutates_args=())
def quant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
    bits: int, group_size: int, in_features: int,
) -> torch.Tensor:
    """x [M, K] -> x @ W^T [M, N] in x.dtype, W in the packed layout; the kernel picked by M."""
    kind = kernel_for(x.shape[0], bits)
    if kind == "dequant":
        w_t = qm.dequantize(qweight, scales, qzeros, g_idx, bits, group_size, in_features, x.dtype)
        return x @ w_t
    packed = (qweight, scales, qzeros)
    cfg = _choose(kind, x, packed, g_idx, bits, group_size, in_features)
    return _run(kind, cfg, x, packed, g_idx, bits, group_size, in_features)


@quant_matmul.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features):
    return x.new_empty(x.shape[0], qweight.shape[1])


# -- lookup-table grids (LUTLinear, llmsqueeze/kernels/lookup.py): one tile kernel, its tiles chosen by M -------
# (block_m, block_n, block_k, num_warps, num_stages); no autotune yet: not timed on a GPU
LUT_CONFIGS = ((16, (16, 64, 64, 4, 2)), (64, (64, 64, 64, 4, 3)), (None, (128, 128, 64, 8, 3)))
INTERPRET_LUT = (16, 64, 32, 4, 1)


def lut_config(m: int) -> tuple:
    if qm.interpreting():
        return INTERPRET_LUT
    return next(cfg for limit, cfg in LUT_CONFIGS if limit is None or m <= limit)


@torch.library.custom_op("llmsqueeze::lut_matmul", mutates_args=())
def lut_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None, table: torch.Tensor, bits: int,
    group_size: int, in_features: int,
) -> torch.Tensor:
    """x [M, K] -> x @ W^T [M, N] in x.dtype for a non-uniform grid: nf (scales [ng, N], table = the
    float32 levels) or kmeans (scales None, table = codebook [ng, N, 2**bits])."""
    from .lookup import lut_gemm

    bm, bn, bk, warps, stages = lut_config(x.shape[0])
    return lut_gemm(x, qweight, scales, table, bits, group_size, in_features, block_m=bm, block_n=bn, block_k=bk,
                    num_warps=warps, num_stages=stages)


@lut_matmul.register_fake
def _(x, qweight, scales, table, bits, group_size, in_features):
    return x.new_empty(x.shape[0], qweight.shape[1])

"""Triton lookup-table dequant-matmul for non-uniform grids (LUTLinear, llmsqueeze/quant/lut.py).

    y [M, N] = x [M, K] @ W^T,   W^T[k, n] = levels[q[k, n]] * scales[g, n]   (grid "nf")
                                 W^T[k, n] = codebook[g, n, q[k, n]]          (grid "kmeans")
    g = k // G

Operands as LUTLinear stores them:
    qweight  int32 [K_pad*bits/32, N]   the indices, packed like uniform codes (pack.py); 2/3/4 bits
    scales   [ceil(K/G), N]             fp16/bf16 (nf only)
    table    nf: float32 [2**bits] levels; kmeans: codebook [ceil(K/G), N, 2**bits] fp16/bf16

One tile kernel for every M: a [BM, BK] x [BK, BN] product on tl.dot, the weight tile looked up in
registers (a gather from the 16-entry levels table, or from the tile's [BN, 2**bits] codebook rows,
which stay in L1/L2) and rounded to the activation dtype, accumulated in float32. The lookup is the
same float32 value torch computes (levels * scale, or the stored codebook entry), so the only
differences from LUTLinear's torch path are the rounding of W to the activation dtype and the
summation order. A shorter last group (K = 576, G = 128) is the row mask k < K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_matmul import interpreting, unpack


@triton.jit
def _lut_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, t_ptr, y_ptr, M, N, K, G,
    BITS: tl.constexpr, LEVELS: tl.constexpr, NF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # grid (cdiv(M, BM), cdiv(N, BN)); x [M, K] -> y [M, N]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wmask = k_mask[:, None] & n_mask[None, :]
        q = unpack(qw_ptr, offs_k[:, None], N, offs_n[None, :], wmask, BITS)  # [BK, BN] indices
        g = offs_k // G  # [BK]
        if NF:
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
            w = tl.load(t_ptr + q, mask=wmask, other=0.0) * s
        else:
            w = tl.load(t_ptr + (g[:, None] * N + offs_n[None, :]) * LEVELS + q, mask=wmask, other=0.0).to(tl.float32)
        if DOT_FP32:  # the interpreter's tl.dot mishandles bf16 operands: multiply the same values in fp32
            acc += tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32))
        else:
            acc += tl.dot(a, w.to(a.dtype))
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def lut_gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor | None, table: torch.Tensor, bits: int,
    group_size: int, in_features: int, *, block_m: int = 16, block_n: int = 64, block_k: int = 64,
    num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x.dtype. `scales` given: nf (table = float32 levels [2**bits]);
    None: kmeans (table = codebook [ng, N, 2**bits]). Block sizes >= 16 (tl.dot)."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    if bits not in (2, 3, 4):
        raise ValueError(f"lookup indices are 2, 3 or 4 bits, not {bits}")
    levels = 2**bits
    nf = scales is not None
    if nf and table.numel() != levels:
        raise ValueError(f"nf levels table has {table.numel()} entries, {bits}-bit indices need {levels}")
    if not nf and table.shape[-1] != levels:
        raise ValueError(f"codebook has {table.shape[-1]} levels per group, {bits}-bit indices need {levels}")
    m = x.shape[0]
    n = qweight.shape[1]
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lut_gemm_kernel[grid](
        x, qweight, scales if nf else table, table.contiguous(), y, m, n, in_features, group_size,
        BITS=bits, LEVELS=levels, NF=nf, BM=block_m, BN=block_n, BK=block_k,
        DOT_FP32=interpreting() and x.dtype != torch.float16, num_warps=num_warps, num_stages=num_stages,
    )
    return y

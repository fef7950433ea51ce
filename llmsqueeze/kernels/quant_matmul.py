"""Triton kernels for packed weights in the GPTQ layout (true zero points), and their launchers.

    y [M, N] = x [M, K] @ W^T,   W^T [K, N] = (q - zero[g]) * scale[g],   g = group of input row k

Packed operands, exactly as QuantLinear stores them (see llmsqueeze/quant/pack.py):
    qweight int32 [K_pad*bits/32, N]   32 values per `bits` words along K, little-endian bit stream
    scales        [ceil(K/G), N]       fp16 or bf16 (converted to fp32 inside the kernels)
    qzeros  int32 [ceil(K/G), N_pad*bits/32]  the same bit stream along N
    g_idx   int32 [K] or None          group of each input row (activation order, any permutation)

Three kernels:
  * `_gemv_kernel`  decode, a few rows: each program streams a [BKW words, BN] tile of qweight and
    takes value j of every word with one shift (j = 0..32/bits-1, unrolled), multiplying by x[w*32/bits + j]
    in fp32 without tl.dot; scale and zero are applied once per tile (s * (sum x q - z * sum x)).
    Split-K over a grid axis writes fp32 partials that one small kernel sums. 2/4/8 bits.
  * `_gemm_kernel`  prefill (and small-M split-K with BM=16): a [BM, BK] x [BK, BN] tile product
    on tl.dot, the weight tile dequantized in registers to the activation dtype. 2/4/8 bits.
  * `_dequant_kernel`  W^T [K, N] in the activation dtype, any of 2/3/4/8 bits (3-bit values that
    straddle two words are stitched from both); bit-identical to QuantLinear.dequantize_weight_t.

Group handling (GROUP_MODE, a compile-time constant):
  0  one group per K tile (no g_idx, and the tile divides G): one scale/zero row per tile;
  1  group = k // G per row (G not a multiple of the tile, e.g. per-channel with odd K);
  2  group = g_idx[k] per row (activation order whose groups are not contiguous in any order).
A shorter last group (K=576, G=128) needs nothing special: rows k >= K are masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _bits_at(lo, hi, shift, BITS: tl.constexpr):
    """The BITS-bit value starting at bit `shift` of the stream lo|hi (two int32 words)."""
    v = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if 32 % BITS != 0:  # 3 bits: a value may continue in the next word
        up = hi.to(tl.uint32, bitcast=True) << ((32 - shift) % 32).to(tl.uint32)
        v = tl.where(shift + BITS > 32, v | up, v)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def unpack(ptr, idx, stride, off, mask, BITS: tl.constexpr):
    """Value number `idx` of the bit streams packed along one axis: word (idx//32)*BITS + bit//32
    at `ptr + word*stride + off`, bit = (idx%32)*BITS. Shapes broadcast (idx vs off). Public: lookup.py
    unpacks its indices with it too."""
    bit = (idx % 32) * BITS
    word = (idx // 32) * BITS + bit // 32
    shift = bit % 32
    lo = tl.load(ptr + word * stride + off, mask=mask, other=0)
    hi = lo
    if 32 % BITS != 0:
        hi = tl.load(ptr + (word + 1) * stride + off, mask=mask & (shift + BITS > 32), other=0)
    return _bits_at(lo, hi, shift, BITS)


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, gidx_ptr, y_ptr,
    M, N, K, G, KW_SPLIT, stride_z,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # grid (cdiv(N, BN), SPLIT_K, M); x [M, K], y [M, N] (SPLIT_K == 1) or fp32 [SPLIT_K, M, N]
    EPW: tl.constexpr = 32 // BITS  # values per word
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BKW)
    kw_total = tl.cdiv(K, EPW)
    kw_start = pid_k * KW_SPLIT
    kw_end = tl.minimum(kw_total, kw_start + KW_SPLIT)
    acc = tl.zeros([BKW, BN], dtype=tl.float32)  # reduced over BKW once, after the loop
    for kw0 in range(kw_start, kw_end, BKW):
        w_idx = kw0 + offs_w  # [BKW] word rows of qweight
        w_mask = w_idx < kw_end
        packed = tl.load(qw_ptr + w_idx[:, None] * N + offs_n[None, :], mask=w_mask[:, None] & n_mask[None, :], other=0)
        if GROUP_MODE == 0:
            # one scale and zero per column in this tile: sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k)
            g = (kw0 * EPW) // G
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * stride_z + offs_n // EPW, mask=n_mask, other=0)
            z = ((zw >> ((offs_n % EPW) * BITS)) & MASK).to(tl.float32)
            xq = tl.zeros([BKW, BN], dtype=tl.float32)
            xs = tl.zeros([BKW], dtype=tl.float32)
            for j in tl.static_range(EPW):  # value j of every word: input row w*EPW + j
                k = w_idx * EPW + j
                xj = tl.load(x_ptr + m * K + k, mask=w_mask & (k < K), other=0.0).to(tl.float32)  # [BKW]
                xq += xj[:, None] * ((packed >> (j * BITS)) & MASK).to(tl.float32)
                xs += xj
            acc += (xq - xs[:, None] * z[None, :]) * s[None, :]
        else:
            for j in tl.static_range(EPW):
                k = w_idx * EPW + j
                k_mask = w_mask & (k < K)
                xj = tl.load(x_ptr + m * K + k, mask=k_mask, other=0.0).to(tl.float32)  # [BKW]
                if GROUP_MODE == 1:
                    g = k // G
                else:
                    g = tl.load(gidx_ptr + k, mask=k_mask, other=0)
                wmask = k_mask[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
                zw = tl.load(qz_ptr + g[:, None] * stride_z + (offs_n // EPW)[None, :], mask=wmask, other=0)
                z = (zw >> ((offs_n % EPW) * BITS)[None, :]) & MASK
                q = (packed >> (j * BITS)) & MASK  # [BKW, BN]
                acc += xj[:, None] * ((q - z).to(tl.float32) * s)
    acc = tl.sum(acc, axis=0)  # [BN]
    if SPLIT_K == 1:
        tl.store(y_ptr + m * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(y_ptr + (pid_k * M + m) * N + offs_n, acc, mask=n_mask)


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, gidx_ptr, y_ptr,
    M, N, K, G, K_SPLIT, stride_z,
    BITS: tl.constexpr, GROUP_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, WORD_TILE: tl.constexpr,
):
    # grid (cdiv(M, BM) * cdiv(N, BN), SPLIT_K); x [M, K]; y [M, N] or fp32 partials [SPLIT_K, M, N]
    EPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # GROUP_M row tiles share each weight column tile while it sits in L2
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(K, k_start + K_SPLIT)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < k_end
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wmask = k_mask[:, None] & n_mask[None, :]
        if WORD_TILE:  # load each word once: [BK/EPW, BN] words -> [BK/EPW, EPW, BN] values -> [BK, BN]
            w_idx = k0 // EPW + tl.arange(0, BK // EPW)
            packed = tl.load(qw_ptr + w_idx[:, None] * N + offs_n[None, :],
                             mask=(w_idx * EPW < k_end)[:, None] & n_mask[None, :], other=0)
            q = tl.reshape((packed[:, None, :] >> (tl.arange(0, EPW) * BITS)[None, :, None]) & MASK, [BK, BN])
        else:  # one (repeated) word load per value: the compiler's cache dedups the repeats
            q = unpack(qw_ptr, offs_k[:, None], N, offs_n[None, :], wmask, BITS)  # [BK, BN]
        if GROUP_MODE == 0:
            g = k0 // G
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            z = unpack(qz_ptr + g * stride_z, offs_n, 1, 0, n_mask, BITS)[None, :]
        else:
            if GROUP_MODE == 1:
                g = offs_k // G
            else:
                g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
            z = unpack(qz_ptr, offs_n[None, :], 1, g[:, None] * stride_z, wmask, BITS)
        w = (q - z).to(tl.float32) * s  # [BK, BN], the value torch's dequantize computes
        if DOT_FP32:  # the interpreter's tl.dot mishandles bf16 operands: multiply the same values in fp32
            acc += tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32))
        else:
            acc += tl.dot(a, w.to(a.dtype))
    y_off = offs_m[:, None] * N + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptr + pid_k * M * N + y_off, acc, mask=y_mask)


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, qz_ptr, gidx_ptr, w_ptr, N, K, G, stride_z,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    # grid (cdiv(K, BK), cdiv(N, BN)) -> w [K, N] = (q - zero[g]) * scale[g], computed in fp32
    offs_k = tl.program_id(0) * BK + tl.arange(0, BK)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    k_mask = offs_k < K
    mask = k_mask[:, None] & (offs_n < N)[None, :]
    q = unpack(qw_ptr, offs_k[:, None], N, offs_n[None, :], mask, BITS)
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
    else:
        g = offs_k // G
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    z = unpack(qz_ptr, offs_n[None, :], 1, g[:, None] * stride_z, mask, BITS)
    w = (q - z).to(tl.float32) * s
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_sum_kernel(p_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # y [M*N] = sum over the SPLIT_K fp32 partials [SPLIT_K, M*N], cast once: one launch, deterministic
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLIT_K):
        acc += tl.load(p_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers: tensors in, tensors out. All take the packed buffers as stored plus the true K.


def interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _check(x: torch.Tensor, qweight: torch.Tensor, bits: int, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.shape[0] * 32 // bits < in_features:
        raise ValueError(f"qweight {tuple(qweight.shape)} holds fewer than K={in_features} rows of {bits}-bit values")


def group_mode(g_idx: torch.Tensor | None, group_size: int, block_k: int) -> int:
    """0 when a K tile of `block_k` rows (aligned) lies in one group, else 1 (k // G) or 2 (g_idx)."""
    if g_idx is not None:
        return 2
    return 0 if group_size % block_k == 0 else 1


def _finish(y: torch.Tensor, split_k: int, dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] as is, or fp32 partials [split_k, M, N] summed into [M, N] of `dtype`."""
    if split_k == 1:
        return y
    out = torch.empty(y.shape[1:], device=y.device, dtype=dtype)
    mn = out.numel()
    block = 1024
    _splitk_sum_kernel[(triton.cdiv(mn, block),)](y, out, mn, SPLIT_K=split_k, BLOCK=block)
    return out


def gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
    bits: int, group_size: int, in_features: int, *, block_n: int = 64, block_kw: int = 8, split_k: int = 1,
    num_warps: int = 4,
) -> torch.Tensor:
    """x [M, K] (M small) -> y [M, N] in x.dtype. 2/4/8 bits. Weight rows read once per row of x."""
    _check(x, qweight, bits, in_features)
    if 32 % bits:
        raise ValueError(f"gemv runs 2, 4 or 8 bits, not {bits}: use dequantize() for {bits}-bit")
    m, k = x.shape
    n = qweight.shape[1]
    epw = 32 // bits
    low = group_size & -group_size  # largest power of two dividing G
    if g_idx is None and group_size % (block_kw * epw) and low >= epw:
        block_kw = min(block_kw, low // epw)  # a smaller tile that lies in one group (GROUP_MODE 0)
    kw_total = triton.cdiv(k, epw)
    kw_split = triton.cdiv(triton.cdiv(kw_total, split_k), block_kw) * block_kw  # whole tiles per split
    split_k = triton.cdiv(kw_total, kw_split)
    mode = group_mode(g_idx, group_size, block_kw * epw)
    x = x.contiguous()
    y = torch.empty((m, n) if split_k == 1 else (split_k, m, n), device=x.device,
                    dtype=x.dtype if split_k == 1 else torch.float32)
    grid = (triton.cdiv(n, block_n), split_k, m)
    _gemv_kernel[grid](
        x, qweight, scales, qzeros, g_idx if g_idx is not None else qweight, y,
        m, n, k, group_size, kw_split, qzeros.stride(0),
        BITS=bits, GROUP_MODE=mode, BN=block_n, BKW=block_kw, SPLIT_K=split_k, num_warps=num_warps,
    )
    return _finish(y, split_k, x.dtype)


def gemm(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
    bits: int, group_size: int, in_features: int, *, block_m: int = 64, block_n: int = 64, block_k: int = 64,
    split_k: int = 1, group_m: int = 8, word_tile: bool = False, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x.dtype, tiles on tl.dot (block sizes >= 16). 2/4/8 bits. word_tile:
    unpack a tile of whole words with a reshape instead of one repeated word load per value."""
    _check(x, qweight, bits, in_features)
    if 32 % bits:
        raise ValueError(f"gemm runs 2, 4 or 8 bits, not {bits}: use dequantize() for {bits}-bit")
    m, k = x.shape
    n = qweight.shape[1]
    low = group_size & -group_size
    if g_idx is None and group_size % block_k and low >= 16:
        block_k = min(block_k, low)  # a smaller tile that lies in one group (GROUP_MODE 0)
    k_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_split)
    mode = group_mode(g_idx, group_size, block_k)
    x = x.contiguous()
    y = torch.empty((m, n) if split_k == 1 else (split_k, m, n), device=x.device,
                    dtype=x.dtype if split_k == 1 else torch.float32)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _gemm_kernel[grid](
        x, qweight, scales, qzeros, g_idx if g_idx is not None else qweight, y,
        m, n, k, group_size, k_split, qzeros.stride(0),
        BITS=bits, GROUP_MODE=mode, BM=block_m, BN=block_n, BK=block_k, SPLIT_K=split_k, GROUP_M=group_m,
        DOT_FP32=interpreting() and x.dtype != torch.float16, WORD_TILE=word_tile,
        num_warps=num_warps, num_stages=num_stages,
    )
    return _finish(y, split_k, x.dtype)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
    bits: int, group_size: int, in_features: int, dtype: torch.dtype = torch.float16,
    *, block_k: int = 64, block_n: int = 64,
) -> torch.Tensor:
    """-> W^T [K, N] in `dtype`, the same values as QuantLinear.dequantize_weight_t(dtype). 2/3/4/8 bits."""
    n = qweight.shape[1]
    w = torch.empty(in_features, n, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        qweight, scales, qzeros, g_idx if g_idx is not None else qweight, w, n, in_features, group_size,
        qzeros.stride(0), BITS=bits, HAS_GIDX=g_idx is not None, BK=block_k, BN=block_n,
    )
    return w

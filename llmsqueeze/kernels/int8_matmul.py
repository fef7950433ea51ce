"""Triton kernels for W8A8 (Int8Linear): per-token activation quantization and an int8 GEMM with the
rescale fused into its epilogue, so the int32 product never goes to memory.

    xq, sx = quantize_per_token(x)      x [M, K] float -> xq int8 [M, K], sx float32 [M]   one pass per row
    xq     = quantize_static(x, s)      x [M, K] float, s float32 [1] -> xq int8 [M, K]    (clipped to +-127)
    y      = scaled_mm(xq, wq, sx, sw, bias, dtype)
           y[m, n] = (float(sum_k xq[m, k] wq[n, k]) * sx[m]) * sw[n] (+ bias[n])   in `dtype`

The same values as llmsqueeze.quant.int8 (quantize_per_token, quantize_static, int8_mm + rescale),
bit for bit: absmax / 127 and x / scale are IEEE divisions (tl.math.div_rn; Triton's `/` is an
approximate division on NVIDIA), rounding is to nearest even (torch.round), the int32 accumulator
is exact, and the epilogue does the reference's float32 operations in its order with fp fusion off
(an FMA would round y * sw + bias once instead of twice). A float32 -> bfloat16 store is the only
difference under TRITON_INTERPRET=1: the interpreter truncates where the GPU rounds to nearest.

Weights stay as Int8Linear stores them, wq int8 [N, K]: K-major, which is what the int8 tensor-core
instructions want for B (Hopper's wgmma takes 8-bit operands only K-major), so no transposed copy.
Two GEMM kernels share the epilogue:
  * `_scaled_mm_kernel`      pointer loads, any GPU, any K (a masked last K tile when BK does not divide K);
  * `_scaled_mm_tma_kernel`  TMA descriptors (Hopper and later, K % 16 == 0): the copy engine loads the
                             tiles and zero-fills past M, N and K.
`scaled_mm` picks the tile config per (M bucket, N, K, dtype) by timing the candidates once on the GPU
(`_choose`, as llmsqueeze/kernels/dispatch.py does for the 4-bit kernels); under the interpreter it runs one
small fixed config.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover (older Triton: pointer kernel only)
    TensorDescriptor = None

QMAX = tl.constexpr(127.0)
TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the scale of an all-zero row

# (block_m, block_n, block_k, group_m, num_warps, num_stages, tma). Hopper-class configs for prefill
# (H100/H200: 228 KB shared memory, a stage holds (BM + BN) * BK bytes); a config that does not fit
# or compile on the GPU at hand is skipped by the timing.
LARGE_M_CONFIGS = [
    # TMA (Hopper): 128 x 128 fills one wave of 132 SMs at M = 512, N = 4096; wider tiles for larger M
    (128, 128, 128, 8, 8, 4, True), (128, 128, 128, 8, 4, 5, True), (128, 256, 128, 8, 8, 3, True),
    (128, 256, 128, 8, 8, 4, True), (256, 128, 128, 8, 8, 3, True), (128, 256, 64, 8, 8, 4, True),
    (64, 128, 128, 8, 4, 4, True), (64, 256, 128, 8, 4, 4, True),
    # pointer loads (any GPU; the Ampere-sized ones fit 164 KB of shared memory)
    (128, 128, 128, 8, 4, 4, False), (128, 256, 128, 8, 8, 3, False), (128, 128, 64, 8, 4, 4, False),
    (64, 128, 128, 8, 4, 4, False),
]
SMALL_M_CONFIGS = [  # M <= 64 (decode, short prompts): narrow row tiles, more column tiles
    (64, 128, 128, 8, 4, 4, True), (16, 128, 128, 8, 4, 4, False), (32, 64, 128, 8, 4, 4, False),
    (64, 64, 128, 8, 4, 4, False), (16, 64, 256, 8, 4, 3, False), (32, 128, 128, 8, 4, 4, True),
]
SMALL_M = 64
INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1, False)  # few, small programs: the interpreter's cost is per op

_best: dict[tuple, tuple] = {}  # (M bucket, N, K, dtype, tma_ok) -> the config timed fastest
rejected: list[tuple] = []  # (key, config) whose output differed from the pointer kernel's: never used


# ------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _round_half_even(v):
    """torch.round on float32: nearest integer, ties to even. floor and v - floor(v) are exact, so this
    is exact on every backend (the interpreter has no rint)."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, y_ptr, xs_ptr, ws_ptr, bias_ptr, ROW_SCALE: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """y = (float(acc) * sx[m]) * sw[n] (+ bias[n]) stored in y's dtype: the reference's rescale."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    if ROW_SCALE:
        sx = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    else:
        sx = tl.load(xs_ptr)
    sw = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    y = acc.to(tl.float32) * sx
    y = y * sw
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program: GROUP_M row tiles share each weight column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _quant_kernel(
    x_ptr, xq_ptr, s_ptr, K, stride_xm,
    STATIC: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (M,): one row per program. Dynamic: sx[m] = max(max_k |x[m, k]| / 127, tiny) written to s_ptr;
    # static: the scale is read from s_ptr[0] and codes are clipped to +-127.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * K
    offs = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(s_ptr)
    else:
        if ONE_TILE:  # the whole row in registers: read once
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
        else:  # long rows: absmax pass, then a quantize pass that re-reads the row (from L2)
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                xk = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(xk))
            amax = tl.max(amax, axis=0)
        scale = tl.maximum(tl.math.div_rn(amax, QMAX), TINY)
        tl.store(s_ptr + row, scale)
    if ONE_TILE and not STATIC:
        q = _round_half_even(tl.math.div_rn(x, scale))  # |x| / scale <= 127 (to rounding): no clamp, as in torch
        tl.store(q_row + offs, q.to(tl.int8), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK):
            mask = k0 + offs < K
            xk = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = _round_half_even(tl.math.div_rn(xk, scale))
            if STATIC:
                q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
            tl.store(q_row + k0 + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, y_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
    ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # grid (cdiv(M, BM) * cdiv(N, BN),); a = xq [M, K], b = wq [N, K] read as B [K, N] (k contiguous)
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    # rows/columns past M/N load a valid row instead (wrapped): unmasked loads, results not stored
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # zeros past K add nothing to the integer sum
            k_left = K - k * BK
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, xs_ptr, ws_ptr, bias_ptr, ROW_SCALE, HAS_BIAS)


@triton.jit
def _scaled_mm_tma_kernel(
    a_desc, b_desc, y_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K,
    ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # a_desc over xq [M, K] with block [BM, BK], b_desc over wq [N, K] with block [BN, BK]; out of
    # bounds tiles are zero-filled by the copy engine
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([off_m, k * BK])
        b = b_desc.load([off_n, k * BK])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    offs_m = off_m + tl.arange(0, BM)
    offs_n = off_n + tl.arange(0, BN)
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, xs_ptr, ws_ptr, bias_ptr, ROW_SCALE, HAS_BIAS)


# ------------------------------------------------------------------------------------------------
# launchers


def interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] with unit stride along K (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _quant_launch(x2: torch.Tensor, xq: torch.Tensor, s: torch.Tensor, static: bool, block: int | None) -> None:
    m, k = x2.shape
    if m == 0:
        return
    block = block or min(triton.next_power_of_2(k), 16384)
    one_tile = block >= k
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _quant_kernel[(m,)](x2, xq, s, k, x2.stride(0), STATIC=static, ONE_TILE=one_tile, BLOCK=block, num_warps=warps,
                        enable_fp_fusion=False)


def quantize_per_token(x: torch.Tensor, *, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq [..., K] int8, scale [...] float32): quant.int8.quantize_per_token, bit for bit.
    block: the row chunk (a power of two; default the whole row up to 16384, longer rows take two passes)."""
    x2 = _rows(x)
    xq = torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    s = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    _quant_launch(x2, xq, s, False, block)
    return xq.view(x.shape), s.view(x.shape[:-1])


def quantize_static(x: torch.Tensor, scale: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """x [..., K] float, scale float32 [1] -> xq [..., K] int8: quant.int8.quantize_static, bit for bit."""
    x2 = _rows(x)
    xq = torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    _quant_launch(x2, xq, scale.reshape(1).float().contiguous(), True, block)
    return xq.view(x.shape)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_ok(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these operands: Triton with descriptors, a Hopper-or-later GPU
    (or the interpreter), row strides that are multiples of 16 bytes and 16-byte aligned bases; not
    with LLMSQUEEZE_INT8_TMA=0 (pointer kernel only)."""
    if TensorDescriptor is None or os.environ.get("LLMSQUEEZE_INT8_TMA", "1") == "0":
        return False
    if not interpreting() and not (xq.is_cuda and _capability(xq.device.index)[0] >= 9):
        return False
    return all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 and t.stride(1) == 1 for t in (xq, wq))


def _run(cfg: tuple, xq, wq, x_scale, w_scale, bias, y) -> torch.Tensor:
    """One launch of the GEMM with config `cfg` into y [M, N]."""
    bm, bn, bk, group_m, warps, stages, tma = cfg
    m, k = xq.shape
    n = wq.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    common = dict(ROW_SCALE=x_scale.numel() > 1, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
                  GROUP_M=group_m, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    b_arg = bias if bias is not None else w_scale
    if tma:
        a_desc = TensorDescriptor.from_tensor(xq, [bm, bk])
        b_desc = TensorDescriptor.from_tensor(wq, [bn, bk])
        _scaled_mm_tma_kernel[grid](a_desc, b_desc, y, x_scale, w_scale, b_arg, m, n, k, **common)
    else:
        _scaled_mm_kernel[grid](xq, wq, y, x_scale, w_scale, b_arg, m, n, k, xq.stride(0), wq.stride(0),
                                EVEN_K=k % bk == 0, **common)
    return y


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()  # next power of two


def candidates(m: int, xq: torch.Tensor, wq: torch.Tensor) -> list[tuple]:
    configs = SMALL_M_CONFIGS if m <= SMALL_M else LARGE_M_CONFIGS
    return configs if tma_ok(xq, wq) else [c for c in configs if not c[6]]


def _choose(xq, wq, x_scale, w_scale, bias, y) -> tuple:
    """The config for this call: fixed under the interpreter, else the fastest candidate, timed once
    per (M bucket, N, K, output dtype) and cached; a candidate whose output differs from the pointer
    kernel's is skipped and listed in `rejected`. While a CUDA graph is being captured, or with
    LLMSQUEEZE_AUTOTUNE=0, the first candidate (not cached) where nothing was timed yet."""
    if interpreting():
        return INTERPRET_CONFIG
    m, k = xq.shape
    key = (_bucket(m), wq.shape[0], k, y.dtype, tma_ok(xq, wq))
    cfg = _best.get(key)
    if cfg is not None:
        return cfg
    configs = candidates(m, xq, wq)
    if os.environ.get("LLMSQUEEZE_AUTOTUNE", "1") == "0" or not xq.is_cuda or torch.cuda.is_current_stream_capturing():
        return configs[0]
    from triton.testing import do_bench

    pointer = next(c for c in configs if not c[6])
    try:  # every candidate must give the pointer kernel's output (bit for bit, by design)
        ref = _run(pointer, xq, wq, x_scale, w_scale, bias, torch.empty_like(y))
    except Exception:  # pragma: no cover (it does not fit this GPU either): no reference
        ref = None
    times = []
    for c in configs:
        try:
            if ref is not None and not torch.equal(_run(c, xq, wq, x_scale, w_scale, bias, torch.empty_like(y)), ref):
                rejected.append((key, c))
                continue
            times.append((do_bench(lambda c=c: _run(c, xq, wq, x_scale, w_scale, bias, y), warmup=5, rep=20), c))
        except Exception:  # a config this GPU cannot run (out of shared memory, no TMA): skip it
            continue
    cfg = min(times)[1] if times else pointer
    _best[key] = cfg
    return cfg


def scaled_mm(
    xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16, *, config: tuple | None = None,
) -> torch.Tensor:
    """xq [M, K] int8, wq [N, K] int8, x_scale float32 [M] (per token) or [1] (static), w_scale float32 [N],
    bias [N] or None -> y [M, N] in `dtype` = rescale(int8_mm(xq, wq), x_scale, w_scale, bias, dtype).
    config: (block_m, block_n, block_k, group_m, num_warps, num_stages, tma) instead of the chosen one."""
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq must be [M, K] and wq [N, K] with the same K, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"output dtype must be float16, bfloat16 or float32, got {dtype}")
    m, n = xq.shape[0], wq.shape[0]
    if x_scale.numel() not in (1, m) or w_scale.numel() != n:
        raise ValueError(f"x_scale must have 1 or M={m} values and w_scale N={n}, got {x_scale.numel()} and {w_scale.numel()}")
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    x_scale = x_scale.reshape(-1).float().contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(m, n, device=xq.device, dtype=dtype)
    if m == 0 or n == 0:
        return y
    cfg = config or _choose(xq, wq, x_scale, w_scale, bias, y)
    if cfg[6] and not tma_ok(xq, wq):  # a forced TMA config on operands TMA cannot take
        cfg = (*cfg[:6], False)
    return _run(cfg, xq, wq, x_scale, w_scale, bias, y)


# ------------------------------------------------------------------------------------------------
# custom ops: torch.compile sees one opaque call each, and CUDA graphs capture their launches


@torch.library.custom_op("llmsqueeze::int8_quant_per_token", mutates_args=())
def quant_per_token_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq int8 [..., K], scale float32 [...])."""
    return quantize_per_token(x)


@quant_per_token_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llmsqueeze::int8_quant_static", mutates_args=())
def quant_static_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K], scale [1] -> xq int8 [..., K]."""
    return quantize_static(x, scale)


@quant_static_op.register_fake
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("llmsqueeze::int8_scaled_mm", mutates_args=())
def scaled_mm_op(
    xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """xq [M, K], wq [N, K] -> y [M, N] in `dtype` (see scaled_mm)."""
    return scaled_mm(xq, wq, x_scale, w_scale, bias, dtype)


@scaled_mm_op.register_fake
def _(xq, wq, x_scale, w_scale, bias, dtype):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=dtype)

"""W8A8 integer math: int8 activations (per token, dynamic; or one calibrated scale per tensor,
static), int8 weights (per output channel, symmetric), an int8 x int8 -> int32 GEMM and the float
rescale. Pure functions on tensors (the `W8A8Scheme` that says what a checkpoint holds is in config.py).

    x ≈ xq * sx      xq int8 in [-127, 127]   sx [M] (dynamic: max|x_m| / 127) or [1] (static)
    W ≈ wq * sw      wq int8 [N, K]           sw [N]  (max|W_n| / 127; GPTQ may also use -128)
    y = x @ W^T ≈ (xq @ wq^T) * (sx[:, None] * sw[None, :])      the integer product accumulates in int32

The int32 accumulation is exact while K * 128 * 127 < 2**31 (K < 132,000), so every backend that
gives the integer product gives the same integers; only the final float rescale rounds.
"""
from __future__ import annotations

import torch

from ..kernels import cpu as cpu_kernels

QMAX = 127  # activations and weights use the symmetric range [-127, 127]
STATIC_CLIP_GRID = tuple(1 - 0.05 * i for i in range(14))  # fractions of max|x| tried by the search: 1.0 .. 0.35


def _tiny(dtype=torch.float32) -> float:
    return torch.finfo(dtype).tiny


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq [..., K] int8, scale [...] float32): one scale per row (token).

    Memory-bound, so written for few passes: max|x| as an inf-norm (no |x| temporary), one division,
    rounding in place; |x| / scale <= 127 (to float rounding), so no clamp. A true division, not a
    multiply by 1/scale: the two differ on rounding ties, and W8A8 without smoothing on SmolLM2-135M
    is sensitive enough that those few flips move perplexity by ~1% (see eval/w8a8.py).

    max|x| / 127 is a true division on every device too: CUDA divides a tensor by a Python number as
    a multiply by its reciprocal (a last-bit difference on some rows), so the divisor is a 0-dim
    tensor. The scales are then the same bits on CPU, on CUDA and from the Triton kernel
    (llmsqueeze.kernels.int8_matmul)."""
    xf = x.float()
    amax = torch.linalg.vector_norm(xf, float("inf"), dim=-1)
    scale = amax.div_(amax.new_full((), QMAX)).clamp_(min=_tiny())  # all-zero row: any
    xq = (xf / scale.unsqueeze(-1)).round_().to(torch.int8)
    return xq, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, scale [1] (calibrated max|x| / 127) -> xq [M, K] int8; larger values clip."""
    return (x.float() / scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)


def static_output_error(x: torch.Tensor, w: torch.Tensor, scale: float) -> float:
    """x [T, K] sample inputs, w [N, K] -> ||(Q(x) - x) W^T||^2 with x quantized on the static `scale`
    (values past 127 * scale clip): the layer-output error that scale costs."""
    xq = quantize_static(x, torch.tensor([scale])).float() * scale
    return float(((xq - x.float()) @ w.float().t()).pow(2).sum())


def static_clip_errors(x: torch.Tensor, w: torch.Tensor, absmax: float,
                       grid=STATIC_CLIP_GRID) -> dict[float, float]:
    """x [T, K] sample inputs of a layer, w [N, K] its weight, absmax the calibrated max|x| over all
    inputs -> {r: layer-output error of the static scale r * absmax / 127} for each r of the grid.
    Clipping the few outlier tokens buys a finer grid for all the others; the least error wins, and
    with r = 1 in the grid it is never worse than max|x| on the samples."""
    return {r: static_output_error(x, w, max(r * absmax, 1e-8) / QMAX) for r in grid}


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq [N, K] int8, scale [N] float32): round to nearest on a symmetric grid per row."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / QMAX).clamp(min=_tiny())
    wq = torch.round(wf / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return wq, scale


def _int_mm_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether torch._int_mm takes these shapes: anything on the CPU (torch 2.13); cuBLASLt on CUDA
    wants M > 16 and K, N multiples of 8."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


# float32 sums of int8 x int8 products are exact while |sum| <= 2^24: K <= 1024 products of at most 128*128
EXACT_F32_K = 1024
F32_TILE_ELEMENTS = 1 << 22  # int8 weights widened to float32 at most this many at a time (16 MiB)


def int8_mm_float32(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [M, K] int8, wq [N, K] int8 -> xq @ wq^T [M, N] int32, exact, through float32 GEMMs: K in
    chunks of EXACT_F32_K (each chunk's float32 sum is an exact integer whatever the summation order),
    the chunks added in int32; the weights widened in tiles of rows, never as a whole float32 copy.
    For CPUs without int8 dot products (kernels.cpu: no VNNI/AMX), where torch._int_mm is ~22x
    slower than a float32 GEMM."""
    m, k = xq.shape
    n = wq.shape[0]
    xf = xq.float()
    rows = max(1, min(n, F32_TILE_ELEMENTS // k))
    out = torch.empty(m, n, dtype=torch.int32, device=xq.device)
    for n0 in range(0, n, rows):
        wf = wq[n0:n0 + rows].float()  # [rows, K]
        acc = None
        for k0 in range(0, k, EXACT_F32_K):
            part = (xf[:, k0:k0 + EXACT_F32_K] @ wf[:, k0:k0 + EXACT_F32_K].t()).to(torch.int32)
            acc = part if acc is None else acc.add_(part)
        out[:, n0:n0 + rows] = acc
    return out


def int8_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [M, K] int8, wq [N, K] int8 -> xq @ wq^T [M, N] int32, exact.

    torch._int_mm where it runs (CUDA shapes padded to its constraints: zero rows/columns add
    nothing) and, on a CPU, where int8 dot products are native; on other CPUs exact float32 GEMMs
    (int8_mm_float32); elsewhere an int32 matmul of the widened operands (slow, exact)."""
    m, k = xq.shape
    n = wq.shape[0]
    dev = xq.device
    if dev.type == "cpu" and not torch.compiler.is_compiling() and not cpu_kernels.cpu().native_int8:
        return int8_mm_float32(xq, wq)
    if dev.type == "cuda" and not _int_mm_ok(m, k, n, dev):
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        xq = torch.nn.functional.pad(xq, (0, kp - k, 0, mp - m))
        wq = torch.nn.functional.pad(wq, (0, kp - k, 0, np_ - n))
        return torch._int_mm(xq, wq.t())[:m, :n]
    if _int_mm_ok(m, k, n, dev):
        return torch._int_mm(xq, wq.t())
    return xq.to(torch.int32) @ wq.to(torch.int32).t()  # pragma: no cover (other devices)


def rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] int32, x_scale [M] or [1], w_scale [N] -> acc * x_scale * w_scale (+ bias), in `dtype`.

    Two passes over [M, N]: the int32 -> float32 multiply by the per-row scale allocates the output,
    the per-column scale (and bias) are applied in place."""
    y = torch.mul(acc, x_scale.view(-1, 1) if x_scale.numel() > 1 else x_scale)
    y.mul_(w_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(dtype)


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] float -> y [..., N] in x's dtype: activations quantized per token (or with the
    static `input_scale` [1]), integer GEMM against wq [N, K], float rescale."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        xq, xs = quantize_per_token(x2)
    else:
        xq, xs = quantize_static(x2, input_scale), input_scale.float()
    y = rescale(int8_mm(xq, wq), xs, w_scale.float(), bias, x.dtype)
    return y.reshape(*shape, wq.shape[0])

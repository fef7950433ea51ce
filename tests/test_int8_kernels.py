"""The W8A8 Triton kernels (llmsqueeze/kernels/int8_matmul.py) against quant.int8, on CPU tensors under
TRITON_INTERPRET=1 (conftest).

Exactness. The quantization kernel must give quantize_per_token's / quantize_static's bits. The GEMM's
int32 accumulator is exact (|acc| <= K * 128 * 127 < 2**31 here), and its epilogue does the
reference's float32 operations in the same order, so the float32 and float16 outputs must equal
((float(xq @ wq^T) * sx) * sw + bias).to(dtype), computed here from an int64 product. Only bfloat16
differs, and only in the final conversion: the interpreter truncates float32 -> bfloat16 where the GPU
(and torch) round to nearest, so bfloat16 outputs are compared with the truncated reference.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # the only acceptable skip: no Triton at all

import llmsqueeze.nn_int8 as nn_int8  # noqa: E402
from llmsqueeze import Int8Linear, kernels  # noqa: E402
from llmsqueeze.kernels import int8_matmul as im  # noqa: E402
from llmsqueeze.quant.int8 import int8_mm, quantize_per_token, quantize_static, rescale  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (M, N, K): M = 1, odd M/N/K that no block divides, K % 16 == 0 (TMA) and not, several K tiles
SHAPES = [(1, 23, 37), (5, 33, 100), (33, 48, 64), (17, 97, 160), (40, 16, 300)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def as_stored(y32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the interpreter stores for a float32 value in `dtype` (bf16: truncation; others: rounding)."""
    if dtype != torch.bfloat16:
        return y32.to(dtype)
    return (y32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


def reference(xq, wq, sx, sw, bias, dtype):
    """The exact integer product (int64) rescaled in float32 as quant.int8.rescale does, stored as the kernel stores."""
    acc = xq.to(torch.int64) @ wq.to(torch.int64).t()
    assert acc.abs().max() < 2**31
    y = acc.to(torch.int32).to(torch.float32) * (sx.view(-1, 1) if sx.numel() > 1 else sx)
    y = y * sw
    if bias is not None:
        y = y + bias.float()
    assert torch.equal(y, rescale(int8_mm(xq, wq), sx, sw, bias, torch.float32))  # the reference is quant.int8's
    return as_stored(y, dtype)


def operands(m, n, k, seed=0, static=False):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]  # rows of very different ranges
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sw = torch.rand(n, generator=g) / 50 + 1e-4
    if static:
        sx = torch.tensor([float(x.abs().max()) / 127 / 2])  # half the range: some values clip
        return quantize_static(x, sx), wq, sx, sw
    xq, sx = quantize_per_token(x)
    return xq, wq, sx, sw


def test_runs_under_the_interpreter():
    assert im.interpreting()
    assert type(im._scaled_mm_kernel).__name__ == "InterpretedFunction"


# -- activation quantization ----------------------------------------------------------------------


def tie_rows() -> torch.Tensor:
    """Rows whose max is 127, so the scale is 1 and x / scale lands on exact .5 ties (round to even),
    plus an all-zero row (scale = tiny, codes 0) and one of subnormal-scale values."""
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49, -0.0, 0.0])
    return torch.stack([ties, -ties, torch.zeros(12), torch.full((12,), 1e-37) * torch.arange(12)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", [(1, 1), (1, 37), (5, 100), (9, 4096)])
def test_quantize_per_token_bit_exact(dtype, m, k):
    x = (torch.randn(m, k, generator=_gen(k)) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    xq, s = im.quantize_per_token(x)
    rq, rs = quantize_per_token(x)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(xq, rq) and torch.equal(s, rs)


def test_quantize_per_token_ties_zero_rows_long_rows_and_views():
    x = tie_rows()
    for block in (None, 4):  # the whole row in one tile; two passes over 4-wide chunks (long rows)
        xq, s = im.quantize_per_token(x, block=block)
        rq, rs = quantize_per_token(x)
        assert torch.equal(xq, rq) and torch.equal(s, rs)
    assert xq[0, 1:4].tolist() == [0, 2, 2] and not xq[2].any()
    big = torch.randn(3, 2, 300, generator=_gen(1))[:, 1]  # a strided view, rows of 300 in chunks of 128
    xq, s = im.quantize_per_token(big, block=128)
    assert torch.equal(xq, quantize_per_token(big)[0]) and torch.equal(s, quantize_per_token(big)[1])
    x3 = torch.randn(2, 3, 40, generator=_gen(2), dtype=torch.bfloat16)  # [..., K] keeps its leading shape
    xq, s = im.quantize_per_token(x3)
    rq, rs = quantize_per_token(x3)
    assert xq.shape == (2, 3, 40) and s.shape == (2, 3) and torch.equal(xq, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_static_bit_exact(dtype):
    x = (torch.randn(7, 300, generator=_gen(3)) * 4).to(dtype)
    for scale in (torch.tensor([0.01]), torch.tensor([1.0]), torch.tensor([float(x.abs().max()) / 127])):
        for block in (None, 64):
            xq = im.quantize_static(x, scale, block=block)
            assert torch.equal(xq, quantize_static(x, scale))
    assert im.quantize_static(x, torch.tensor([0.01])).abs().max() == 127  # clipped
    t = tie_rows()[:2]
    assert torch.equal(im.quantize_static(t, torch.tensor([1.0])), quantize_static(t, torch.tensor([1.0])))


# -- fused GEMM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_exact(m, n, k, dtype, bias):
    xq, wq, sx, sw = operands(m, n, k, seed=m + n)
    b = torch.randn(n, generator=_gen(5)).to(dtype) if bias else None
    y = im.scaled_mm(xq, wq, sx, sw, b, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y, reference(xq, wq, sx, sw, b, dtype))


@pytest.mark.parametrize("m, n, k", SHAPES[1:4])
@pytest.mark.parametrize("tma", [False, True])
def test_scaled_mm_static_scale_and_tile_configs(m, n, k, tma):
    """One scale for all rows (static activations, an fp32 bias), through both kernels and tiles that
    do (BK = 16) and do not divide K; the TMA kernel where K % 16 == 0 (else the pointer kernel)."""
    xq, wq, sx, sw = operands(m, n, k, seed=1, static=True)
    b = torch.randn(n, generator=_gen(6))
    for cfg in [(16, 32, 16, 2, 4, 1, tma), (32, 16, 64, 1, 4, 1, tma)]:
        y = im.scaled_mm(xq, wq, sx, sw, b, torch.float16, config=cfg)
        assert torch.equal(y, reference(xq, wq, sx, sw, b, torch.float16))


@pytest.mark.parametrize("cfg", im.LARGE_M_CONFIGS + im.SMALL_M_CONFIGS)
def test_every_gpu_config(cfg):
    """The configs the GPU timing may pick (blocks larger than the matrix, K not a multiple of BK):
    M = 65 with two row tiles of 64, N = 97, K = 160 (TMA-able)."""
    xq, wq, sx, sw = operands(65, 97, 160, seed=2)
    y = im.scaled_mm(xq, wq, sx, sw, None, torch.float32, config=cfg)
    assert torch.equal(y, reference(xq, wq, sx, sw, None, torch.float32))


def test_scaled_mm_extremes_and_errors():
    """Every code at +-127/-128 over K = 4096: |acc| near 2**26, exact, and int32 -> float32 rounding matches."""
    k = 4096
    xq = torch.full((3, k), 127, dtype=torch.int8)
    xq[1] = -128
    wq = torch.full((5, k), -128, dtype=torch.int8)
    wq[2] = 127
    sx, sw = torch.tensor([1.0, 0.5, 3.0]), torch.ones(5)
    assert torch.equal(im.scaled_mm(xq, wq, sx, sw, None, torch.float32), reference(xq, wq, sx, sw, None, torch.float32))
    with pytest.raises(ValueError, match="same K"):
        im.scaled_mm(xq, wq[:, :10], sx, sw)
    with pytest.raises(ValueError, match="int8"):
        im.scaled_mm(xq.float(), wq, sx, sw)
    with pytest.raises(ValueError, match="x_scale"):
        im.scaled_mm(xq, wq, sx[:2], sw)
    assert im.scaled_mm(xq[:0], wq, sx[:0], sw).shape == (0, 5)


# -- Int8Linear on the Triton backend ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias, static", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("m", [1, 7])
def test_int8_linear_triton_equals_torch(monkeypatch, dtype, bias, static, m):
    g = _gen(m)
    w = torch.randn(40, 72, generator=g) / 8
    x = torch.randn(2, m, 72, generator=g).to(dtype)
    layer = Int8Linear.from_float(w, torch.randn(40, generator=g) if bias else None,
                                  input_scale=float(x.abs().max()) / 127 if static else None).to(dtype)
    monkeypatch.setattr(nn_int8, "BACKEND", "torch")
    assert not nn_int8.use_triton(x)
    y_torch = layer(x)
    monkeypatch.setattr(nn_int8, "BACKEND", "triton")
    assert nn_int8.use_triton(x)
    nn_int8.forget_quantized_input()  # quantize again, now with the kernel
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, m, 40)
    if dtype == torch.bfloat16:  # the same float32 values, stored by truncation under the interpreter
        x2 = x.reshape(-1, 72)
        xq, xs = (quantize_static(x2, layer.input_scale), layer.input_scale) if static else quantize_per_token(x2)
        y32 = rescale(int8_mm(xq, layer.weight), xs, layer.weight_scale, layer.bias, torch.float32)
        y_torch = as_stored(y32, dtype).reshape(2, m, 40)
    assert torch.equal(y, y_torch)


def test_backend_choice_and_shared_input(monkeypatch):
    x = torch.randn(3, 16)
    monkeypatch.setattr(nn_int8, "BACKEND", "auto")
    assert not nn_int8.use_triton(x)  # auto on the CPU: torch._int_mm, as before
    monkeypatch.setattr(nn_int8, "BACKEND", "triton")
    assert not nn_int8.use_triton(x.double()) and not nn_int8.use_triton(x[:0])  # no kernel for these: torch
    calls = []
    real = kernels.int8_quantize_per_token
    monkeypatch.setattr(kernels, "int8_quantize_per_token", lambda t: calls.append(1) or real(t))
    a, b = Int8Linear.from_float(torch.randn(8, 16)), Int8Linear.from_float(torch.randn(12, 16))
    nn_int8.forget_quantized_input()
    ya, yb = a(x), b(x)  # q/k/v-style: one quantization for both layers
    assert len(calls) == 1
    monkeypatch.setattr(nn_int8, "BACKEND", "torch")
    assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))


def test_traces_whole_under_torch_compile(monkeypatch):
    """The kernels are opaque custom ops: a W8A8 linear of them compiles into one graph (CUDA graphs
    need that). aot_eager traces like inductor does, without compiling C++ on the CPU."""
    xq, wq, sx, sw = operands(5, 24, 64)
    bias = torch.randn(24)

    def w8a8(x):
        q, s = kernels.int8_quantize_per_token(x)
        return kernels.int8_scaled_mm(q, wq, s, sw, bias, x.dtype)

    x = torch.randn(5, 64, dtype=torch.float16)
    torch._dynamo.reset()
    y = torch.compile(w8a8, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, w8a8(x))


# -- the GPU compile: what the interpreter cannot see ----------------------------------------------

AOT = r'''
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor
from llmsqueeze.kernels import int8_matmul as im

def ptx(fn, args, constexprs, **opts):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = mangle_type(args[name])
        if isinstance(args[name], torch.Tensor) or (isinstance(args[name], int) and args[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

m, n, k = 512, 4096, 4112  # K % 128 != 0: the masked K loop (K % 16 == 0: TMA can take it)
xq, wq = torch.empty(m, k, dtype=torch.int8), torch.empty(n, k, dtype=torch.int8)
y, xs, ws, x = torch.empty(m, n, dtype=torch.float16), torch.empty(m), torch.empty(n), torch.empty(m, k, dtype=torch.bfloat16)
out = {}
for cfg in json.loads(sys.argv[1]):
    bm, bn, bk, gm, warps, stages, tma = cfg
    c = dict(ROW_SCALE=True, HAS_BIAS=True, BM=bm, BN=bn, BK=bk, GROUP_M=gm)
    opts = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    if tma:
        a = dict(a_desc=TensorDescriptor.from_tensor(xq, [bm, bk]), b_desc=TensorDescriptor.from_tensor(wq, [bn, bk]),
                 y_ptr=y, xs_ptr=xs, ws_ptr=ws, bias_ptr=ws, M=m, N=n, K=k)
        p = ptx(im._scaled_mm_tma_kernel, a, c, **opts)
    else:
        a = dict(a_ptr=xq, b_ptr=wq, y_ptr=y, xs_ptr=xs, ws_ptr=ws, bias_ptr=ws, M=m, N=n, K=k, stride_am=k, stride_bn=k)
        p = ptx(im._scaled_mm_kernel, a, dict(c, EVEN_K=False), **opts)
    out[str(cfg)] = {"wgmma": "wgmma" in p, "fma": "fma.rn.f32" in p}
for static, one in ((False, True), (False, False), (True, True)):
    p = ptx(im._quant_kernel, dict(x_ptr=x, xq_ptr=xq, s_ptr=xs, K=k, stride_xm=k),
            dict(STATIC=static, ONE_TILE=one, BLOCK=8192 if one else 1024), num_warps=8)
    out[f"quant {static} {one}"] = {"div_rn": "div.rn.f32" in p, "div_approx": "div.full" in p or "div.approx" in p}
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper():
    """The interpreter runs the kernels as Python, so it cannot catch what only the compiler rejects
    (a non-constexpr global, a layout tl.dot cannot take): compile for sm_90 on this CPU (Triton
    bundles ptxas) in a process without TRITON_INTERPRET, and check the PTX for what exactness
    relies on: int8 wgmma tiles, no FMA in the GEMM epilogue, IEEE divisions in the quantization."""
    import json
    import os
    import subprocess
    import sys

    cfgs = [im.LARGE_M_CONFIGS[0], next(c for c in im.LARGE_M_CONFIGS if not c[6]), im.SMALL_M_CONFIGS[1]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT, json.dumps(cfgs)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for cfg in cfgs:
        assert out[str(list(cfg))] == {"wgmma": cfg[0] >= 64, "fma": False}, (cfg, out)
    for key in ("quant False True", "quant False False", "quant True True"):
        assert out[key] == {"div_rn": True, "div_approx": False}, (key, out)

"""The Triton kernels against torch references, on CPU tensors under TRITON_INTERPRET=1 (conftest).

Tolerance. The reference is y = x @ W^T in float64-accurate float32 (x is exact in its dtype, W =
(q - zero) * scale is exact in float32). Per output, with u the unit roundoff of the activation
dtype and B = |x| @ |W^T| (elementwise):
  * the tile kernels round each dequantized weight to the activation dtype for tl.dot: <= u * B;
  * the result is rounded once to the activation dtype: <= u * |y| <= u * B;
  * float32 products and sums add at most K * 2**-24 * B.
So |y - ref| <= (2u + K * 2**-24) * B is a bound, not a fudge factor. The GEMV kernel never rounds
the weight (it computes s * (sum x q - z * sum x) in float32 per tile) and is held to the same bound;
its float32 cancellation error is far below u * B at these K. The interpreter
converts float32 to bfloat16 by truncation, not round-to-nearest: u is doubled for bfloat16 here.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")  # the only acceptable skip: no Triton at all

from llmsqueeze import QuantScheme, nn_kernels  # noqa: E402
from llmsqueeze import nn as qnn  # noqa: E402
from llmsqueeze.kernels import dispatch  # noqa: E402
from llmsqueeze.kernels import quant_matmul as qm  # noqa: E402
from llmsqueeze.nn import QuantLinear  # noqa: E402
from llmsqueeze.quant import grid  # noqa: E402
from llmsqueeze.quant.rtn import rtn_quantize  # noqa: E402

UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}  # bf16: 2**-8, doubled for the interpreter's truncation
SHAPES = [(64, 576, 128), (33, 96, 32), (48, 100, -1), (64, 256, 64)]  # (N, K, G): short last group, odd N, per-channel
# 4 bits on every shape; 2 and 8 bits (other words-per-value) on the two that exercise both group modes
CASES = [(4, *s) for s in SHAPES] + [(b, *s) for b in (8, 2) for s in (SHAPES[0], SHAPES[2])]


def make_layer(n, k, group, bits=4, bias=False, seed=0, g_idx=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    if g_idx is None:
        scheme = QuantScheme(bits=bits, group_size=group)
        q, s, z = rtn_quantize(w, scheme)
        return QuantLinear.from_quantized(q, s, z, bits, scheme.group_size_for(k), bias=b)
    ng = int(g_idx.max()) + 1
    mn = torch.stack([w[:, g_idx == i].amin(1) for i in range(ng)], 1)
    mx = torch.stack([w[:, g_idx == i].amax(1) for i in range(ng)], 1)
    s, z = grid.minmax_qparams(mn, mx, bits, False)
    q = grid.quantize(w, s, z, bits, group, g_idx)
    return QuantLinear.from_quantized(q, s, z, bits, group, bias=b, g_idx=g_idx)


def check(y, x, layer, bias=True):
    """Assert the bound of the module docstring for y ~ x @ W^T (+ the layer's bias unless bias=False)."""
    w = layer.dequantize_weight_t(torch.float32)  # [K, N]
    ref = x.float() @ w
    bound = x.float().abs() @ w.abs()
    if bias and layer.bias is not None:
        ref, bound = ref + layer.bias.float(), bound + layer.bias.float().abs()
    tol = (2 * UNIT[x.dtype] + x.shape[1] * 2.0**-24) * bound
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert (err <= tol).all(), f"max err/bound {(err / bound.clamp_min(1e-30)).max():.3g} > {tol.max() / bound.max():.3g}"


def args(layer):
    return layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.bits, layer.group_size, layer.in_features


def test_runs_under_the_interpreter():
    assert qm.interpreting()
    assert type(qm._gemv_kernel).__name__ == "InterpretedFunction"


# -- dequantize -------------------------------------------------------------------------------


def truncated(w32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the interpreter's float32 -> dtype conversion gives (bf16: truncation; fp16: rounding)."""
    if dtype == torch.float16:
        return w32.to(dtype)
    return (w32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n, k, group", SHAPES[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_bit_exact(bits, n, k, group, dtype):
    layer = make_layer(n, k, group, bits)
    w = qm.dequantize(*args(layer), dtype)
    assert torch.equal(w, truncated(layer.dequantize_weight_t(torch.float32), dtype))  # == the torch path's values


def test_dequantize_g_idx_3bit():
    g_idx = (torch.argsort(torch.randperm(100, generator=torch.Generator().manual_seed(1))) // 32).to(torch.int32)
    layer = make_layer(40, 100, 32, bits=3, g_idx=g_idx)
    w = qm.dequantize(*args(layer), torch.float16)
    assert torch.equal(w, layer.dequantize_weight_t(torch.float16))


# -- GEMV (decode) -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, n, k, group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv(bits, n, k, group, dtype):
    layer = make_layer(n, k, group, bits, seed=bits)
    x = torch.randn(3, k).to(dtype)
    check(qm.gemv(x[:1], *args(layer)), x[:1], layer)  # M = 1
    check(qm.gemv(x, *args(layer), split_k=3, block_n=32, block_kw=4), x, layer)  # M = 3, split-K


# -- GEMM (tl.dot tiles; split-K for small M) ---------------------------------------------------------


@pytest.mark.parametrize("bits, n, k, group", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm(bits, n, k, group, dtype):
    layer = make_layer(n, k, group, bits, seed=bits + 10)
    x = torch.randn(33, k).to(dtype)
    check(qm.gemm(x, *args(layer), block_m=32, block_n=64, block_k=64), x, layer)  # M = 33: two row tiles
    check(qm.gemm(x, *args(layer), block_m=32, block_n=64, block_k=64, word_tile=True), x, layer)
    check(qm.gemm(x[:16], *args(layer), block_m=16, block_n=32, block_k=32, split_k=2, word_tile=True), x[:16], layer)


@pytest.mark.parametrize("kind, cfg", [("gemv", c) for c in dispatch.GEMV_CONFIGS]
                         + [("splitk", c) for c in dispatch.SPLITK_CONFIGS] + [("gemm", c) for c in dispatch.GEMM_CONFIGS])
def test_every_gpu_autotune_config(kind, cfg):
    """The configs the GPU autotuner may pick (block sizes larger than these shapes, split-K that
    leaves empty splits) give correct results too: K = 576 with G = 128, odd N."""
    layer = make_layer(97, 576, 128, seed=3)
    m = {"gemv": 3, "splitk": 9, "gemm": 33}[kind]
    x = torch.randn(m, 576, dtype=torch.float16)
    check(dispatch._run(kind, cfg, x, (layer.qweight, layer.scales, layer.qzeros), None, 4, 128, 576), x, layer)


# -- activation order -----------------------------------------------------------------------------------


def g_idx_of(kind: str, k: int, group: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "trivial":  # what a checkpoint with act-order off or static groups could hold
        return (torch.arange(k) // group).to(torch.int32)
    if kind == "permuted":  # GPTQ dynamic act-order: group = rank in the order // G, not monotonic
        return (torch.argsort(torch.randperm(k, generator=gen)) // group).to(torch.int32)
    # groups of unequal sizes (k = 160): no permutation makes them natural-order groups
    g = torch.repeat_interleave(torch.arange(5), torch.tensor([40, 24, 32, 48, 16]))
    return g[torch.randperm(k, generator=gen)].to(torch.int32)


@pytest.mark.parametrize("kind, plan", [("trivial", (False, False)), ("permuted", (True, False)), ("general", (False, True))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_act_order(kind, plan, dtype):
    k, group = 160, 32  # 5 groups
    layer = make_layer(48, k, group, g_idx=g_idx_of(kind, k, group), bias=True)
    w = nn_kernels.kernel_weights(layer)
    assert (w.perm is not None, w.g_idx is not None) == plan
    x = torch.randn(33, k).to(dtype)
    for m in (1, 3, 16, 33):  # gemv, gemv, split-K, gemm
        check(nn_kernels.quant_linear(x[:m], layer), x[:m], layer)
    # the kernels' own per-row g_idx gather (GROUP_MODE 2) on the unpermuted layout
    check(qm.gemv(x[:2], *args(layer)), x[:2], layer, bias=False)
    check(qm.gemm(x[:16], *args(layer), block_m=16, block_n=32, block_k=32), x[:16], layer, bias=False)
    check(qm.gemm(x[:16], *args(layer), block_m=16, block_n=32, block_k=32, word_tile=True), x[:16], layer, bias=False)


# -- dispatch and QuantLinear -------------------------------------------------------------------------


def test_dispatch_by_m():
    assert [dispatch.kernel_for(m, 4) for m in (1, 3, 4, 5, 16, 17, 2048)] == ["gemv"] * 3 + ["splitk"] * 2 + ["gemm"] * 2
    assert dispatch.kernel_for(1, 3) == "dequant"


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_quant_linear_through_custom_op(bits, m):
    layer = make_layer(33, 96, 64, bits=bits, bias=True)
    x = torch.randn(m, 96, dtype=torch.float16)
    check(nn_kernels.quant_linear(x, layer), x, layer)


def test_quant_linear_declines_float32():
    layer = make_layer(32, 64, 32)
    assert nn_kernels.quant_linear(torch.randn(2, 64), layer) is None


def test_cache_is_not_saved_and_is_dropped_on_load(monkeypatch):
    monkeypatch.setattr(qnn, "BACKEND", "triton")
    layer = make_layer(32, 64, 32, bias=True)
    keys = set(layer.state_dict())
    x = torch.randn(2, 64, dtype=torch.float16)
    layer(x)
    assert layer._kernel_cache is not None and set(layer.state_dict()) == keys
    other = make_layer(32, 64, 32, bias=True, seed=5)
    layer.load_state_dict(other.state_dict())
    assert layer._kernel_cache is None
    assert torch.equal(layer(x), other(x))
    layer.to(torch.float16)
    assert layer._kernel_cache is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiny_model_logits_triton_vs_torch(monkeypatch, dtype):
    """QuantLinear.forward's GPU branch (BACKEND "triton") on a tiny Llama: hidden 96 with group 64
    (short last group), prefill (M = 12) and a decode step (M = 1). The float32 torch path is the
    truth; the kernels must be as close to it as the torch dequantize+matmul path in the same dtype."""
    from conftest import tiny_llama

    import llmsqueeze

    model = tiny_llama()
    llmsqueeze.quantize(model, QuantScheme(bits=4, group_size=64), progress=False)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(qnn, "BACKEND", "dequant")
    truth = model(ids).logits
    model.to(dtype)
    torch_path = model(ids).logits.float()
    monkeypatch.setattr(qnn, "BACKEND", "triton")
    triton_path = model(ids).logits.float()
    assert all(m._kernel_cache is not None for m in model.modules() if isinstance(m, QuantLinear))
    err_torch = (torch_path - truth).norm() / truth.norm()
    err_triton = (triton_path - truth).norm() / truth.norm()
    assert err_triton < 2 * err_torch + 4 * UNIT[dtype], (err_triton, err_torch)


def test_traces_whole_under_torch_compile(monkeypatch):
    """The GPU path must not break a torch.compile graph (CUDA graphs need one): the kernels are
    one opaque custom op. aot_eager traces like inductor does, without compiling C++ on the CPU."""
    monkeypatch.setattr(qnn, "BACKEND", "triton")
    g_idx = g_idx_of("permuted", 96, 32)  # the permuted path: a gather before the op
    layer = make_layer(33, 96, 32, bias=True, g_idx=g_idx)
    qnn.prepare_model(torch.nn.Sequential(layer))
    x = torch.randn(2, 96, dtype=torch.float16)
    torch._dynamo.reset()
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, layer(x))


@pytest.mark.parametrize("bits", [3, 8])
def test_act_order_permuted_other_bits(bits):
    """The load-time row permutation repacks 3-bit streams too (they then run dequantize + matmul)."""
    layer = make_layer(40, 96, 32, bits=bits, g_idx=g_idx_of("permuted", 96, 32))
    assert nn_kernels.kernel_weights(layer).perm is not None
    x = torch.randn(17, 96, dtype=torch.float16)
    for m in (1, 17):
        check(nn_kernels.quant_linear(x[:m], layer), x[:m], layer)

import pytest
import torch
from torch import nn

from llmsqueeze import QuantScheme
from llmsqueeze.nn import QuantLinear
from llmsqueeze.quant import grid
from llmsqueeze.quant.rtn import rtn_quantize


def make(n=64, k=96, bits=4, group=32, bias=True, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    scheme = QuantScheme(bits=bits, group_size=group, sym=sym)
    q, s, z = rtn_quantize(w, scheme)
    layer = QuantLinear.from_quantized(q, s, z, bits, scheme.group_size_for(k), bias=b)
    return layer, grid.dequantize(q, s, z, scheme.group_size_for(k)), b


def float32_bound(layer, x2):
    """|error| bound of a float32 x2 @ W^T [M, N] against the exact product, for both forms the CPU runs:
    sum_k x (q - z) s (dequantize + BLAS), and sum_g s (sum_k x q - z sum_k x) (the C kernels, which
    factor the zero point out of each group). Each is a sum of at most K + 2 rounded terms, so its
    error is at most (K + 2) u times the sum of the terms' magnitudes (u = 2^-24), and every term is
    bounded by |x| (q + z) s; 4x that covers the final bias add and the scale product's rounding."""
    q, s, z = layer.unpack()  # [N, K], [N, ng], [N, ng]
    g = torch.arange(layer.in_features) // layer.group_size
    mag = (q.double() + z.double()[:, g]) * s.double()[:, g]  # [N, K]
    return 4 * (layer.in_features + 2) * 2.0**-24 * (x2.abs().double() @ mag.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 40, -1])
@pytest.mark.parametrize("rows", [1, 15, 40])  # the CPU GEMV (M <= 16) and the prefill path
def test_float32_forward(bits, group, rows):
    layer, w, b = make(bits=bits, group=group)
    x = torch.randn(rows, 96)
    y = layer(x.view(rows, 1, 96))
    assert y.shape == (rows, 1, 64)
    ref = x.double() @ w.double().t() + b.double()
    err = (y.view(rows, 64).double() - ref).abs()
    assert (err <= float32_bound(layer, x) + 1e-7).all(), err.max()


def test_holds_only_packed_weights():
    layer, _, _ = make()
    assert list(dict(layer.named_parameters())) == []
    assert set(layer.state_dict()) == {"qweight", "scales", "qzeros", "bias"}
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (96 * 4 // 32, 64)
    assert layer.qzeros.shape == (3, 64 * 4 // 32)
    assert layer.scales.shape == (3, 64) and layer.scales.dtype == torch.float16


@pytest.mark.parametrize(
    "n, k, group",
    [(64, 96, 32), (64, 100, 32), (48, 576, 128), (32, 128, 64), (64, 96, -1), (32, 200, 96), (32, 200, 40)],
)
def test_int4_cpu_kernel_matches_dequant_path(n, k, group, monkeypatch):
    # torch's int4 kernel runs where the float32 C kernels do not (another CPU architecture, no compiler)
    monkeypatch.setattr("llmsqueeze.nn.cpu_kernels.available", lambda: False)
    layer, w, b = make(n=n, k=k, group=group)
    if group == 40:  # not a multiple of 32: the kernel cannot express it, the torch path runs
        assert layer._int4_cpu_group() is None
    else:
        assert layer._int4_cpu_group() is not None
    x = torch.randn(2, k).to(torch.bfloat16)
    y = layer(x)
    assert layer._int4_cache is not None or group == 40
    ref = (x.float() @ w.t() + b).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=5e-2 * ref.abs().max().item() / 10)


def test_int4_kernel_skipped_when_out_features_not_multiple_of_16():
    layer, w, b = make(n=40, k=64, group=32)
    assert layer._int4_cpu_group() is None
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), x.float() @ w.t() + b, rtol=2e-2, atol=5e-2)


def test_long_inputs_use_dequant_path_in_bf16():
    layer, w, b = make()
    x = torch.randn(100, 96, dtype=torch.bfloat16)  # more rows than INT4_CPU_MAX_M
    y = layer(x)
    assert layer._int4_cache is None
    torch.testing.assert_close(y.float(), x.float() @ w.t() + b, rtol=3e-2, atol=1e-1)


def test_act_order_g_idx():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    perm = torch.randperm(64, generator=g)
    g_idx = (torch.argsort(perm) // 16).to(torch.int32)  # group of each column, permuted
    mn = torch.stack([w[:, g_idx == i].amin(1) for i in range(4)], 1)
    mx = torch.stack([w[:, g_idx == i].amax(1) for i in range(4)], 1)
    s, z = grid.minmax_qparams(mn, mx, 4, False)
    q = grid.quantize(w, s, z, 4, 16, g_idx)
    layer = QuantLinear.from_quantized(q, s, z, 4, 16, g_idx=g_idx)
    assert layer._int4_cpu_group() is None  # act-order runs on the torch path
    deq = grid.dequantize(q, s, z, 16, g_idx)
    assert torch.equal(layer.dequantize_weight(), deq)
    assert (deq - w).abs().max() < s.max()


def test_dtype_casts_keep_scale_storage_dtype():
    layer, _, _ = make()
    before = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, before)
    assert layer.bias.dtype == torch.bfloat16


def test_state_dict_round_trip_into_empty_layer():
    layer, _, _ = make(bits=3, k=100, group=32)
    empty = QuantLinear(100, 64, 3, 32, bias=True)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(4, 100)
    assert torch.equal(empty(x), layer(x))


def test_matches_linear_within_quantization_error():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    scheme = QuantScheme(bits=8, group_size=64)
    q, s, z = rtn_quantize(lin.weight.detach(), scheme)
    layer = QuantLinear.from_quantized(q, s, z, 8, 64, bias=lin.bias)
    x = torch.randn(8, 256)
    ref = lin(x)
    err = (layer(x) - ref).norm() / ref.norm()
    assert err < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reuse_dequantized_same_outputs_and_drops_copies(dtype):
    from llmsqueeze.nn import reuse_dequantized

    q = make(n=64, k=96, bits=4, group=32)[0]
    block = nn.Sequential(q)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    plain = q(x)  # few rows on the CPU: a decode kernel (C GEMV or torch's int4); inside: the dense weight
    path = q.cpu_path(x.view(-1, 96))
    with reuse_dequantized(block):
        assert q.cpu_path(x.view(-1, 96)) == "dense"
        first, second = q(x), q(x + 0)
        assert q._dense_cache is not None and q._dense_cache[0] == dtype
    assert torch.equal(first, second)
    if path == "dense":
        assert torch.equal(first, plain)
    elif dtype == torch.float32:  # the same product summed in another order
        assert ((first - plain).abs().view(15, 64) <= 2 * float32_bound(q, x.view(15, 96))).all()
    else:  # the kernel computes in float32 and rounds once; the dense path rounds in the matmul
        assert ((first.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-2
    assert q._dense_cache is None  # nothing outlives the context
    assert torch.equal(q(x), plain)

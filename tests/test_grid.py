import pytest
import torch

from llmsqueeze import QuantScheme
from llmsqueeze.quant import grid
from llmsqueeze.quant.rtn import rtn_qparams, rtn_quantize


def _w(n=24, k=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)


def test_group_minmax_short_last_group():
    w = _w(k=100)
    mn, mx = grid.group_minmax(w, 32)  # groups of 32, 32, 32, 4
    assert mn.shape == (24, 4)
    assert torch.equal(mn[:, 3], w[:, 96:].amin(1))
    assert torch.equal(mx[:, 3], w[:, 96:].amax(1))
    assert torch.equal(mx[:, 0], w[:, :32].amax(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_quantize_in_range_and_error_bounded(bits, sym):
    w = _w()
    mn, mx = grid.group_minmax(w, 32)
    scale, zero = grid.minmax_qparams(mn, mx, bits, sym, torch.float32)
    q = grid.quantize(w, scale, zero, bits, 32)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    deq = grid.dequantize(q, scale, zero, 32)
    # min/max grids reach every weight (both signs of absmax for symmetric ones; the rounded
    # asymmetric zero leaves each end within half a step), so the error is at most half a step
    step = grid.expand_groups(scale, 100, 32)
    bound = step * 0.5 + 1e-6
    assert torch.all((deq - w).abs() <= bound)


def test_asym_zero_is_exact_and_sym_zero_is_midgrid():
    w = _w()
    mn, mx = grid.group_minmax(w, 32)
    s, z = grid.minmax_qparams(mn, mx, 4, False)
    zero_w = torch.zeros(24, 100)
    assert torch.equal(grid.fake_quantize(zero_w, s, z, 4, 32), zero_w)  # 0 is a grid point
    _, zs = grid.minmax_qparams(mn, mx, 4, True)
    assert torch.all(zs == 8)


def test_scale_holds_storage_dtype_values():
    w = _w()
    mn, mx = grid.group_minmax(w, 32)
    for dt in (torch.float16, torch.bfloat16):
        s, _ = grid.minmax_qparams(mn, mx, 4, False, dt)
        assert torch.equal(s, s.to(dt).float())


def test_all_zero_group_is_safe():
    w = torch.zeros(4, 64)
    w[:, 32:] = torch.randn(4, 32)
    q, s, z = rtn_quantize(w, QuantScheme(bits=4, group_size=32))
    deq = grid.dequantize(q, s, z, 32)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[:, :32], w[:, :32])


def test_fake_quant_equals_dequantized_packed_weight():
    from llmsqueeze.nn import QuantLinear

    w = _w(n=48, k=100)
    scheme = QuantScheme(bits=3, group_size=32)
    q, s, z = rtn_quantize(w, scheme)
    layer = QuantLinear.from_quantized(q, s, z, 3, 32, scale_dtype=torch.float16)
    assert torch.equal(layer.dequantize_weight(), grid.fake_quantize(w, s, z, 3, 32))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("power", [0.0, 1.0])
def test_clip_search_never_worse_and_better_overall(bits, sym, power):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    w[::7, ::13] *= 6  # outliers make shrinking the range pay off
    plain = QuantScheme(bits=bits, group_size=64, sym=sym)
    clip = QuantScheme(bits=bits, group_size=64, sym=sym, clip_search=True, clip_weight_power=power)
    q0, s0, z0 = rtn_quantize(w, plain)
    q1, s1, z1 = rtn_quantize(w, clip)
    weight = w.abs() ** power

    def objective(q, s, z):  # the searched objective, per group [64, 4]
        return (weight * (grid.dequantize(q, s, z, 64) - w) ** 2).view(64, 4, 64).sum(2)

    e0, e1 = objective(q0, s0, z0), objective(q1, s1, z1)
    assert torch.all(e1 <= e0 * (1 + 1e-6) + 1e-6)  # per group, never worse than min/max
    assert e1.sum() < 0.97 * e0.sum()  # and clearly better in total
    if power > 0:  # magnitude weighting clips the largest weights less than plain MSE does
        _, s_mse, _ = rtn_quantize(w, QuantScheme(bits=bits, group_size=64, sym=sym, clip_search=True, clip_weight_power=0.0))
        assert s1.mean() > s_mse.mean()


def test_clip_search_ignores_padding_of_short_group():
    w = _w(k=100)
    s, z = grid.clip_search_qparams(w, 4, 64, False, torch.float32)
    s_ref, z_ref = grid.clip_search_qparams(w[:, 64:], 4, 64, False, torch.float32)
    assert torch.equal(s[:, 1], s_ref[:, 0]) and torch.equal(z[:, 1], z_ref[:, 0])


def test_per_channel_scheme():
    w = _w(k=100)
    s, z = rtn_qparams(w, QuantScheme(bits=8, group_size=-1))
    assert s.shape == (24, 1)

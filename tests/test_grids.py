"""Non-uniform grids (NF levels, k-means codebooks): the math, LUTLinear packing, checkpoints, the
Triton lookup kernel under TRITON_INTERPRET=1 (conftest), export refusal and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError, QuantScheme
from llmsqueeze.cli import main
from llmsqueeze.methods import resolve_scheme
from llmsqueeze.nn import LUTLinear
from llmsqueeze.quant import grid, lut
from llmsqueeze.quant.gptq import gptq_quantize
from llmsqueeze.quant.rtn import rtn_quantize

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4, 6, 8]])
# The NF4 table as printed (4 decimals) in the QLoRA paper's code: ours is built from its definition
NF4_PRINTED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
               0.3379, 0.4407, 0.5626, 0.7230, 1.0]


# ============================================================================ levels and codebooks
def test_nf_levels_exact():
    lv = lut.nf_levels(4)
    assert lv.dtype == torch.float32 and lv.shape == (16,)
    assert lv[0] == -1 and lv[-1] == 1 and lv[7] == 0  # exact extremes and an exact zero
    assert (lv[1:] > lv[:-1]).all()
    assert (lv > 0).sum() == 8 and (lv < 0).sum() == 7  # the zero costs the negative side one level
    assert torch.allclose(lv, torch.tensor(NF4_PRINTED), atol=6e-5)  # the printed table's rounding
    # each side: N(0, 1) quantiles at evenly spaced probabilities, divided by the outermost one
    p = 1 - (1 / 30 + 1 / 32) / 2
    pos = torch.special.ndtri(0.5 + (p - 0.5) * torch.arange(1, 9, dtype=torch.float64) / 8)
    assert torch.equal(lv[8:], (pos / pos[-1]).float())
    for bits in (2, 3):
        lv = lut.nf_levels(bits)
        assert lv.shape == (2**bits,) and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
        assert (lv[1:] > lv[:-1]).all()


def _sq_err(w, wq, weight=None):
    e = (w - wq) ** 2
    return (e if weight is None else e * weight).sum()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_error_at_most_uniform(bits):
    torch.manual_seed(0)
    w = torch.randn(24, 100) * torch.rand(24, 1)  # group 32: a shorter last group of 4
    w[3] = 0.0  # an all-zero row
    g = 32
    scheme = QuantScheme(bits=bits, group_size=g)
    q, s, z = rtn_quantize(w, scheme)
    uni = (grid.dequantize(q, s, z, g) - w) ** 2
    table = lut.kmeans_table(w, bits, g)
    assert table.shape == (24, 4, 2**bits) and (table[..., 1:] >= table[..., :-1]).all()
    assert torch.equal(table, table.half().float())  # holds fp16 values
    km = (lut.lut_dequantize(lut.lut_quantize(w, table, g), table, g) - w) ** 2
    # the outermost levels are pinned at the group's range (incl. 0), so per group k-means is not always
    # below RTN's zero-point-shifted grid; in total it is clearly below
    assert km.sum() < 0.9 * uni.sum()
    assert km[3].sum() == 0


def test_kmeans_weighted_fit_lowers_weighted_error():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    cw = torch.rand(64) ** 4 * 10  # a few heavy columns, as Hessian diagonals are
    plain, weighted = lut.kmeans_table(w, 3, 64), lut.kmeans_table(w, 3, 64, col_weight=cw)
    err = lambda t: _sq_err(w, lut.lut_dequantize(lut.lut_quantize(w, t, 64), t, 64), cw)  # noqa: E731
    assert err(weighted) < err(plain)


def test_nf_table_and_assignment():
    torch.manual_seed(2)
    w = torch.randn(8, 70)
    table, scale = lut.nf_table(w, 4, 32)
    assert torch.equal(scale, torch.cat([w[:, :32].abs().amax(1, keepdim=True), w[:, 32:64].abs().amax(1, keepdim=True),
                                         w[:, 64:].abs().amax(1, keepdim=True)], 1).half().float())
    q = lut.lut_quantize(w, table, 32)
    wq = lut.lut_dequantize(q, table, 32)
    # nearest level: no other level of the group is closer
    full = table[:, torch.arange(70) // 32]  # [N, K, L]
    assert ((w - wq).abs() <= (w.unsqueeze(2) - full).abs().amin(2) + 1e-7).all()


# ============================================================================ module, packing
@pytest.mark.parametrize("grid_name", ["nf", "kmeans"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_round_trip_and_dequant_exact(grid_name, bits):
    torch.manual_seed(3)
    w = torch.randn(40, 100)  # K not a multiple of 32 (packing pads) nor of the group
    scheme = QuantScheme(bits=bits, group_size=32, grid=grid_name)
    q, table, scale = lut.rtn_lut_quantize(w, scheme)
    layer = LUTLinear.from_quantized(q, table, scale, bits, 32, grid_name)
    assert torch.equal(layer.unpack(), q)
    assert torch.equal(layer.table(), table)
    assert torch.equal(layer.dequantize_weight(), lut.lut_dequantize(q, table, 32))  # bit for bit
    x = torch.randn(3, 100)
    assert torch.allclose(layer(x), x @ lut.lut_dequantize(q, table, 32).t(), atol=1e-5)
    assert set(dict(layer.named_buffers())) == {"qweight", "scales" if grid_name == "nf" else "codebook"}


# ============================================================================ checkpoints
def _saved(tmp_path, name="q", **scheme):
    model = tiny_llama()
    llmsqueeze.quantize(model, progress=False, **{"bits": 4, "group_size": 64, **scheme})
    with torch.no_grad():
        ref = model(IDS).logits
    return model, ref, llmsqueeze.save_quantized(model, tmp_path / name, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("scheme", [dict(grid="nf"), dict(grid="kmeans", bits=3), dict(grid="kmeans", group_size=-1),
                                    dict(grid="nf", bits=2, scale_dtype="bfloat16")])
def test_save_load_same_logits(scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    _, ref, out = _saved(tmp_path, **scheme)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert QuantScheme.from_dict(qc["scheme"]) == resolve_scheme(QuantScheme(**{"bits": 4, "group_size": 64, **scheme}), "rtn")
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        layer = loaded.model.layers[0].mlp.down_proj
        assert isinstance(layer, LUTLinear) and layer.grid == scheme["grid"]
        assert (layer.scales if scheme["grid"] == "nf" else layer.codebook).dtype == getattr(
            torch, scheme.get("scale_dtype", "float16"))
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, ref)


def test_uniform_scheme_json_unchanged():
    d = QuantScheme().to_dict()
    assert "grid" not in d  # uniform checkpoints are written as before
    assert QuantScheme.from_dict(d).grid == "uniform"
    s = QuantScheme(bits=3, grid="kmeans")
    assert QuantScheme.from_json(s.to_json()) == s


def test_info_shows_grid(tmp_path, capsys):
    _, _, out = _saved(tmp_path, grid="kmeans", group_size=-1)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "grid kmeans" in text and "codebooks included" in text
    from llmsqueeze.info import checkpoint_info

    info = checkpoint_info(out)
    # 4-bit indices + a 16 x fp16 codebook per row: 4 + 256 / K bits per weight (K = 96 or 160)
    assert 4 + 256 / 160 < info["bits_per_quantized_weight"] < 4 + 256 / 96 + 0.01


def test_check_checkpoint_refuses_bad_codebook_shape(tmp_path):
    _, _, out = _saved(tmp_path, grid="kmeans")
    f = out / "model.safetensors"
    t = load_file(f)
    key = "model.layers.0.mlp.up_proj.codebook"
    t[key] = t[key][..., :8].contiguous()  # 8 levels for 4-bit indices
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="codebook .* expected"):
        llmsqueeze.from_pretrained(out)
    del t[key]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks codebook"):
        llmsqueeze.from_pretrained(out)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_refuses_non_uniform(fmt, tmp_path, capsys):
    _, _, out = _saved(tmp_path, grid="nf")
    with pytest.raises(LlmsqueezeError, match="grid='nf'"):
        llmsqueeze.export(out, fmt, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert main(["export", str(out), "--format", fmt, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "grid=" in err


def test_cli_quantize_grid_lazy_and_in_memory(tiny_model_dir, tmp_path, capsys):
    for extra in ([], ["--no-lazy"]):
        out = tmp_path / f"q{len(extra)}"
        assert main(["quantize", str(tiny_model_dir), "--bits", "3", "--group-size", "32", "--grid", "kmeans",
                     "--out", str(out), *extra]) == 0
        m = llmsqueeze.from_pretrained(out)
        assert isinstance(m.model.layers[1].self_attn.o_proj, LUTLinear)
    assert main(["info", str(out)]) == 0
    assert "grid kmeans" in capsys.readouterr().out


# ============================================================================ GPTQ
@pytest.mark.parametrize("grid_name", ["nf", "kmeans"])
def test_gptq_beats_rtn_on_the_same_grid(grid_name):
    torch.manual_seed(4)
    w = torch.randn(48, 128)
    x = torch.randn(1024, 128) * torch.linspace(0.1, 3, 128)
    h = 2 * x.t() @ x / 1024
    scheme = resolve_scheme(QuantScheme(bits=3, group_size=32, grid=grid_name), "gptq")
    assert scheme.clip_search is False
    res = gptq_quantize(w, h, scheme, act_order=True, static_groups=True)
    assert res.g_idx is None and res.table.shape == (48, 4, 8)
    q_rtn, table, _ = lut.rtn_lut_quantize(w, scheme)
    out_err = lambda d: float(((d - w) @ h @ (d - w).t()).trace())  # noqa: E731
    assert out_err(lut.lut_dequantize(res.q, res.table, 32)) < out_err(lut.lut_dequantize(q_rtn, table, 32))
    with pytest.raises(LlmsqueezeError, match="static"):
        gptq_quantize(w, h, scheme, act_order=True, static_groups=False)


def test_gptq_kmeans_model_round_trip(tmp_path):
    model = tiny_llama()
    data = torch.randint(3, 64, (4, 32))
    llmsqueeze.quantize(model, bits=4, group_size=32, grid="kmeans", method="gptq", data=data, progress=False)
    assert isinstance(model.model.layers[0].mlp.gate_proj, LUTLinear)
    with torch.no_grad():
        ref = model(IDS).logits
    out = llmsqueeze.save_quantized(model, tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(out)(IDS).logits, ref)


# ============================================================================ bad input
@pytest.mark.parametrize("kwargs, msg", [
    (dict(grid="lloyd"), "grid='lloyd' is not known"),
    (dict(grid="nf", bits=8), "non-uniform grids take 2, 3, 4 bits"),
    (dict(grid="kmeans", sym=True), "sym=True applies to the uniform grid"),
    (dict(grid="nf", clip_search=True), "clip_search applies to the uniform grid"),
])
def test_bad_scheme(kwargs, msg):
    with pytest.raises(LlmsqueezeError, match=msg):
        QuantScheme(**kwargs)


def test_cli_bad_grid_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_model_dir), "--grid", "nf", "--bits", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grid='nf'" in err
    assert not (tmp_path / "o").exists()


def test_gptq_dynamic_act_order_refused_up_front(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--grid", "kmeans", "--act-order", "dynamic",
                 "--calib", str(text_file), "--out", str(tmp_path / "o")]) == 2
    assert "--act-order static" in capsys.readouterr().err


def test_prune_refuses_non_uniform_grid():
    with pytest.raises(LlmsqueezeError, match="grid='kmeans'"):
        llmsqueeze.prune(tiny_llama(), "magnitude", sparsity=0.5, scheme=QuantScheme(grid="kmeans"), progress=False)


# ============================================================================ Triton lookup kernel
triton = pytest.importorskip("triton")
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}  # bf16 doubled: the interpreter truncates


@pytest.mark.parametrize("grid_name, bits, n, k, g, m, dtype", [
    ("nf", 4, 48, 96, 32, 3, torch.float16),
    ("nf", 4, 40, 100, -1, 17, torch.bfloat16),  # per-channel, K not a multiple of the tile
    ("kmeans", 4, 33, 96, 64, 1, torch.float16),  # shorter last group, odd N
    ("kmeans", 3, 48, 100, 32, 5, torch.bfloat16),  # 3-bit indices straddle words
    ("kmeans", 2, 64, 64, 32, 2, torch.float16),
])
def test_lookup_kernel_matches_reference(grid_name, bits, n, k, g, m, dtype):
    """Bound as in test_kernels: the weight rounded once to the activation dtype and the result
    rounded once (2u), plus float32 summation (K * 2**-24), all times |x| @ |W^T|."""
    from llmsqueeze import nn_kernels

    torch.manual_seed(5)
    w, bias = torch.randn(n, k), torch.randn(n)
    scheme = QuantScheme(bits=bits, group_size=g, grid=grid_name)
    q, table, scale = lut.rtn_lut_quantize(w, scheme)
    layer = LUTLinear.from_quantized(q, table, scale, bits, scheme.group_size_for(k), grid_name, bias=bias)
    x = torch.randn(m, k).to(dtype)
    y = nn_kernels.lut_linear(x, layer)
    wt = layer.dequantize_weight_t()
    ref = x.float() @ wt + bias
    bound = x.float().abs() @ wt.abs() + bias.abs()
    assert y.dtype == dtype and y.shape == (m, n)
    assert ((y.float() - ref).abs() <= (2 * UNIT[dtype] + k * 2.0**-24) * bound).all()
    assert nn_kernels.lut_linear(x.float(), layer) is None  # float32: the torch path


def test_lookup_kernel_through_forward(monkeypatch):
    from llmsqueeze import nn as qnn

    torch.manual_seed(6)
    w = torch.randn(32, 64)
    scheme = QuantScheme(bits=4, group_size=32, grid="nf")
    q, table, scale = lut.rtn_lut_quantize(w, scheme)
    layer = LUTLinear.from_quantized(q, table, scale, 4, 32, "nf")
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    monkeypatch.setattr(qnn, "BACKEND", "triton")
    y = layer(x)
    monkeypatch.setattr(qnn, "BACKEND", "dequant")
    assert y.shape == (2, 3, 32) and torch.allclose(y.float(), layer(x).float(), atol=2e-2, rtol=2e-3)

"""Floating-point formats: quant/fp.py against encoders/decoders written from the OCP specs, then
FloatScheme through quantization (RTN, GPTQ), checkpoints, both loaders, the CLI and the
compressed-tensors export that transformers loads."""
from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
from conftest import FAMILIES, tiny_llama, tiny_model
from transformers import AutoModelForCausalLM

import llmsqueeze
from llmsqueeze import CheckpointError, FloatLinear, FloatScheme, LlmsqueezeError
from llmsqueeze.config import scheme_from_dict
from llmsqueeze.models import quantizable_modules
from llmsqueeze.quant import fp
from llmsqueeze.quant.gptq import gptq_quantize


# ------------------------------------------------------------------ reference codecs, from the specs
def ref_e4m3_decode(code: int) -> float:
    """OCP FP8 v1.0, E4M3: s eeee mmm, bias 7, e=0 subnormal, S.1111.111 NaN, no infinities."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    v = 2.0 ** -6 * (m / 8) if e == 0 else 2.0 ** (e - 7) * (1 + m / 8)
    return -v if s else v


def ref_e2m1_decode(code: int) -> float:
    """OCP MX v1.0, E2M1: s ee m, bias 1, e=0 subnormal (0.5 * m), no NaN/Inf."""
    s, e, m = code >> 3, (code >> 1) & 0x3, code & 0x1
    v = 0.5 * m if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -v if s else v


def ref_encode(x: float, decode, n_codes: int, max_finite: float) -> int:
    """Round to nearest, ties to the even code, saturating; the sign of x kept on zero."""
    if math.isnan(x):
        return 0x7F  # E4M3 only
    sign = 1 if math.copysign(1.0, x) < 0 else 0
    a = min(abs(x), max_finite)
    half = n_codes // 2
    best = None
    for c in range(half):  # the positive codes
        v = decode(c)
        if math.isnan(v):
            continue
        d = abs(v - a)
        if best is None or d < best[0] or (d == best[0] and c % 2 == 0):
            best = (d, c)
    return best[1] | (sign * half)


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def test_every_e4m3_code_round_trips():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = codes.view(fp.FP8).float()  # what the layers decode with
    for c in range(256):
        ref = ref_e4m3_decode(c)
        if math.isnan(ref):
            assert math.isnan(float(ours[c]))
            assert math.isnan(float(fp.e4m3_round(torch.tensor([ref]))[0]))
            continue
        assert float(ours[c]) == ref, c
        back = int(fp.e4m3_encode(torch.tensor([ref])).view(torch.uint8)[0])
        assert back == c, (c, back)
    assert float(fp.e4m3_round(torch.tensor([1e9]))[0]) == 448.0  # saturating
    assert float(fp.e4m3_round(torch.tensor([-math.inf]))[0]) == -448.0


def test_e4m3_rounding_matches_the_reference_encoder():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=g) * s for s in (1e-3, 0.05, 1.0, 30.0, 300.0)])
    # exact midpoints between neighbouring levels (ties), and values past the largest finite one
    vals, _ = fp.e4m3_levels()
    mids = ((vals[1:] + vals[:-1]) / 2)
    x = torch.cat([x, mids, torch.tensor([449.0, 463.9, 464.0, 500.0, -1000.0, 2.0**-10, -(2.0**-10), 3 * 2.0**-11])])
    got = fp.e4m3_encode(x).view(torch.uint8)
    for xi, ci in zip(x.tolist(), got.tolist()):
        assert ci == ref_encode(f32(xi), ref_e4m3_decode, 256, 448.0), xi


def test_every_e2m1_code_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    ours = fp.e2m1_decode(codes)
    for c in range(16):
        assert float(ours[c]) == ref_e2m1_decode(c), c
        assert int(fp.e2m1_encode(torch.tensor([ref_e2m1_decode(c)]))[0]) == c
    assert sorted(set(abs(v) for v in ours.tolist())) == list(fp.E2M1_VALUES)


def test_e2m1_rounding_matches_the_reference_encoder():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=g) * 3, torch.tensor(
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 6.0, 7.0, 100.0, -100.0, 0.0, -0.0, 0.1, -0.1])])
    got = fp.e2m1_encode(x)
    for xi, ci in zip(x.tolist(), got.tolist()):
        assert ci == ref_encode(f32(xi), ref_e2m1_decode, 16, 6.0), xi


def test_e8m0():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = fp.e8m0_decode(codes)
    for c in range(255):
        assert float(vals[c]) == 2.0 ** (c - 127)
    assert math.isnan(float(vals[255]))
    a = torch.tensor([1.0, 1.5, 5.99, 6.0, 7.9, 8.0, 0.001, 3e-39])
    assert fp.floor_log2(a).tolist() == [math.floor(math.log2(v)) for v in a.tolist()]
    # the OCP MX rule: the group max lands in [4, 8) times the scale
    e = fp.mx_exponent(a[:-1])
    assert all(4 <= v / 2.0 ** int(x) < 8 for v, x in zip(a.tolist(), e.tolist()))
    assert int(fp.e8m0_encode_exponent(fp.mx_exponent(a[-1:]))[0]) == 0  # below 2**-127: the smallest scale


def test_fp4_packing_order():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = fp.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0xF3]]  # element 2j in the low nibble
    assert torch.equal(fp.unpack_fp4(packed), codes)


@pytest.mark.parametrize("name", list(fp.FORMATS))
def test_weight_round_trip_and_error(name):
    fmt = fp.FORMATS[name]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 320, generator=g) * 0.05
    t = fp.quantize_weight(w, fmt)
    deq = fp.dequantize_weight(t, fmt, 200, 320)
    # every weight is its nearest grid value (the nearest level of its group's table)
    step = fp.scale_grid(t, fmt, 200, 320)
    vals, _ = fmt.levels
    table = vals.view(1, 1, -1) * step.unsqueeze(2)  # [N, ng, L]
    cols = fp.group_cols(fmt, 320)
    best = (w.view(200, -1, 1) - table.repeat_interleave(cols, dim=1)[:, :320]).abs().amin(dim=2)
    assert torch.allclose((w - deq).abs(), best, atol=1e-7, rtol=1e-6)
    rel = ((w - deq).norm() / w.norm()).item()
    assert rel < (0.04 if fmt.element == "e4m3" else 0.13), rel


def test_nvfp4_scales_follow_the_global_scale_convention():
    fmt = fp.FORMATS["nvfp4"]
    w = torch.randn(32, 64)
    t = fp.quantize_weight(w, fmt)
    assert t["weight_scale"].dtype == fp.FP8 and t["weight_scale"].shape == (32, 4)
    assert torch.allclose(t["weight_global_scale"], 448 * 6 / w.abs().max())
    assert t["weight_packed"].dtype == torch.uint8 and t["weight_packed"].shape == (32, 32)
    # the largest weight of the tensor is represented at the largest E4M3 scale
    assert float(t["weight_scale"].float().max()) == 448.0


def test_fp8_block_ragged_blocks():
    fmt = fp.FORMATS["fp8-block"]
    w = torch.randn(200, 576)
    t = fp.quantize_weight(w, fmt)
    assert t["weight_scale"].shape == (2, 5)
    assert t["weight"].dtype == fp.FP8
    step = fp.expand_scales(t["weight_scale"], 200, 576, 128, 128)
    # half a unit in the last place: 2**-4 relative for normals, 2**-10 of the step for subnormals
    assert ((fp.dequantize_weight(t, fmt, 200, 576) - w).abs() <= w.abs() * 2**-4 + step * 2**-10 + 1e-7).all()


def test_activation_fake_quant():
    x = torch.randn(5, 64) * 3
    y = fp.fake_quant_fp8_rows(x)
    assert ((y - x).abs() <= x.abs() * 2**-4 + 1e-6).all()
    y2 = fp.fake_quant_fp8_groups(x, 16)
    assert (y2 - x).abs().max() <= (y - x).abs().max() + 1e-6
    gs = fp.static_input_scale(fp.FORMATS["nvfp4"], float(x.abs().max()))
    y3 = fp.fake_quant_nvfp4(x, gs)
    assert ((y3 - x).norm() / x.norm()) < 0.15


# ------------------------------------------------------------------ schemes, layers, models, checkpoints


def _ids(n=4, t=32, seed=0):
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_scheme_validation_and_round_trip():
    s = FloatScheme(format="nvfp4", smooth_alpha=0.5)
    assert scheme_from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.needs_data and s.calibrated_input and not FloatScheme(format="fp8", smooth_alpha=None).needs_data
    assert FloatScheme(format="fp8").smooth_alpha == "auto" and FloatScheme(format="mxfp4").smooth_alpha is None
    for bad, text in [(dict(format="fp6"), "format='fp6' is not known"),
                      (dict(format="nvfp4", act="static"), "act=static (one calibrated scale per layer) applies to format fp8"),
                      (dict(format="mxfp4", smooth_alpha=0.5), "format mxfp4 keeps them in 16 bits"),
                      (dict(scale_max_shrink=1.0), "scale_max_shrink=1.0")]:
        with pytest.raises(LlmsqueezeError, match=re.escape(text)):
            FloatScheme(**bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_fp8_and_nvfp4(family):
    """Every quantizable Linear (GPT-2's Conv1D too) becomes a FloatLinear, and the logits stay close."""
    ids = _ids()
    for fmt, tol in (("fp8", 0.12), ("nvfp4-a16", 0.3)):  # int8 W8A8: 0.009-0.023 here, fp8 ~4x (3 mantissa bits)
        model = tiny_model(family)
        scheme = FloatScheme(format=fmt, smooth_alpha=None)  # data-free
        names = quantizable_modules(model, scheme)
        with torch.no_grad():
            ref = model(ids).logits
        llmsqueeze.quantize(model, scheme, progress=False)
        assert all(isinstance(model.get_submodule(n), FloatLinear) for n in names)
        with torch.no_grad():
            out = model(ids).logits
        assert ((out - ref).norm() / ref.norm()) < tol, (family, fmt)


def test_a_format_that_cannot_hold_a_layer_is_one_line():
    model = tiny_model("llama")  # hidden 80: not a multiple of mxfp4's group of 32
    with pytest.raises(LlmsqueezeError, match=r"^mxfp4 cannot hold model\.layers\.0\.self_attn\.q_proj: in_features=80"):
        llmsqueeze.quantize(model, FloatScheme(format="mxfp4"), progress=False)
    assert not any(isinstance(m, FloatLinear) for m in model.modules())  # nothing was changed
    with pytest.raises(LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(model, FloatScheme(format="nvfp4"), progress=False)  # its activation global scale


@pytest.mark.parametrize("fmt, act, method", [
    ("fp8", "dynamic", "gptq"), ("fp8", "static", "rtn"), ("fp8-block", "dynamic", "gptq"),
    ("fp8-weight", "dynamic", "rtn"), ("nvfp4", "dynamic", "gptq"), ("nvfp4-a16", "dynamic", "rtn"),
    ("mxfp4", "dynamic", "gptq")])
def test_checkpoint_round_trip_both_loaders(fmt, act, method, tmp_path):
    model = tiny_llama()
    scheme = FloatScheme(format=fmt, act=act)
    llmsqueeze.quantize(model, scheme, data=_ids(), method=method, progress=False)
    x = _ids(1, 48, seed=5)
    with torch.no_grad():
        ref = model(x).logits
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scheme"]["format"] == fmt and qc["method"] == method
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        layer = loaded.model.layers[1].mlp.down_proj
        assert isinstance(layer, FloatLinear) and layer.format == fmt
        assert (layer.input_scale is not None) == (act == "static")
        assert (layer.input_global_scale is not None) == (fmt == "nvfp4")
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)
    from llmsqueeze.info import checkpoint_info, format_info

    info = checkpoint_info(out)
    assert info["quantized_layers"] == 14  # every Linear of the two blocks: 100 % of them
    bits = {"fp8": 8.0, "fp8-block": 8.0, "fp8-weight": 8.0, "nvfp4": 4.5, "nvfp4-a16": 4.5, "mxfp4": 4.25}[fmt]
    assert bits <= info["bits_per_quantized_weight"] < bits + 0.4
    assert f"scheme      {fmt}:" in format_info(info)


def test_corrupt_float_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = llmsqueeze.quantize(tiny_llama(), FloatScheme(format="fp8-weight"), progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    f = out / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].float()
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layer model.layers.0.mlp.up_proj stores weight as F32, fp8-weight stores F8_E4M3"):
        llmsqueeze.from_pretrained(out)


def test_to_dtype_keeps_codes_and_scales():
    model = llmsqueeze.quantize(tiny_llama(), FloatScheme(format="nvfp4-a16"), progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in layer.weight_tensors.items()}
    model.to(torch.bfloat16)
    for k, v in layer.weight_tensors.items():
        assert v.dtype == before[k].dtype and torch.equal(v.view(torch.uint8) if v.dtype == fp.FP8 else v,
                                                          before[k].view(torch.uint8) if v.dtype == fp.FP8 else before[k])
    with torch.no_grad():
        assert model(_ids(1, 8)).logits.dtype == torch.bfloat16


def test_nvfp4_fused_layers_share_one_global_scale():
    """q/k/v (and gate/up) get the global scale of their joint max|w|, as vLLM's fused GEMM needs."""
    model = llmsqueeze.quantize(tiny_llama(), FloatScheme(format="nvfp4", smooth_alpha=None), data=_ids(), method="gptq",
                                progress=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert torch.equal(attn.q_proj.weight_global_scale, attn.k_proj.weight_global_scale)
    assert torch.equal(attn.q_proj.weight_global_scale, attn.v_proj.weight_global_scale)
    assert torch.equal(mlp.gate_proj.weight_global_scale, mlp.up_proj.weight_global_scale)
    ref = tiny_llama()
    qkv = [ref.model.layers[0].self_attn.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.allclose(attn.q_proj.weight_global_scale, fp.global_scale_from_amax(max(w.abs().max() for w in qkv)))
    assert float(attn.q_proj.input_global_scale) > 0 and attn.q_proj.input_global_scale.shape == (1,)


@pytest.mark.parametrize("name", ["fp8", "fp8-block", "nvfp4-a16", "mxfp4"])
def test_gptq_on_the_format_levels_beats_round_to_nearest(name):
    """GPTQ's sweep on the format's levels (scales fixed first) lowers the layer-output error
    ||X W^T - X Q^T|| on correlated inputs, below RTN's on the same scales."""
    g = torch.Generator().manual_seed(3)
    fmt = fp.FORMATS[name]
    w = torch.randn(64, 256, generator=g) * 0.02
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g))
    h = 2 * x.t() @ x / x.shape[0]
    scales = fp.weight_scales(w, fmt)
    step = fp.scale_grid(scales, fmt, 64, 256)
    levels, codes = fmt.levels
    table = levels.view(1, 1, -1) * step.unsqueeze(2)
    res = gptq_quantize(w, h, None, table=table, group_size=fp.group_cols(fmt, 256))
    q = codes[res.q.long()]
    w_gptq = fp.decode(q.view(fp.FP8) if fmt.element == "e4m3" else q, step, fmt)
    w_rtn = fp.dequantize_weight(fp.quantize_weight(w, fmt, scales), fmt, 64, 256)
    err = lambda wq: float(((x @ (w - wq).t()) ** 2).sum())  # noqa: E731
    assert err(w_gptq) < 0.9 * err(w_rtn), (err(w_gptq), err(w_rtn))


def test_scaled_mm_path_equals_the_emulation():
    """torch._scaled_mm (the fp8 GEMM CUDA runs on sm_89+; torch runs it on the CPU too) gives the
    emulated layer's output to bf16 rounding."""
    from llmsqueeze.nn_float import scaled_mm_fp8

    g = torch.Generator().manual_seed(4)
    layer = FloatLinear.from_float(torch.randn(48, 64, generator=g), "fp8")
    x = torch.randn(7, 64, generator=g).bfloat16()
    y = scaled_mm_fp8(x, layer.weight, layer.weight_scale, None, torch.bfloat16).float()
    ref = layer(x.float())  # exact emulation in float32
    assert ((y - ref).abs() <= ref.abs() * 2**-7 + 1e-3).all()


def test_smoothing_with_fp8_static(tmp_path):
    model = tiny_llama()
    llmsqueeze.quantize(model, FloatScheme(format="fp8", act="static", smooth_alpha="auto", static_clip="mse"),
                        data=_ids(), method="rtn", progress=False)
    qc = model.config.quantization_config
    assert len(qc["method_args"]["smoothquant"]["alphas"]) == 2 and "static_clip" in qc["method_args"]


def test_lazy_refuses_float_formats(tiny_model_dir, tmp_path):
    with pytest.raises(LlmsqueezeError, match="^nvfp4-a16 runs in memory, not lazily"):
        llmsqueeze.quantize_lazy(str(tiny_model_dir), tmp_path / "q", FloatScheme(format="nvfp4-a16"))


def test_cli_float(tiny_model_dir, text_file, tmp_path, capsys):
    from llmsqueeze.cli import main

    out = tmp_path / "nv"
    assert main(["quantize", str(tiny_model_dir), "--scheme", "nvfp4", "--method", "gptq", "--calib", str(text_file),
                 "--n-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scheme      nvfp4: FP4 E2M1 weights in groups of 16, FP8 scales under an fp32 global scale" in text
    assert "14 layers" in text
    assert main(["eval", "ppl", str(out), "--data", str(text_file), "--seq-len", "32", "--windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # data-free formats need no calibration text
    assert main(["quantize", str(tiny_model_dir), "--scheme", "fp8", "--smooth-alpha", "off", "--calib", "/nonexistent",
                 "--out", str(tmp_path / "fp8")]) == 0
    capsys.readouterr()
    for bad, text in [(["--scheme", "nvfp4", "--act", "static"], "act=static (one calibrated scale per layer)"),
                      (["--scheme", "mxfp4", "--smooth-alpha", "0.5"], "smooth_alpha balances quantized activations"),
                      (["--scheme", "fp8", "--grid", "nf"], "--grid nf is an integer weight-only option"),
                      (["--scheme", "fp8", "--method", "awq"], "method 'awq' is not available for fp8")]:
        assert main(["quantize", str(tiny_model_dir), *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("llmsqueeze: error: ") and text in err and "\n" not in err, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("fmt, act", [("fp8", "dynamic"), ("fp8", "static"), ("fp8-weight", "dynamic"),
                                      ("nvfp4-a16", "dynamic"), ("mxfp4", "dynamic"), ("nvfp4", "dynamic")])
def test_export_compressed_tensors_loads_in_transformers(fmt, act, tmp_path):
    """The export is what compressed-tensors writes for the same preset: transformers' own
    compressed-tensors integration loads it on the CPU and computes our logits (fp8: bit for bit;
    fp4: it decompresses to bfloat16, so compared against ours in bfloat16)."""
    model = llmsqueeze.quantize(tiny_llama(), FloatScheme(format=fmt, act=act), data=_ids(), method="gptq",
                                progress=False)
    src = llmsqueeze.save_quantized(model, tmp_path / "q")
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["format"] == {"fp8": "float-quantized", "fp8-weight": "float-quantized", "nvfp4-a16": "nvfp4-pack-quantized",
                            "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}[fmt]
    x = _ids(1, 48, seed=6)
    if fmt.startswith("fp8"):
        theirs = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.equal(theirs(x).logits, model(x).logits)
        return
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ours = llmsqueeze.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = theirs(x).logits.float(), ours(x).logits.float()
    if fmt == "nvfp4":  # activations re-quantized in bfloat16 on both sides, rounding apart: close, not equal
        assert ((a - b).norm() / b.norm()) < 0.1
    else:
        assert torch.equal(a, b)


def test_export_fp8_block(tmp_path):
    """Whole 128x128 blocks export and load in transformers with our logits; a ragged layer is one line."""
    model = tiny_llama(hidden=256, layers=1, intermediate_size=256)  # k/v: 2 heads of 64 = 128 outputs
    llmsqueeze.quantize(model, FloatScheme(format="fp8-block", smooth_alpha=None), progress=False)
    src = llmsqueeze.save_quantized(model, tmp_path / "q")
    out = llmsqueeze.export(src, "compressed-tensors", tmp_path / "ct")
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "block" and g["weights"]["block_structure"] == [128, 128]
    assert g["input_activations"]["strategy"] == "group" and g["input_activations"]["group_size"] == 128
    x = _ids(1, 16, seed=7)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(x).logits, model(x).logits)
    ragged = llmsqueeze.save_quantized(llmsqueeze.quantize(tiny_llama(), FloatScheme(format="fp8-block", smooth_alpha=None),
                                                           progress=False), tmp_path / "r")
    with pytest.raises(LlmsqueezeError, match=r"^cannot export fp8-block to compressed-tensors: model\.layers\.0\.self_attn\.q_proj is 96 -> 96"):
        llmsqueeze.export(ragged, "compressed-tensors", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
    with pytest.raises(LlmsqueezeError, match="holds a floating-point format"):
        llmsqueeze.export(src, "gptq", tmp_path / "g")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_non_finite_weights_are_one_line(method):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(LlmsqueezeError, match=r"^model\.layers\.1\.mlp\.up_proj holds NaN or Inf weights, which "
                                              r"nvfp4-a16 cannot encode"):
        llmsqueeze.quantize(model, FloatScheme(format="nvfp4-a16"), data=_ids(), method=method, progress=False)


def test_e2m1_round_float_path_equals_the_codec():
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(20000, generator=g) * s for s in (0.3, 2.0, 5.0)] + [
        torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 1e9, -0.25, -5.0, -1e9, 0.0, -0.0]),
        torch.arange(-2000, 2001) / 256])
    assert torch.equal(fp.e2m1_round(x), fp.e2m1_decode(fp.e2m1_encode(x)))
    assert math.isnan(float(fp.e2m1_round(torch.tensor([math.nan]))[0]))

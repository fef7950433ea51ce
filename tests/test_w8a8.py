"""W8A8: integer GEMM vs integer and float references, SmoothQuant's exactness in float, the
engine-driven quantization on every family, and the checkpoint round trip."""
import copy
import json

import pytest
import torch
from conftest import FAMILIES, outlier_llama, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import llmsqueeze
from llmsqueeze import CheckpointError, Int8Linear, LlmsqueezeError, W8A8Scheme
from llmsqueeze.config import scheme_from_dict
from llmsqueeze.models import get_arch
from llmsqueeze.nn import is_linear
from llmsqueeze.quant.int8 import (
    int8_mm,
    quantize_per_token,
    quantize_static,
    quantize_weight_per_channel,
    w8a8_linear,
)
from llmsqueeze.quant.smoothquant import (
    gqa_index,
    smooth_block,
    smooth_map_for,
    smoothing_scales,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("m, k, n", [(1, 8, 8), (7, 33, 5), (17, 64, 48), (64, 96, 160)])
def test_int8_mm_is_exact(m, k, n):
    a = torch.randint(-128, 128, (m, k), generator=_gen(), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=_gen(1), dtype=torch.int8)
    ref = a.to(torch.int64) @ b.to(torch.int64).t()  # int64: no overflow possible
    out = int8_mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.to(torch.int64), ref)


def test_per_token_and_per_channel_quantization():
    x = torch.randn(16, 40, generator=_gen()) * torch.linspace(0.1, 10, 16)[:, None]
    xq, s = quantize_per_token(x)
    assert xq.dtype == torch.int8 and s.shape == (16,)
    assert (xq.abs().amax(dim=1) == 127).all()  # each row's max lands on the grid's end
    assert ((xq.float() * s[:, None] - x).abs() <= s[:, None] / 2 + 1e-6).all()  # round to nearest
    wq, ws = quantize_weight_per_channel(x)
    assert torch.equal(wq, xq) and torch.allclose(ws, s)
    assert torch.equal(quantize_static(x, torch.tensor([0.01])).abs().max(), torch.tensor(127, dtype=torch.int8))
    zq, zs = quantize_per_token(torch.zeros(2, 8))  # all-zero rows: finite scale, zero codes
    assert torch.isfinite(zs).all() and not zq.any()


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_linear_vs_references(static):
    x = torch.randn(3, 11, 64, generator=_gen())
    w = torch.randn(48, 64, generator=_gen(1)) / 8
    bias = torch.randn(48, generator=_gen(2))
    layer = Int8Linear.from_float(w, bias, input_scale=float(x.abs().max()) / 127 if static else None)
    y = layer(x)
    # integer reference: the same codes, an int64 product, the rescale in float64
    x2 = x.reshape(-1, 64)
    if static:
        xq, xs = quantize_static(x2, layer.input_scale), layer.input_scale.double().expand(x2.shape[0])
    else:
        xq, xs = quantize_per_token(x2)
    acc = xq.to(torch.int64) @ layer.weight.to(torch.int64).t()
    ref = (acc.double() * xs.double()[:, None] * layer.weight_scale.double()[None, :] + bias.double()).float()
    torch.testing.assert_close(y.reshape(-1, 48), ref, rtol=1e-6, atol=1e-5)  # float32 rescale rounding only
    # float reference: int8 on both sides keeps ~1% relative error on Gaussian data
    yf = x @ w.t() + bias
    assert (y - yf).norm() / yf.norm() < 0.02
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_int8_linear_keeps_float32_scales_on_cast():
    layer = Int8Linear.from_float(torch.randn(8, 16), input_scale=0.1).to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.input_scale.dtype == torch.float32


def test_smoothing_scales():
    a, w = torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))  # zeros: left alone
    torch.testing.assert_close(smoothing_scales(a[:2], w[:2], 1.0), a[:2])
    torch.testing.assert_close(smoothing_scales(a[:2], w[:2], 0.0), 1 / w[:2])


def test_gqa_index():
    # 4 query heads, 2 kv heads of dim 3: query heads 0, 1 read kv head 0
    assert gqa_index(6, 12, 3).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert gqa_index(8, 8, None).tolist() == list(range(8))
    assert gqa_index(6, 10, 3) is None


def _randomize_norms(model):
    """Non-trivial norm weights and biases, so folding into them is really exercised."""
    g = _gen(5)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_leaves_float_logits_unchanged(family):
    model = tiny_model(family)
    _randomize_norms(model)
    ids = torch.randint(3, 64, (2, 24), generator=_gen())
    with torch.no_grad():
        before = model(ids).logits
    smap = smooth_map_for(model)
    blocks = model.get_submodule(get_arch(model).blocks)
    g = _gen(3)
    for block in blocks:
        # outlier-heavy statistics, so the scales span orders of magnitude
        stats = {n: torch.rand(m.in_features if hasattr(m, "in_features") else m.weight.shape[0], generator=g)
                 .pow(4).mul(50).add(0.01) for n, m in block.named_modules() if is_linear(m)}
        applied = smooth_block(block, smap, stats, 0.5, pairs=True)
        assert applied and max(float(s.max() / s.min()) for s in applied.values()) > 10
    with torch.no_grad():
        after = model(ids).logits
    # float32 rounding of the rescaled weights only: ~1e-6 relative
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_pairs_found_in_llama():
    from llmsqueeze.quant.smoothquant import linear_pair_plan

    model = tiny_model("llama")  # 4 heads, 2 kv heads: v_proj 40 -> o_proj 80 inputs
    plan = linear_pair_plan(model.model.layers[0], smooth_map_for(model))
    assert [(p, c) for p, c, _ in plan] == [("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")]


def _calib(n=4, t=32):
    return torch.randint(3, 64, (n, t), generator=_gen())



def _logit_error(model, ref, ids):
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_smoothquant_helps_with_outliers(act):
    ref = outlier_llama(40.0)
    ids = torch.randint(3, 64, (2, 32), generator=_gen(9))
    plain = llmsqueeze.quantize(outlier_llama(40.0), W8A8Scheme(act=act, smooth_alpha=None), data=_calib(), progress=False)
    smooth = llmsqueeze.quantize(outlier_llama(40.0), W8A8Scheme(act=act), data=_calib(), progress=False)
    e_plain, e_smooth = _logit_error(plain, ref, ids), _logit_error(smooth, ref, ids)
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)
    alphas = smooth.config.quantization_config["method_args"]["smoothquant"]["alphas"]
    assert len(alphas) == 2 and all(0 <= a <= 1 for a in alphas)


@pytest.mark.parametrize("act, float_stream", [("dynamic", True), ("static", False)])
def test_rtn_dynamic_smoothquant_keeps_the_float_stream(act, float_stream):
    """RTN weights with per-token activations: block 1 is calibrated on block 0's float outputs (the
    smoothing pass's), and the engine runs the int8 block 0 on one batch only, as a check; static
    activations keep the quantized stream (their scales come from the quantized model's inputs)."""
    model = outlier_llama(40.0)
    blocks = model.model.layers
    seen = {0: [], 1: []}
    hooks = [blocks[i].register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen[i].append((args[0] if args else kwargs["hidden_states"],
                                                           out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for i in (0, 1)]
    n = 4
    llmsqueeze.quantize(model, W8A8Scheme(act=act), data=_calib(n), progress=False)
    for h in hooks:
        h.remove()
    # block 0's calls: the capture (n, each block's forward a stub), the smoothing pass (n), the alpha
    # search (its 4 batches per alpha tried), static: the engine's collecting pass (n), then the int8
    # block on 1 batch (float stream) or on all n
    rest = len(seen[0]) - 2 * n - (n if act == "static" else 0)
    trials = rest - (1 if float_stream else n)
    assert trials > 0 and trials % 4 == 0, (len(seen[0]), trials)
    float_out0 = [out for _, out in seen[0][n:2 * n]]  # the smoothing pass: the float block
    inputs1 = [x for x, _ in seen[1][n:2 * n]]  # block 1's smoothing pass
    if float_stream:
        assert all(torch.equal(a, b) for a, b in zip(float_out0[1:], inputs1[1:]))
    else:
        assert not all(torch.equal(a, b) for a, b in zip(float_out0[1:], inputs1[1:]))


def test_rtn_dynamic_needs_no_data_and_gptq_runs():
    ref = tiny_model("llama")
    ids = _calib()
    rtn = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(smooth_alpha=None), progress=False)
    assert isinstance(rtn.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(rtn.lm_head, torch.nn.Linear)  # the head stays dense
    gptq = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(smooth_alpha=0.5), data=ids, method="gptq",
                               progress=False)
    assert gptq.config.quantization_config["method"] == "gptq"
    assert _logit_error(gptq, ref, ids) < 0.05 and _logit_error(rtn, ref, ids) < 0.05
    with pytest.raises(LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(), progress=False)
    with pytest.raises(LlmsqueezeError, match="not available for w8a8"):
        llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(smooth_alpha=None), method="awq", progress=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_quantizes_and_reloads(family, tmp_path):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    ids = _calib()
    llmsqueeze.quantize(model, W8A8Scheme(act="static", smooth_grid=[0.5, 0.8], smooth_refine=[]), data=ids, progress=False)
    assert _logit_error(model, ref, ids[:1]) < 0.05
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = llmsqueeze.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, model(ids[:1]).logits)


def test_checkpoint_round_trip_and_format(tmp_path):
    model = tiny_model("llama")
    llmsqueeze.quantize(model, W8A8Scheme(act="static"), data=_calib(), progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scheme"]["type"] == "w8a8" and qc["scheme"]["act"] == "static"
    assert qc["scheme"]["weights"] == "int8 per-channel sym"
    assert len(qc["method_args"]["smoothquant"]["alphas"]) == 2
    ids = _calib()[:1]
    with torch.no_grad():
        want = model(ids).logits
        via_hf = AutoModelForCausalLM.from_pretrained(out)
        assert isinstance(via_hf.model.layers[1].mlp.down_proj, Int8Linear)
        assert via_hf.model.layers[1].mlp.down_proj.weight.dtype == torch.int8
        assert torch.equal(via_hf(ids).logits, want)
        assert torch.equal(llmsqueeze.from_pretrained(out, dtype=torch.float32)(ids).logits, want)
    from llmsqueeze.info import checkpoint_info, format_info

    info = checkpoint_info(out)
    assert 8 < info["bits_per_quantized_weight"] < 9
    assert "w8a8" in format_info(info)


@pytest.mark.parametrize("field, value, match", [
    ("act", "per-group", "act='per-group' is not valid"),
    ("smooth_alpha", 3, "smooth_alpha=3"),
    ("colour", "red", "unknown w8a8 scheme fields"),
    ("weights", "int4", "only 'int8 per-channel sym'"),
])
def test_corrupt_scheme_field_is_one_line(tmp_path, field, value, match):
    model = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(smooth_alpha=None), progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["scheme"][field] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
        llmsqueeze.from_pretrained(out)
    assert "\n" not in str(e.value)


def test_missing_input_scale_and_wrong_weight_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    model = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(act="static", smooth_alpha=None), data=_calib(),
                                progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.input_scale"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj lacks input_scale"):
        llmsqueeze.check_checkpoint(out)
    tensors["model.layers.0.mlp.up_proj.input_scale"] = torch.ones(1)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="F32 weight, w8a8 stores int8"):
        llmsqueeze.check_checkpoint(out)


def test_scheme_from_dict_dispatch():
    assert isinstance(scheme_from_dict({"type": "w8a8"}), W8A8Scheme)
    assert isinstance(scheme_from_dict({"bits": 4}), llmsqueeze.QuantScheme)
    with pytest.raises(LlmsqueezeError, match="scheme type 'w4a4' is not known"):
        scheme_from_dict({"type": "w4a4"})
    s = W8A8Scheme(act="static", smooth_alpha=0.5)
    assert scheme_from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_w8a8_direct_matches_manual_module():
    """Int8Linear of a given weight computes w8a8_linear with its buffers (no hidden state)."""
    w = torch.randn(24, 40, generator=_gen())
    layer = Int8Linear.from_float(w)
    x = torch.randn(5, 40, generator=_gen(1))
    assert torch.equal(layer(x), w8a8_linear(x, layer.weight, layer.weight_scale))


def test_shared_input_is_quantized_once_and_in_place_writes_are_seen(monkeypatch):
    import llmsqueeze.nn_int8 as nn_int8

    calls = []
    real = nn_int8.quantize_per_token
    monkeypatch.setattr(nn_int8, "quantize_per_token", lambda x: calls.append(1) or real(x))
    a, b = Int8Linear.from_float(torch.randn(8, 16)), Int8Linear.from_float(torch.randn(12, 16))
    x = torch.randn(2, 5, 16, generator=_gen())
    ya, yb = a(x), b(x)
    assert len(calls) == 1
    assert torch.equal(ya, w8a8_linear(x, a.weight, a.weight_scale)) and torch.equal(yb, w8a8_linear(x, b.weight, b.weight_scale))
    x.mul_(2)  # same tensor, new values: quantized again
    assert torch.equal(b(x), w8a8_linear(x, b.weight, b.weight_scale)) and len(calls) == 2


def test_cli_w8a8(tiny_model_dir, text_file, tmp_path, capsys):
    from llmsqueeze.cli import main

    out = tmp_path / "w8a8"
    assert main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--act", "static", "--smooth-alpha", "auto",
                 "--method", "gptq", "--calib", str(text_file), "--n-samples", "4", "--seq-len", "32",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scheme"]["act"] == "static" and qc["method"] == "gptq" and qc["method_args"]["n_samples"] == 4
    assert main(["info", str(out)]) == 0
    assert "w8a8: int8 per-channel sym weights, int8 static activations, SmoothQuant alpha auto" in capsys.readouterr().out
    assert main(["eval", "ppl", str(out), "--data", str(text_file), "--seq-len", "32", "--windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # dynamic without smoothing needs no calibration text at all
    assert main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--smooth-alpha", "off", "--calib", "/nonexistent",
                 "--out", str(tmp_path / "rtn")]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--smooth-alpha", "1.5",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error: smooth_alpha=1.5") and "\n" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_export_compressed_tensors(tmp_path, act):
    from safetensors import safe_open

    from llmsqueeze.formats.compressed_tensors import write_int_quantized

    model = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(act=act, smooth_alpha=0.5), data=_calib(), progress=False)
    out = write_int_quantized(model, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    g = qc["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "channel" and g["weights"]["num_bits"] == 8 and g["weights"]["symmetric"]
    assert g["input_activations"]["dynamic"] == (act == "dynamic")
    assert g["input_activations"]["strategy"] == ("token" if act == "dynamic" else "tensor")
    assert qc["ignore"] == ["lm_head"]
    layer = model.model.layers[0].mlp.up_proj
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.mlp.up_proj.weight"), layer.weight)
        assert torch.equal(f.get_tensor("model.layers.0.mlp.up_proj.weight_scale"), layer.weight_scale.view(-1, 1))
        assert ("model.layers.0.mlp.up_proj.input_scale" in f.keys()) == (act == "static")
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float32
    # the in-memory model is untouched
    assert model.config.quantization_config["quant_method"] == "llmsqueeze" and layer.weight_scale.dim() == 1


def test_alpha_search_coarse_to_fine():
    """The returned alpha is the least error of all tried; refinement tries best +- each step."""
    from llmsqueeze.engine import capture_block_inputs
    from llmsqueeze.quant.smoothquant import collect_input_absmax, search_alpha
    from llmsqueeze.quant.w8a8 import _rtn_int8

    model = outlier_llama(40.0)
    block = model.model.layers[0]
    hidden, kwargs = capture_block_inputs(model, model.model.layers, [_calib(2)], "cpu", "cpu")
    inputs = [(hidden[0], kwargs[0][0])]
    names = [n for n, m in block.named_modules() if is_linear(m)]
    stats = collect_input_absmax(block, names, lambda: block(inputs[0][0], **inputs[0][1]))
    from llmsqueeze.engine import block_output

    with torch.no_grad():
        targets = [block_output(block(inputs[0][0], **inputs[0][1]))]

    def quantize_block(trial, applied):
        from llmsqueeze.nn import set_module

        for n in names:
            set_module(trial, n, _rtn_int8(trial.get_submodule(n)))

    smap = smooth_map_for(model)
    alpha, errors = search_alpha(block, smap, stats, [0.2, 0.4, 0.6, 0.8], True, quantize_block, inputs, targets,
                                 refine=[0.1, 0.05])
    assert errors[alpha] == min(errors.values())
    assert {0.2, 0.4, 0.6, 0.8} <= set(errors) and 4 < len(errors) <= 8
    coarse = min((0.2, 0.4, 0.6, 0.8), key=errors.get)
    assert abs(alpha - coarse) <= 0.15 + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_cpu_path_is_bit_identical(dtype):
    """The "compile" backend (Inductor's fused loops for the quantization and the rescale) gives the
    eager functions' bits: the same true division, ties-to-even rounding and float32 rescale order."""
    import shutil

    import llmsqueeze.nn_int8 as nn_int8
    from llmsqueeze.quant.int8 import rescale

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: Inductor cannot build the fused loops here (Int8Linear stays eager)")
    # outlier channels and exact ties (x / scale = k + 0.5) where a multiply by 1/scale could flip
    x = (torch.randn(301, 96, generator=_gen()) * torch.linspace(0.05, 20, 96)).to(dtype)
    x[0, :3] = torch.tensor([127.0, 0.5, -1.5], dtype=dtype)
    for m in (301, 64):  # one graph for any number of tokens
        xq, s = nn_int8.fused(quantize_per_token)(x[:m])
        rq, rs = quantize_per_token(x[:m])
        assert torch.equal(xq, rq) and torch.equal(s, rs)
    scale = torch.tensor([float(x.float().abs().max()) / 300])  # a static scale that clips
    assert torch.equal(nn_int8.fused(quantize_static)(x, scale), quantize_static(x, scale))
    acc = torch.randint(-2**20, 2**20, (301, 40), generator=_gen(1), dtype=torch.int32)
    ws, bias = torch.rand(40, generator=_gen(2)) / 100, torch.randn(40, generator=_gen(3))
    for b in (None, bias, bias.to(dtype)):
        for xs in (quantize_per_token(x)[1], scale):  # per token [M], static [1]
            assert torch.equal(nn_int8.fused(rescale)(acc, xs, ws, b, dtype), rescale(acc, xs, ws, b, dtype))
    assert not nn_int8._compile_failed  # the loops above were compiled, not the eager fallback


@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_compile_backend_matches_torch(monkeypatch, static):
    import llmsqueeze.nn_int8 as nn_int8

    w, bias = torch.randn(48, 64, generator=_gen(1)) / 8, torch.randn(48, generator=_gen(2))
    x = torch.randn(3, 41, 64, generator=_gen())
    layer = Int8Linear.from_float(w, bias, input_scale=float(x.abs().max()) / 127 if static else None)
    outs = {}
    for backend in ("torch", "compile"):
        monkeypatch.setattr(nn_int8, "BACKEND", backend)
        nn_int8.forget_quantized_input()
        assert nn_int8.use_compiled(x) == (backend == "compile")
        outs[backend] = layer(x)
    assert torch.equal(outs["torch"], outs["compile"])
    # auto: prefill-sized inputs take the compiled loops, decode-sized ones stay eager
    monkeypatch.setattr(nn_int8, "BACKEND", "auto")
    assert nn_int8.use_compiled(torch.zeros(2048, 32)) and not nn_int8.use_compiled(torch.zeros(1, 4096))


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    import llmsqueeze.nn_int8 as nn_int8

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(nn_int8, "_compile_failed", False)
    monkeypatch.setattr(nn_int8, "BACKEND", "compile")
    nn_int8.fused.cache_clear()
    try:
        layer = Int8Linear.from_float(torch.randn(8, 16, generator=_gen()))
        x = torch.randn(5, 16, generator=_gen(1))
        nn_int8.forget_quantized_input()
        with caplog.at_level("WARNING", logger="llmsqueeze.nn_int8"):
            y, y2 = layer(x), layer(x * 2)
        assert torch.equal(y, w8a8_linear(x, layer.weight, layer.weight_scale))
        assert torch.equal(y2, w8a8_linear(x * 2, layer.weight, layer.weight_scale))
        warnings = [r for r in caplog.records if "compiling the int8 quantization failed" in r.getMessage()]
        assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
        assert "more detail" not in warnings[0].getMessage() and not nn_int8.use_compiled(x)
    finally:
        nn_int8.fused.cache_clear()  # drop the broken wrappers


def test_static_scale_search_never_worse_than_max_and_clips_outliers():
    from llmsqueeze.quant.int8 import QMAX, static_clip_errors, static_output_error

    x = torch.randn(256, 64, generator=_gen())
    x[0, 3] = 60.0  # one outlier token: max|x| would spend the grid on it
    w = torch.randn(32, 64, generator=_gen(1))
    absmax = float(x.abs().max())
    errors = static_clip_errors(x, w, absmax)
    assert errors[1.0] == pytest.approx(static_output_error(x, w, absmax / QMAX))
    r = min(errors, key=errors.get)
    assert r < 1.0 and static_output_error(x, w, r * absmax / QMAX) == errors[r] < errors[1.0]  # clipped
    # no outliers: a near-uniform spread keeps (close to) the full range
    u = torch.rand(256, 64, generator=_gen(2)) * 2 - 1
    eu = static_clip_errors(u, w, float(u.abs().max()))
    assert min(eu, key=eu.get) >= 0.8


@pytest.mark.parametrize("clip", ["mse", "max"])
def test_static_clip_scheme_records_ratios(clip):
    model = outlier_llama(20.0)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=_gen())
    llmsqueeze.quantize(model, W8A8Scheme(act="static", smooth_alpha=None, static_clip=clip), data=ids, progress=False)
    args = model.config.quantization_config["method_args"]
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.input_scale is not None for m in layers)
    if clip == "max":
        assert "static_clip" not in args
    else:
        ratios = args["static_clip"]
        assert len(ratios) == len(layers) and all(0.3 < r <= 1.0 for r in ratios.values())
    with pytest.raises(LlmsqueezeError, match="static_clip"):
        W8A8Scheme(act="static", static_clip="percentile")


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_whole_model_torch_compile_fullgraph(tmp_path, act):
    """A reloaded W8A8 checkpoint compiles as one graph (no break at the shared-input cache): under
    torch.compile Int8Linear traces plain ops and Inductor fuses them; same logits as eager."""
    import shutil

    import llmsqueeze.nn_int8 as nn_int8

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: Inductor cannot compile on this machine")
    model = llmsqueeze.quantize(tiny_model("llama"), W8A8Scheme(act=act, smooth_alpha=0.5), data=_calib(),
                                progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    loaded = llmsqueeze.from_pretrained(out, dtype=torch.float32)
    ids = _calib()[:2]
    torch._dynamo.reset()
    with torch.no_grad():
        nn_int8.forget_quantized_input()
        want = loaded(ids).logits
        got = torch.compile(loaded, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    # Inductor may reassociate the float rescale with what follows: last-bit differences only
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_to_dtype_keeps_the_float32_scales_exactly():
    layer = Int8Linear.from_float(torch.randn(8, 16, generator=_gen()) * 0.0123, input_scale=0.0371)
    scale, inp = layer.weight_scale.clone(), layer.input_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.input_scale, inp)

"""GPTQ math on single layers, and the sequential engine on tiny models."""
import copy
import logging

import pytest
import torch
from conftest import FAMILIES, tiny_model

import llmsqueeze
from llmsqueeze import QuantScheme
from llmsqueeze.methods import resolve_scheme
from llmsqueeze.models import get_arch
from llmsqueeze.nn import QuantLinear, is_linear, set_module
from llmsqueeze.quant import grid
from llmsqueeze.quant.gptq import accumulate_hessian, gptq_quantize
from llmsqueeze.quant.rtn import rtn_quantize


def correlated_inputs(t=2048, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scales = torch.linspace(0.2, 3.0, k)[torch.randperm(k, generator=g)]  # uneven channel energy
    return (torch.randn(t, k, generator=g) @ mix) * scales


def hessian(x):
    h, n = accumulate_hessian(torch.zeros(x.shape[1], x.shape[1]), 0, x[:1000])
    h, n = accumulate_hessian(h, n, x[1000:])
    return h


def test_hessian_running_mean_equals_direct():
    x = correlated_inputs(t=1500, k=16)
    torch.testing.assert_close(hessian(x), 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 32), (4, -1), (2, 32), (4, 48)])
@pytest.mark.parametrize("variant", ["plain", "act_order", "static"])
def test_gptq_beats_rtn_on_layer_output(bits, group, variant):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    h = hessian(x)
    res = gptq_quantize(w, h, QuantScheme(bits=bits, group_size=group), act_order=variant != "plain", static_groups=variant == "static")
    gs = 128 if group == -1 else group
    deq = grid.dequantize(res.q, res.scale, res.zero, gs, res.g_idx)
    q0, s0, z0 = rtn_quantize(w, QuantScheme(bits=bits, group_size=group))
    rtn = grid.dequantize(q0, s0, z0, gs)
    err_gptq = (x @ (deq - w).t()).norm()
    err_rtn = (x @ (rtn - w).t()).norm()
    # 2 bits leaves little to redistribute (the grid is too coarse), so the margin is smaller there
    assert err_gptq < (0.95 if bits == 2 else 0.85) * err_rtn, (err_gptq, err_rtn)
    assert (res.g_idx is not None) == (variant == "act_order")
    assert int(res.q.min()) >= 0 and int(res.q.max()) <= 2**bits - 1


def test_diagonal_hessian_reduces_to_rtn():
    """With uncorrelated inputs there is no error to push forward: GPTQ is round-to-nearest."""
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.rand(96) + 0.5)
    res = gptq_quantize(w, h, QuantScheme(bits=4, group_size=32))
    q, s, z = rtn_quantize(w, QuantScheme(bits=4, group_size=32))
    assert torch.equal(res.q, q) and torch.equal(res.scale, s) and torch.equal(res.zero, z)


def test_dead_inputs_and_damping(caplog):
    x = correlated_inputs(k=64)
    x[:, 5] = 0  # an input that never fires
    w = torch.randn(16, 64)
    res = gptq_quantize(w, hessian(x), QuantScheme(bits=4, group_size=32))
    assert torch.isfinite(res.scale).all() and res.damp == 0.01
    # an indefinite "Hessian" (eigenvalue -0.05 at mean diagonal ~1): 1% damping fails, 10% works
    q, _ = torch.linalg.qr(torch.randn(64, 64))
    ev = torch.ones(64)
    ev[0] = -0.05
    h = q @ torch.diag(ev) @ q.t()
    with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
        res = gptq_quantize(w, h, QuantScheme(bits=4, group_size=32))
    assert res.damp == pytest.approx(0.1) and "damping raised" in caplog.text


def test_nan_inputs_name_the_layer(tiny_model_dir):
    model = tiny_model("llama")
    ids = torch.randint(3, 64, (2, 16))
    model.model.layers[1].input_layernorm.weight.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match="model.layers.1.self_attn.q_proj"):
        llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=ids, progress=False)


def _calib(n=4, t=24, seed=0):
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_engine_matches_direct_algorithm_block_by_block():
    """The engine's result equals running GPTQ by hand: for each block, gather each Linear's inputs
    with hooks on a full forward of the (partially quantized) model, build H, call gptq_quantize."""
    data = _calib()
    model = tiny_model("llama")
    manual = copy.deepcopy(model)
    llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=data, progress=False)

    arch = get_arch(manual)
    for i, block in enumerate(manual.get_submodule(arch.blocks)):
        names = [n for n, m in block.named_modules() if is_linear(m)]
        hs = {n: [torch.zeros(block.get_submodule(n).in_features, block.get_submodule(n).in_features), 0] for n in names}

        def hook(mod, args, out, n=None):
            hs[n][0], hs[n][1] = accumulate_hessian(hs[n][0], hs[n][1], args[0])

        handles = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
        with torch.no_grad():
            for row in data.split(1):
                manual(row, use_cache=False)
        for hd in handles:
            hd.remove()
        for n in names:
            lin = block.get_submodule(n)
            # the defaults: act-order with static groups, clip search weighted by the Hessian diagonal
            r = gptq_quantize(lin.weight, hs[n][0], QuantScheme(bits=4, group_size=32, clip_search=True),
                              act_order=True, static_groups=True)
            set_module(block, n, QuantLinear.from_quantized(r.q, r.scale, r.zero, 4, 32, bias=lin.bias))
        for n in names:
            a = model.get_submodule(f"{arch.blocks}.{i}.{n}")
            b = block.get_submodule(n)
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales), f"block {i} {n}"
            assert torch.equal(a.qzeros, b.qzeros)


@pytest.mark.parametrize("variant", ["act_order", "static"])
def test_act_order_checkpoints_round_trip(variant, tmp_path):
    model = tiny_model("llama")
    llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=_calib(), progress=False,
                        act_order=True, static_groups=variant == "static")
    layer = model.model.layers[0].mlp.down_proj
    assert (layer.g_idx is not None) == (variant == "act_order")
    if variant == "static":
        assert layer._int4_cpu_group() is not None  # static groups keep the fast kernel path
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for loaded in (llmsqueeze.from_pretrained(out), __import__("transformers").AutoModelForCausalLM.from_pretrained(out)):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert (loaded.model.layers[0].mlp.down_proj.g_idx is not None) == (variant == "act_order")


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_on_every_architecture(family, tmp_path):
    model = tiny_model(family)
    rtn = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    data = _calib(n=8, t=32)
    llmsqueeze.quantize(model, bits=3, group_size=32, method="gptq", data=data, progress=False, true_sequential=True)
    llmsqueeze.quantize(rtn, bits=3, group_size=32, progress=False)
    assert model.config.quantization_config["method"] == "gptq"
    # on the calibration data itself, GPTQ's logits stay closer to the dense model's than RTN's
    with torch.no_grad():
        ref = torch.cat([dense(r, use_cache=False).logits for r in data.split(1)])
        err_gptq = (torch.cat([model(r, use_cache=False).logits for r in data.split(1)]) - ref).norm()
        err_rtn = (torch.cat([rtn(r, use_cache=False).logits for r in data.split(1)]) - ref).norm()
    assert err_gptq < err_rtn
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = llmsqueeze.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(data[:1]).logits, model(data[:1]).logits)


def test_gptq_needs_data_and_block_layers():
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(tiny_model("llama"), method="gptq", progress=False)
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="inside the decoder blocks only"):
        llmsqueeze.quantize(tiny_model("llama"), method="gptq", data=_calib(), lm_head=True, progress=False)


def test_bad_devices_are_one_line_errors():
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="'gpu' is not a device: use cpu or cuda"):
        llmsqueeze.quantize(tiny_model("llama"), method="gptq", data=_calib(), device="gpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(llmsqueeze.LlmsqueezeError, match="no CUDA GPU is visible here; use --offload cpu"):
            llmsqueeze.quantize(tiny_model("llama"), method="gptq", data=_calib(), offload="cuda", progress=False)


def test_act_aware_clip_search():
    """The clip search under GPTQ weighs each column by its Hessian diagonal: on inputs with uneven
    channel energy it lowers the layer-output error below both plain min/max and the |w|-weighted
    search, and `clip_search` None resolves to on for GPTQ, off for RTN."""
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    h = hessian(x)

    def out_err(scheme, aac=True):
        r = gptq_quantize(w, h, scheme, act_order=True, static_groups=True, act_aware_clip=aac)
        return (x @ (grid.dequantize(r.q, r.scale, r.zero, 32) - w).t()).norm()

    plain = out_err(QuantScheme(bits=3, group_size=32, clip_search=False))
    wclip = out_err(QuantScheme(bits=3, group_size=32, clip_search=True), aac=False)
    hclip = out_err(QuantScheme(bits=3, group_size=32, clip_search=True))
    assert hclip < plain and hclip < wclip, (plain, wclip, hclip)
    assert resolve_scheme(QuantScheme(bits=3), "gptq").clip_search is True
    assert resolve_scheme(QuantScheme(bits=3), "rtn").clip_search is False
    assert resolve_scheme(QuantScheme(bits=3, clip_search=False), "gptq").clip_search is False
    model = tiny_model("llama")
    llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=_calib(), progress=False)
    assert model.config.quantization_config["scheme"]["clip_search"] is True


def test_offload_and_batch_size_do_not_change_the_result():
    """Activations parked on the offload device between blocks, and calibration run two samples at a
    time, give the same checkpoint as the defaults (the Hessian is a running mean over tokens, so
    only float rounding differs with the batch split)."""
    data = _calib(n=6, t=24)
    ref, off, bat = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    for m, kw in ((ref, {}), (off, {"offload": "cpu"}), (bat, {"batch_size": 2})):
        llmsqueeze.quantize(m, bits=4, group_size=32, method="gptq", data=data, progress=False, device="cpu", **kw)
    assert off.config.quantization_config["method_args"] == ref.config.quantization_config["method_args"]
    ids = data[:2]
    with torch.no_grad():
        assert torch.equal(off(ids).logits, ref(ids).logits)
        torch.testing.assert_close(bat(ids).logits, ref(ids).logits, rtol=0, atol=2e-2)
    layers = [n for n, m in ref.named_modules() if isinstance(m, QuantLinear)]
    same = sum(torch.equal(ref.get_submodule(n).qweight, bat.get_submodule(n).qweight) for n in layers)
    assert same >= len(layers) - 2, f"only {same}/{len(layers)} layers identical with batch_size=2"

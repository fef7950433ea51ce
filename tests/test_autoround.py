"""Learned rounding (autoround): the STE math, the block optimisation on tiny models, checkpoints."""

import pytest
import torch
from conftest import tiny_model

import llmsqueeze
from llmsqueeze.cli import main
from llmsqueeze.quant import grid
from llmsqueeze.quant.autoround import (
    fake_quant_learned,
    fake_quant_reference,
    freeze,
    learned_qparams,
    pad_groups,
)


def _calib(n=8, t=24, seed=0):
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _range(w, g):
    wmin, wmax = grid.group_minmax(w, g)
    return wmin.clamp(max=0), wmax.clamp(min=0)


@pytest.mark.parametrize("sym", [False, True])
def test_fused_fake_quant_matches_autograd_reference(sym):
    """The hand-written STE backward equals autograd through round_ste (K=80, G=32: shorter last group)."""
    w = torch.randn(16, 80, generator=torch.Generator().manual_seed(0))
    wg = pad_groups(w, 32)
    wmin, wmax = _range(w, 32)
    v0 = torch.rand(wg.shape, generator=torch.Generator().manual_seed(1)) - 0.5
    g = torch.randn(16, 80, generator=torch.Generator().manual_seed(2))
    results = []
    for fq in (fake_quant_learned, fake_quant_reference):
        v = v0.clone().requires_grad_()
        a_lo = torch.full_like(wmin, 0.8).requires_grad_()
        a_hi = torch.full_like(wmax, 0.7).requires_grad_()
        s, z = learned_qparams(wmin, wmax, a_lo, a_hi, 3, sym)
        out = fq(wg, v, s, z, 3).reshape(16, -1)[:, :80]
        (out * g).sum().backward()
        results.append((out, v.grad, a_hi.grad, a_lo.grad))
    (o1, v1, h1, l1), (o2, v2, h2, l2) = results
    assert torch.equal(o1, o2) and torch.equal(v1, v2)
    # group sums in another order: float32 rounding only
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-5)
    if not sym:
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert not v1.reshape(16, -1)[:, 80:].any()  # padding columns get no gradient


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_freeze_equals_fake_quant_and_rtn_at_init(bits, sym):
    """V = 0, a = 1: the frozen grid is round-to-nearest min/max, and its dequantized weight equals the
    simulated one computed with the stored (fp16) scale, bit for bit."""
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(3))
    wg = pad_groups(w, 32)
    wmin, wmax = _range(w, 32)
    ones = torch.ones_like(wmin)
    q, scale, zero = freeze(wg, torch.zeros_like(wg), wmin, wmax, ones, ones, bits, sym, 80, torch.float16)
    s0, z0 = grid.minmax_qparams(wmin, wmax, bits, sym)
    q0 = grid.quantize(w, s0, z0, bits, 32)
    assert torch.equal(scale, s0) and torch.equal(zero, z0) and torch.equal(q, q0)
    sim = fake_quant_learned(wg, torch.zeros_like(wg), scale, zero.float(), bits).reshape(24, -1)[:, :80]
    assert torch.equal(grid.dequantize(q, scale, zero, 32), sim)


def _block_report(bits, sym, group, iters, **kw):
    model = tiny_model("llama")  # hidden 80: group 32 leaves a shorter last group of 16
    llmsqueeze.quantize(model, bits=bits, group_size=group, sym=sym, method="autoround", data=_calib(),
                        iters=iters, progress=False, batch_samples=4, **kw)
    return model, model._llmsqueeze_report


@pytest.mark.parametrize("bits, sym", [(2, False), (3, False), (4, False), (4, True), (3, True)])
def test_learned_rounding_lowers_block_error_vs_rtn(bits, sym):
    """loss_before is the block output MSE of round-to-nearest (V = 0, a = 1) on the same inputs and
    targets; learned rounding must beat it clearly on the first block (identical inputs for both)."""
    _, report = _block_report(bits, sym, 32, iters=60)
    first = report[0]
    assert first["loss_after"] < 0.8 * first["loss_before"], first
    assert all(r["loss_after"] < r["loss_before"] for r in report), report


def test_round_trip_and_checkpoint_method(tmp_path):
    model, _ = _block_report(3, False, 32, iters=10)
    qc = model.config.quantization_config
    assert qc["method"] == "autoround" and qc["method_args"]["iters"] == 10 and qc["method_args"]["seed"] == 0
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for loaded in (llmsqueeze.from_pretrained(out), __import__("transformers").AutoModelForCausalLM.from_pretrained(out)):
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    saved = __import__("json").loads((out / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "autoround" and saved["method_args"]["iters"] == 10


def test_deterministic_from_seed():
    a, _ = _block_report(3, False, 32, iters=10, seed=1)
    b, _ = _block_report(3, False, 32, iters=10, seed=1)
    c, _ = _block_report(3, False, 32, iters=10, seed=2)
    la, lb, lc = (m.model.layers[1].mlp.down_proj for m in (a, b, c))
    assert torch.equal(la.qweight, lb.qweight) and torch.equal(la.scales, lb.scales) and torch.equal(la.qzeros, lb.qzeros)
    assert not torch.equal(la.qweight, lc.qweight)  # another seed draws other minibatches


def test_clip_init_starts_from_clip_searched_grid():
    """init "clip" with 1 iteration of lr ~0: the frozen grid is the clip-searched one."""
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    llmsqueeze.quantize(model, bits=3, group_size=32, method="autoround", data=_calib(), iters=1, lr=1e-9,
                        init="clip", progress=False, batch_samples=4)
    s, z = grid.clip_search_qparams(w, 3, 32, False, torch.float16)
    q, scale, zero = model.model.layers[0].mlp.down_proj.unpack()
    assert torch.equal(zero, z) and torch.equal(scale, s)


@pytest.mark.parametrize("kw, needle", [
    ({"iters": 0}, "iters=0 must be a positive integer"),
    ({"iters": 2.5}, "iters=2.5 must be a positive integer"),
    ({"lr": -1.0}, "lr=-1.0 must lie in (0, 1]"),
    ({"init": "gptq"}, "init='gptq' is not available"),
    ({"batch_samples": 0}, "batch_samples=0 must be a positive integer"),
])
def test_bad_args(kw, needle):
    with pytest.raises(llmsqueeze.LlmsqueezeError) as e:
        llmsqueeze.quantize(tiny_model("llama"), bits=3, method="autoround", data=_calib(), progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_needs_data():
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(tiny_model("llama"), method="autoround", progress=False)


def test_cli_autoround(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "3", "--group-size", "64", "--method", "autoround",
                 "--iters", "5", "--calib", str(text_file), "--n-samples", "4", "--seq-len", "16", "--out", str(out)]) == 0
    saved = __import__("json").loads((out / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "autoround" and saved["method_args"]["iters"] == 5
    llmsqueeze.from_pretrained(out)
    capsys.readouterr()
    assert main(["quantize", str(tiny_model_dir), "--method", "autoround", "--iters", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error:") and "\n" not in err and "iters=0" in err
    assert not (tmp_path / "r").exists()


class _Perturb:
    """An engine method that records what prepare_block is handed and replaces each Linear by a
    perturbed copy, so the quantized stream departs from the float one."""

    float_targets = True

    def __init__(self):
        self.seen = []  # (prefix, inputs [S, T, H], targets [S, T, H])

    def collect(self, name, module, x):
        pass

    def prepare_block(self, prefix, block, batches, targets=None):
        self.seen.append((prefix, torch.cat([h for h, _ in batches()]), torch.cat(list(targets()))))

    def apply(self, name, module):
        new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.load_state_dict(module.state_dict())
        with torch.no_grad():
            new.weight.mul_(1.25)
        return new


def test_engine_float_targets_are_the_dense_models_block_outputs():
    """With float_targets the engine hands each block the float model's block outputs on the float
    model's own inputs (hidden_states[i + 1] of the dense forward), while the inputs come from the
    modified blocks upstream."""
    from llmsqueeze.engine import run_sequential
    from llmsqueeze.nn import is_linear

    model = tiny_model("llama").eval()
    ids = _calib(4, 16)
    with torch.no_grad():
        dense = model(ids, output_hidden_states=True).hidden_states  # embeddings, block 0 out, ...
    names = [n for n, m in model.named_modules() if is_linear(m) and ".layers." in n]
    method = _Perturb()
    run_sequential(model, [ids[i : i + 1] for i in range(len(ids))], method, names, progress=False)
    n_blocks = len(model.model.layers)
    assert [p for p, _, _ in method.seen] == [f"model.layers.{i}." for i in range(n_blocks)]
    for i, (_, _x, y) in enumerate(method.seen[:-1]):  # the last hidden state has the final norm applied
        torch.testing.assert_close(y, dense[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.seen[0][1], dense[0], rtol=0, atol=0)
    assert (method.seen[1][1] - dense[1]).abs().max() > 1e-3  # the inputs are the perturbed stream's


def test_float_targets_change_the_result_and_amp_off_trains_in_float32():
    from llmsqueeze.quant.autoround import default_lr, training_dtype

    a, ra = _block_report(3, False, 32, iters=10)
    b, rb = _block_report(3, False, 32, iters=10, float_targets=False)
    assert a.config.quantization_config["method_args"]["float_targets"] is True
    assert b.config.quantization_config["method_args"]["float_targets"] is False
    # block 0 sees identical inputs and targets either way; later blocks learn other targets
    assert ra[0]["loss_before"] == rb[0]["loss_before"]
    assert ra[-1]["loss_before"] != rb[-1]["loss_before"]
    assert training_dtype(torch.device("cpu"), False) is None
    expected = str(training_dtype(torch.device("cpu"), None) or torch.float32).replace("torch.", "")
    assert a.config.quantization_config["method_args"]["train_dtype"] == expected
    c, _ = _block_report(3, False, 32, iters=2, amp=False)
    assert c.config.quantization_config["method_args"]["train_dtype"] == "float32"
    assert default_lr(200, 3) == 0.01 and default_lr(200, 4) == 0.005 and default_lr(100, 2) == 0.02


def test_token_weights_cap_massive_tokens_and_weighted_mse():
    from llmsqueeze.quant.autoround import token_weights, weighted_mse

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 9, 16, generator=g)
    y[0, 0] *= 100.0  # an attention-sink token: 100x the norm
    w = token_weights(y)  # [2, 9]
    assert w.shape == (2, 9) and (w <= 1).all() and (w > 0).all()
    norms = y.norm(dim=-1)
    med = norms[0].median()
    torch.testing.assert_close(w[0, 0], (med / norms[0, 0]) ** 2)
    assert (w[0, 1:] >= (med / norms[0, 1:]).square().clamp(max=1) - 1e-7).all()
    out = y + 0.1 * torch.randn(2, 9, 16, generator=g)
    torch.testing.assert_close(weighted_mse(out, y, None), torch.nn.functional.mse_loss(out, y))
    torch.testing.assert_close(weighted_mse(out, y, torch.ones(2, 9)), torch.nn.functional.mse_loss(out, y))
    # the sink's error, 100x larger in absolute terms, counts like an ordinary token's relative error
    out2 = y.clone()
    out2[0, 0] += 0.1 * y[0, 0]
    plain, capped = weighted_mse(out2, y, None), weighted_mse(out2, y, w)
    assert capped < plain / 50

"""AWQ balancing: exact in float, better than RTN where an input channel is an outlier, its pieces
against brute-force references, the checkpoint round trip, and the one-line errors."""
import pytest
import torch
from conftest import FAMILIES, outlier_llama, tiny_model

import llmsqueeze
from llmsqueeze import LlmsqueezeError, QuantScheme
from llmsqueeze.models import get_arch
from llmsqueeze.nn import QuantLinear, is_linear
from llmsqueeze.quant.awq import (
    AWQ,
    awq_scales,
    balanced_fake_quant,
    collect_input_stats,
    exact_clip_qparams,
    group_output_error,
    output_error,
)
from llmsqueeze.quant.grid import fake_quantize, group_minmax, minmax_qparams
from llmsqueeze.quant.smoothquant import SMOOTH_MAPS, smooth_map_for


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _calib(n=4, t=32):
    return torch.randint(3, 64, (n, t), generator=_gen())



def test_awq_scales_are_normalised():
    m = torch.tensor([0.1, 1.0, 10.0, 4.0])
    s = awq_scales(m, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(s / s[1], (m / m[1]).sqrt())  # proportional to mean|x|^alpha
    assert torch.equal(awq_scales(m, 0.0), torch.ones(4))  # alpha 0: no balancing


def test_output_errors_match_brute_force():
    x = torch.randn(50, 40, generator=_gen())
    e = torch.randn(6, 40, generator=_gen(1))
    h = x.t() @ x
    torch.testing.assert_close(output_error(e, h), float((x @ e.t()).pow(2).sum()), rtol=1e-4, atol=1e-4)
    per_group = group_output_error(e, h, 16)  # groups of 16, 16, 8 (shorter last group)
    assert per_group.shape == (6, 3)
    for gi, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)]):
        ref = (x[:, a:b] @ e[:, a:b].t()).pow(2).sum(dim=0)
        torch.testing.assert_close(per_group[:, gi], ref, rtol=1e-4, atol=1e-4)


def test_balanced_fake_quant_is_exact_for_powers_of_two():
    # scaling a column by 2^k scales its values exactly, but the group's range changes: only with
    # s = 1 does it equal plain fake-quant
    w = torch.randn(8, 32, generator=_gen())
    scheme = QuantScheme(bits=4, group_size=16)
    sc, z = minmax_qparams(*group_minmax(w, 16), 4, False)
    torch.testing.assert_close(balanced_fake_quant(w, torch.ones(32), scheme), fake_quantize(w, sc, z, 4, 16))


def test_exact_clip_never_worse_than_minmax():
    w = torch.randn(12, 72, generator=_gen()) * torch.linspace(0.2, 3, 72)
    x = torch.randn(200, 72, generator=_gen(1))
    x[:, 5] *= 30  # an outlier channel
    h = x.t() @ x / 200
    for sym in (False, True):
        scheme = QuantScheme(bits=3, group_size=32, sym=sym)
        scale, zero, which = exact_clip_qparams(w, h, scheme, grid=10, max_shrink=0.5)
        base_s, base_z = minmax_qparams(*group_minmax(w, 32), 3, sym)
        e_clip = group_output_error(fake_quantize(w, scale, zero, 3, 32) - w, h, 32)
        e_base = group_output_error(fake_quantize(w, base_s, base_z, 3, 32) - w, h, 32)
        assert (e_clip <= e_base + 1e-6).all() and e_clip.sum() < 0.9 * e_base.sum()
        assert which.shape == (12, 3) and int(which.max()) < (11 if sym else 21)


def test_shared_inputs_collected_once():
    model = tiny_model("llama")
    block = model.model.layers[0]
    h = torch.randn(2, 16, 80, generator=_gen())
    pos = torch.arange(16)[None]
    kw = {"position_embeddings": model.model.rotary_emb(h, pos)}
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]
    with torch.no_grad():
        stats = collect_input_stats(block, names, [(h, kw), (h, kw)])
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"] and stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    st = stats["self_attn.q_proj"]
    assert st.n == 64  # 2 batches x 2 x 16 tokens, counted once although 2 Linears read them
    x = block.input_layernorm(h).reshape(-1, 80)
    torch.testing.assert_close(st.h, x.t() @ x / 32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.mean_abs, x.abs().mean(dim=0), rtol=1e-4, atol=1e-5)


def _randomize_norms(model):
    g = _gen(7)
    with torch.no_grad():
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


class _BalanceOnly(AWQ):
    """AWQ's prepare_block without quantizing: apply returns the (balanced) float Linear."""

    def apply(self, name, module):
        return module


@pytest.mark.parametrize("family", FAMILIES)
def test_balancing_leaves_float_logits_unchanged(family):
    from llmsqueeze.engine import run_sequential

    model = tiny_model(family)
    _randomize_norms(model)
    ids = _calib(2, 24)
    with torch.no_grad():
        before = model(ids).logits
        norms_before = [p.clone() for n, p in model.named_parameters() if "norm" in n or "ln_" in n]
    names = [n for n, m in model.named_modules() if is_linear(m) and n.startswith(get_arch(model).blocks + ".")]
    method = _BalanceOnly(QuantScheme(bits=2, group_size=16), names, smooth_map_for(model))
    run_sequential(model, list(ids.split(1)), method, names, progress=False)
    with torch.no_grad():
        after = model(ids).logits
        norms_after = [p for n, p in model.named_parameters() if "norm" in n or "ln_" in n]
    assert method.alphas and any(a > 0 for a in method.alphas.values())  # 2 bits: balancing pays somewhere
    assert any(not torch.equal(a, b) for a, b in zip(norms_after, norms_before))  # scales were folded
    # float32 rounding of the rescaled weights only
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _block0_output_error(model, ref, ids):
    """Relative error of decoder block 0's output (both fed the float embeddings)."""
    outs = {}

    def grab(key):
        def hook(m, a, o):
            outs[key] = o[0] if isinstance(o, tuple) else o
        return hook

    hs = [model.model.layers[0].register_forward_hook(grab("q")), ref.model.layers[0].register_forward_hook(grab("r"))]
    with torch.no_grad():
        model(ids), ref(ids)
    for h in hs:
        h.remove()
    with torch.no_grad():
        return float((outs["q"] - outs["r"]).norm() / (outs["r"] - ref.model.embed_tokens(ids)).norm())


@pytest.mark.parametrize("clip", [False, True])
def test_awq_beats_rtn_with_an_outlier_channel(clip):
    ref = outlier_llama(20.0)
    ids = torch.randint(3, 64, (2, 32), generator=_gen(9))
    scheme = QuantScheme(bits=3, group_size=32, clip_search=clip)
    rtn = llmsqueeze.quantize(outlier_llama(20.0), QuantScheme(bits=3, group_size=32, clip_search=False), progress=False)
    awq = llmsqueeze.quantize(outlier_llama(20.0), scheme, data=_calib(), method="awq", progress=False)
    e_rtn, e_awq = _block0_output_error(rtn, ref, ids), _block0_output_error(awq, ref, ids)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    qc = awq.config.quantization_config
    assert qc["method"] == "awq" and qc["method_args"]["awq"]["then"] == "rtn"
    alphas = qc["method_args"]["awq"]["alphas"]
    assert len(alphas) == 8 and all(0 <= a <= 1 for a in alphas.values())  # 4 groups x 2 blocks
    assert isinstance(awq.model.layers[0].mlp.down_proj, QuantLinear)


def test_awq_then_gptq_and_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = llmsqueeze.quantize(outlier_llama(20.0), QuantScheme(bits=4, group_size=32), data=_calib(),
                                method="awq-gptq", progress=False)
    qc = model.config.quantization_config
    assert qc["method"] == "awq" and qc["method_args"]["awq"]["then"] == "gptq" and qc["method_args"]["act_order"]
    ids = torch.randint(3, 64, (1, 20), generator=_gen(2))
    with torch.no_grad():
        before = model(ids).logits
    llmsqueeze.save_quantized(model, tmp_path / "q")
    for loaded in (llmsqueeze.from_pretrained(tmp_path / "q"), AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, before)


def test_awq_rtn_round_trip(tmp_path):
    model = llmsqueeze.quantize(tiny_model("gpt2"), QuantScheme(bits=4, group_size=32), data=_calib(),
                                method="awq", progress=False)
    ids = torch.randint(3, 64, (1, 20), generator=_gen(2))
    with torch.no_grad():
        before = model(ids).logits
    llmsqueeze.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(llmsqueeze.from_pretrained(tmp_path / "q")(ids).logits, before)


def test_errors_are_one_line(monkeypatch):
    monkeypatch.delitem(SMOOTH_MAPS, "llama")
    with pytest.raises(LlmsqueezeError, match="AWQ has no norm -> Linear table for model type 'llama'"):
        llmsqueeze.quantize(tiny_model("llama"), QuantScheme(), data=_calib(), method="awq", progress=False)
    monkeypatch.undo()
    with pytest.raises(LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(tiny_model("llama"), QuantScheme(), method="awq", progress=False)
    with pytest.raises(LlmsqueezeError, match="runs in memory"):
        llmsqueeze.quantize_lazy("unused", "unused", QuantScheme(), method="awq")


def test_cli_awq(tiny_model_dir, text_file, tmp_path, capsys):
    from llmsqueeze.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--method", "awq-gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(text_file), "--n-samples", "2", "--seq-len", "16", "--out", str(out)]) == 0
    qc = llmsqueeze.from_pretrained(out).config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["method"] == "awq" and qc["method_args"]["awq"]["then"] == "gptq"


def test_gptq_gets_the_balanced_hessians(monkeypatch):
    """AWQ hands GPTQ the Hessians of the balanced inputs instead of a second pass: the same codes
    as the pass would give, up to the float rounding of the rescaling (a few codes of ~16k)."""
    from llmsqueeze.quant import awq as awq_mod

    ids = _calib()
    scheme = QuantScheme(bits=4, group_size=32)
    handed = llmsqueeze.quantize(tiny_model("llama"), scheme, data=ids, method="awq-gptq", progress=False)
    init = awq_mod.AWQ.__init__

    def collecting(self, *a, **k):
        init(self, *a, **k)
        self.collect_inputs = True  # the engine's pass over the balanced block

    monkeypatch.setattr(awq_mod.AWQ, "__init__", collecting)
    collected = llmsqueeze.quantize(tiny_model("llama"), scheme, data=ids, method="awq-gptq", progress=False)
    qa = [m.qweight for m in handed.modules() if isinstance(m, QuantLinear)]
    qb = [m.qweight for m in collected.modules() if isinstance(m, QuantLinear)]
    differ = sum(int((a != b).sum()) for a, b in zip(qa, qb))
    assert len(qa) == 14 and differ <= 0.002 * sum(a.numel() for a in qa), differ

"""Quantization-aware training: STE gradients, learned scales, convert -> packed checkpoint."""
import pytest
import torch
from conftest import tiny_llama

import llmsqueeze
from llmsqueeze import LlmsqueezeError
from llmsqueeze.nn import QuantLinear
from llmsqueeze.quant.grid import fake_quantize, group_minmax, minmax_qparams
from llmsqueeze.quant.qat import FakeQuantLinear, convert, prepare_qat, round_ste

G = 32


def test_round_ste_is_identity_in_backward():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))  # exact: x + (round(x) - x) == round(x) in float32
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("sym", [False, True])
def test_fake_quant_forward_and_ste_gradient(sym):
    torch.manual_seed(0)
    lin = torch.nn.Linear(80, 48)  # 80 inputs with group 32: a shorter last group
    scheme = llmsqueeze.QuantScheme(bits=3, group_size=G, sym=sym)
    fq = FakeQuantLinear(lin, scheme)
    wq = fq.fake_quant()
    wmin, wmax = group_minmax(lin.weight.detach(), G)
    scale, zero = minmax_qparams(wmin, wmax, 3, sym)
    assert torch.equal(wq.detach(), fake_quantize(lin.weight.detach(), scale, zero, 3, G))  # same grid as RTN
    # min/max ranges hold every weight (no clipping, up to symmetric's lowest level), so the STE gradient
    # of sum(W_q * R) w.r.t. W is R itself: identity inside the range
    r = torch.randn_like(wq)
    (wq * r).sum().backward()
    assert torch.equal(lin.weight.grad, r)


def test_ste_gradient_is_zero_where_clipped():
    lin = torch.nn.Linear(32, 4, bias=False)
    fq = FakeQuantLinear(lin, llmsqueeze.QuantScheme(bits=2, group_size=G), learn_scale=True)
    with torch.no_grad():
        lin.weight[0, 0] = 100.0  # far beyond the learned range fixed at init
    fq.fake_quant().sum().backward()
    assert lin.weight.grad[0, 0] == 0 and lin.weight.grad[1:].eq(1).all()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0  # LSQ: the scale learns


@pytest.mark.parametrize("learn_scale", [False, True])
def test_prepare_train_convert_roundtrip(learn_scale, tmp_path):
    model = tiny_llama()
    prepare_qat(model, bits=4, group_size=G, learn_scale=learn_scale)
    fakes = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fakes) == 14  # 7 Linears in each of the 2 blocks; the head stays dense
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    before = {n: m.weight.detach().clone() for n, m in fakes.items()}
    for _ in range(3):
        ids = torch.randint(3, 64, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], m.weight) for n, m in fakes.items())  # trained through the STE
    model.eval()
    ids = torch.tensor([[1, 5, 9, 12, 3, 40]])
    with torch.no_grad():
        fake_logits = model(ids).logits
        wq = {n: m.fake_quant() for n, m in fakes.items()}
    convert(model)
    assert model.config.quantization_config["method"] == "qat"
    for n, w in wq.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, QuantLinear)
        assert torch.equal(layer.dequantize_weight(), w)  # bit for bit
    with torch.no_grad():
        logits = model(ids).logits
    # same weights; only the matmul kernel differs (F.linear vs dequantize + matmul): float32 rounding
    torch.testing.assert_close(logits, fake_logits, rtol=1e-5, atol=1e-5)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = llmsqueeze.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_qat_bad_input():
    model = tiny_llama()
    with pytest.raises(LlmsqueezeError, match="bits=5"):
        prepare_qat(model, bits=5)
    with pytest.raises(LlmsqueezeError, match="prepare_qat"):
        convert(model)
    prepare_qat(model, bits=4, group_size=G)
    with pytest.raises(LlmsqueezeError, match="already applied"):
        prepare_qat(model, bits=4, group_size=G)

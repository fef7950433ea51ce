"""Mixed precision: allocation under a bits-per-weight budget, per-layer checkpoints, info, CLI, exports."""
import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError
from llmsqueeze.cli import main
from llmsqueeze.info import checkpoint_info, format_info
from llmsqueeze.mixed import allocate_bits, layer_bits_cost, measure_sensitivity
from llmsqueeze.nn import QuantLinear

G = 32


def _data(n=4, t=32, vocab=64):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def test_allocation_meets_budget_and_prefers_sensitive_layers():
    scheme = llmsqueeze.QuantScheme(group_size=64)
    names = [f"l{i}" for i in range(6)]
    costs = {n: {b: layer_bits_cost(256, 256, b, scheme) for b in (2, 3, 4, 8)} for n in names}
    weights = {n: 256 * 256 for n in names}
    # error halves per extra bit (x4 per bit in squared error); layer l0 is 100x more sensitive
    errors = {n: {b: (100.0 if n == "l0" else 1.0) * 4.0 ** -b for b in (2, 3, 4, 8)} for n in names}
    for avg in (2.4, 3.0, 3.5, 4.2, 5.0):
        choice = allocate_bits(errors, costs, weights, avg)
        spent = sum(costs[n][choice[n]] for n in names) / sum(weights.values())
        assert spent <= avg + 1e-12
        assert choice["l0"] == max(choice.values())  # the sensitive layer is never below another
        # no single upgrade still fits: the budget is used up to one step
        assert all(spent + (costs[n][b] - costs[n][choice[n]]) / sum(weights.values()) > avg
                   for n in names for b in costs[n] if b > choice[n])
    # the dearest and cheapest budgets are exactly all-8 / all-2
    hi = sum(costs[n][8] for n in names) / sum(weights.values())
    assert set(allocate_bits(errors, costs, weights, hi).values()) == {8}
    with pytest.raises(LlmsqueezeError, match=r"avg_bits=1.5 is outside .* bits per weight"):
        allocate_bits(errors, costs, weights, 1.5)


def test_allocation_matches_brute_force():
    import itertools

    scheme = llmsqueeze.QuantScheme(group_size=32)
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (64, 96), "b": (160, 96), "c": (96, 160), "d": (32, 64)}
    costs = {n: {b: layer_bits_cost(*s, b, scheme) for b in (2, 3, 4)} for n, s in shapes.items()}
    weights = {n: s[0] * s[1] for n, s in shapes.items()}
    errors = {n: dict(zip((2, 3, 4), sorted(torch.rand(3, generator=g).tolist(), reverse=True))) for n in shapes}
    total = sum(weights.values())
    for avg in (2.6, 3.0, 3.3, 3.9):
        best = min((sum(errors[n][b] for n, b in zip(shapes, bs)), bs) for bs in itertools.product((2, 3, 4), repeat=4)
                   if sum(costs[n][b] for n, b in zip(shapes, bs)) <= avg * total)
        choice = allocate_bits(errors, costs, weights, avg)
        got = sum(errors[n][choice[n]] for n in shapes)
        assert got <= best[0] * 1.25  # Lagrangian + greedy fill: near the optimum on a small problem


def test_sensitivity_orders_bits():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    table = measure_sensitivity(model, names, _data(), llmsqueeze.QuantScheme(group_size=G), progress=False)
    assert set(table) == set(names)
    assert all(t[2] > t[3] > t[4] > t[8] >= 0 for t in table.values())
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in names)  # still dense


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mixed_checkpoint_roundtrip(method, tmp_path):
    model = tiny_llama()
    llmsqueeze.quantize(model, group_size=G, data=_data(), method=method, avg_bits=4.0, progress=False)
    qc = model.config.quantization_config
    assert qc["format_version"] == 3 and qc["layer_schemes"]
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(set(bits.values())) > 1
    assert all(bits[n] == o["bits"] for n, o in qc["layer_schemes"].items())
    out = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    loaded = llmsqueeze.from_pretrained(out)
    assert {n: m.bits for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == bits
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    info = checkpoint_info(out)
    assert info["bits_per_quantized_weight"] <= 4.0 + 1e-9
    assert abs(info["bits_per_quantized_weight"] - qc["method_args"]["bits_per_weight"]) < 1e-9  # cost model = disk
    assert sum(h["layers"] for h in info["bits_histogram"].values()) == len(bits)
    text = format_info(info)
    assert "mixed-precision" in text and "bit widths" in text and "budget 4.0" in text

    with pytest.raises(LlmsqueezeError, match="mixed precision"):
        llmsqueeze.export(out, "gptq", tmp_path / "x")
    with pytest.raises(LlmsqueezeError, match="mixed precision"):
        llmsqueeze.export(out, "compressed-tensors", tmp_path / "y")


def test_mixed_config_that_lies_is_refused(tmp_path):
    model = tiny_llama()
    llmsqueeze.quantize(model, group_size=G, data=_data(), avg_bits=4.0, progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name, over = next(iter(cfg["quantization_config"]["layer_schemes"].items()))
    cfg["quantization_config"]["layer_schemes"][name] = {"bits": 8 if over["bits"] != 8 else 2}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"layer {name} stores .*config.json says"):
        llmsqueeze.check_checkpoint(out)
    cfg["quantization_config"]["layer_schemes"][name] = {"bits": 5}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bits=5"):
        llmsqueeze.check_checkpoint(out)


def test_bad_budget_is_one_line():
    model = tiny_llama()
    with pytest.raises(LlmsqueezeError, match=r"avg_bits=1.0 is outside .*choose a budget"):
        llmsqueeze.quantize(model, group_size=G, data=_data(), avg_bits=1.0, progress=False)
    with pytest.raises(LlmsqueezeError, match=r"avg_bits=9.0 is outside"):
        llmsqueeze.quantize(model, group_size=G, data=_data(), avg_bits=9.0, bit_candidates=(2, 8), progress=False)
    with pytest.raises(LlmsqueezeError, match="needs calibration data"):
        llmsqueeze.quantize(model, group_size=G, avg_bits=3.5, progress=False)
    with pytest.raises(LlmsqueezeError, match="bit candidates"):
        llmsqueeze.quantize(model, group_size=G, data=_data(), avg_bits=3.5, bit_candidates=(3, 5), progress=False)


def test_cli_avg_bits(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_model_dir), "--avg-bits", "3.5", "--group-size", "32", "--calib", str(text_file),
               "--n-samples", "4", "--seq-len", "32", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["bits_per_weight"] <= 3.5 and report["layers"][0]["error"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "bit widths" in capsys.readouterr().out
    rc = main(["quantize", str(tiny_model_dir), "--avg-bits", "1", "--calib", str(text_file), "--n-samples", "4",
               "--seq-len", "32", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "outside" in err


def test_lm_head_is_refused():
    model = tiny_llama()
    with pytest.raises(LlmsqueezeError, match="drop --lm-head"):
        llmsqueeze.quantize(model, group_size=G, lm_head=True, data=_data(), avg_bits=3.5, progress=False)


def test_relative_sensitivity_is_scale_free():
    """The default (relative) error of a layer does not change when its weight is scaled: layers with
    large outputs (late blocks) are not made to look sensitive by their scale alone."""
    from llmsqueeze.mixed import Sensitivity

    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(100, 64)
    tables = []
    for c in (1.0, 1000.0):
        lin = torch.nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w * c)
        s = Sensitivity(llmsqueeze.QuantScheme(group_size=G), (2, 4))
        s.collect("a", lin, x)
        assert s.apply("a", lin) is lin
        tables.append(s.table["a"])
    for b in (2, 4):  # equal up to the fp16 rounding of the scales
        assert tables[0][b] == pytest.approx(tables[1][b], rel=1e-2)
    assert tables[0][2] > tables[0][4]

"""Features from separate branches used together: non-uniform grids, mixed precision, AWQ, autoround,
lazy quantization and QAT. Every combination that does not work together is one line, up front."""
import json
import re

import pytest
import torch
from conftest import tiny_llama

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError, QuantScheme
from llmsqueeze.cli import main
from llmsqueeze.methods import LAZY_METHODS, METHODS, resolve_scheme
from llmsqueeze.nn import LUTLinear, QuantLinear


def _data(n=4, t=32, vocab=64):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def test_every_method_is_known():
    assert METHODS == ("rtn", "gptq", "awq", "awq-gptq", "autoround")
    assert set(LAZY_METHODS) <= set(METHODS)


@pytest.mark.parametrize("method,clip", [("rtn", False), ("gptq", True), ("awq", True), ("awq-gptq", True),
                                         ("autoround", False)])
def test_clip_search_auto_per_method(method, clip):
    assert resolve_scheme(QuantScheme(), method).clip_search is clip
    assert resolve_scheme(QuantScheme(grid="nf"), method).clip_search is False  # never on a non-uniform grid
    assert resolve_scheme(QuantScheme(clip_search=not clip), method).clip_search is (not clip)  # explicit wins


@pytest.mark.parametrize("method", ["awq", "awq-gptq", "autoround"])
def test_uniform_only_methods_refuse_a_grid(method):
    model = tiny_llama()
    with pytest.raises(LlmsqueezeError, match=f"method '{method}' quantizes on the uniform grid") as e:
        llmsqueeze.quantize(model, QuantScheme(grid="nf", group_size=32), data=_data(), method=method, progress=False)
    assert "\n" not in str(e.value)
    assert all(not isinstance(m, (QuantLinear, LUTLinear)) for m in model.modules())  # nothing was done


@pytest.mark.parametrize("method", ["awq", "awq-gptq", "autoround"])
def test_avg_bits_refuses_other_methods(method):
    with pytest.raises(LlmsqueezeError, match=f"avg_bits .*not method '{method}'"):
        llmsqueeze.quantize(tiny_llama(), group_size=32, data=_data(), method=method, avg_bits=3.5, progress=False)


@pytest.mark.parametrize("grid", ["nf", "kmeans"])
def test_avg_bits_refuses_a_grid(grid):
    with pytest.raises(LlmsqueezeError, match=f"avg_bits mixes widths on the uniform grid; grid='{grid}'"):
        llmsqueeze.quantize(tiny_llama(), QuantScheme(grid=grid, group_size=32), data=_data(), avg_bits=3.5,
                            progress=False)


@pytest.mark.parametrize("method", ["awq", "awq-gptq", "autoround"])
def test_lazy_refuses_in_memory_methods(method):
    with pytest.raises(LlmsqueezeError, match=f"method '{method}' runs in memory, not lazily"):
        llmsqueeze.quantize_lazy("unused", "unused", QuantScheme(), method=method)


def test_qat_refuses_a_grid():
    from llmsqueeze.quant.qat import prepare_qat

    with pytest.raises(LlmsqueezeError, match="QAT trains on the uniform grid"):
        prepare_qat(tiny_llama(), QuantScheme(grid="nf", group_size=32))


def test_mixed_checkpoint_with_a_grid_is_refused(tmp_path):
    model = tiny_llama()
    llmsqueeze.quantize(model, group_size=32, data=_data(), avg_bits=4.0, progress=False)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    assert model.config.quantization_config["format_version"] == 3
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["scheme"]["grid"] = "nf"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layer_schemes .*applies to the uniform grid"):
        llmsqueeze.check_checkpoint(out)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_grid_checkpoint_roundtrip_reads_as_format_1(method, tmp_path):
    """Non-uniform grids need no new format version: a plain checkpoint with "grid" in its scheme."""
    model = tiny_llama()
    llmsqueeze.quantize(model, QuantScheme(grid="kmeans", bits=3, group_size=32), data=_data(), method=method,
                        progress=False)
    qc = model.config.quantization_config
    assert qc["format_version"] == 1 and qc["scheme"]["grid"] == "kmeans" and not qc["scheme"]["clip_search"]
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    loaded = llmsqueeze.from_pretrained(out)
    assert any(isinstance(m, LUTLinear) for m in loaded.modules())
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("extra,match", [
    (["--grid", "nf", "--method", "awq"], "method 'awq' quantizes on the uniform grid"),
    (["--grid", "kmeans", "--method", "autoround"], "method 'autoround' quantizes on the uniform grid"),
    (["--grid", "nf", "--avg-bits", "3.5"], "avg_bits mixes widths on the uniform grid"),
    (["--method", "awq-gptq", "--avg-bits", "3.5"], "avg_bits .* not method 'awq-gptq'"),
    (["--scheme", "w8a8", "--grid", "nf"], "--grid nf is an integer weight-only option"),
    (["--avg-bits", "3.5", "--resume", "--calib", "CALIB"], "--avg-bits runs in memory"),
])
def test_cli_refuses_combinations_in_one_line(extra, match, tmp_path, capsys):
    # a model that does not exist: the refusal comes before anything is loaded or written
    out = tmp_path / "q"
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text\n" * 50)
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    rc = main(["quantize", str(tmp_path / "no-such-model"), "--bits", "4", *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not out.exists()

"""`llmsqueeze prune`: end to end on a tiny model, and every bad input as one line with no output."""
import json

import pytest

from llmsqueeze.cli import main


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error:") and "\n" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("args", [
    ["--method", "sparsegpt", "--pattern", "2:4"],
    ["--method", "wanda", "--sparsity", "0.5", "--bits", "4", "--group-size", "32"],
    ["--method", "magnitude", "--sparsity", "0.3", "--scope", "global"],
    ["--method", "sparsegpt", "--sparsity", "0.5", "--no-refit"],
    ["--method", "wanda", "--pattern", "2:4", "--refit"],
])
def test_prune_info_eval(tiny_model_dir, text_file, tmp_path, capsys, args):
    out = tmp_path / "p"
    calib = ["--calib", str(text_file), "--n-samples", "4", "--seq-len", "32", "--quiet"]
    assert main(["prune", str(tiny_model_dir), *args, *calib, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 14 and info["sparsity"]["layers"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    if "--method" in args and args[args.index("--method") + 1] in ("wanda", "sparsegpt"):
        # sparsegpt refits where calibrated enough ("auto") unless --no-refit; wanda only with --refit
        want = True if "--refit" in args else False if "--no-refit" in args or args[1] == "wanda" else "auto"
        assert config["method_args"]["refit"] == want
    assert main(["eval", "ppl", str(out), "--data", str(text_file), "--seq-len", "32", "--windows", "2"]) == 0


@pytest.mark.parametrize("args, needle", [
    (["--sparsity", "1.0"], "must lie in [0, 1)"),
    (["--sparsity", "-0.1"], "must lie in [0, 1)"),
    (["--pattern", "4:4"], "1 <= N < M"),
    (["--pattern", "2:64"], "divisible by 64"),
    (["--pattern", "2:4", "--sparsity", "0.5"], "exactly one of"),
    ([], "exactly one of"),
    (["--method", "obs", "--sparsity", "0.5"], "not available"),
    (["--sparsity", "0.5", "--bits", "5"], "bits=5"),
    (["--structured", "--mlp-ratio", "0.001"], "no channel"),
    (["--structured", "--mlp-ratio", "1.5"], "mlp-ratio"),
    (["--structured", "--attn-ratio", "0"], "attn-ratio"),
    (["--sparsity", "0.5", "--refit"], "refit"),
])
def test_prune_bad_input(tiny_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", *args, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prune_structured_cli(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["prune", str(tiny_model_dir), "--structured", "--mlp-ratio", "0.5", "--attn-ratio", "0.5",
                 "--calib", str(text_file), "--n-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 80 and cfg["num_key_value_heads"] == 1 and "quantization_config" not in cfg

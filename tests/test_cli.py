"""The command line, in-process (main(argv)) and once through the installed console script."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmsqueeze.cli import main


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error:") and "\n" not in err, err
    assert needle in err, err
    return err


def test_quantize_info_eval(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "64", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4-bit group 64 asym" in text and "bits/weight" in text and "on disk" in text

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 14  # 7 Linears in each of 2 Llama blocks
    # 4 bits + fp16 scale and 4-bit zero per 64 weights (the last group of 96 inputs is shorter)
    assert 4.0 < info["bits_per_quantized_weight"] < 4.6
    assert info["bytes_on_disk"] < info["dense_bytes"]

    res = tmp_path / "ppl.json"
    assert main(["eval", "ppl", str(out), "--data", str(text_file), "--seq-len", "32", "--windows", "3",
                 "--json", str(res)]) == 0
    assert "perplexity" in capsys.readouterr().out
    r = json.loads(res.read_text())
    assert r["windows"] == 3 and r["ppl"] > 1

    assert main(["eval", "ppl", str(tiny_model_dir), "--data", str(text_file), "--seq-len", "32", "--windows", "3"]) == 0
    assert main(["eval", "latency", str(out), "--prompt-len", "8", "--new-tokens", "4"]) == 0
    assert "decode" in capsys.readouterr().out


def test_sym_per_channel_clip_lm_head(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "3", "--group-size", "-1", "--sym", "--clip-search",
                 "--lm-head", "--exclude", "down_proj", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scheme"]["sym"] and info["scheme"]["clip_search"] and info["scheme"]["group_size"] == -1
    names = {layer["name"] for layer in info["layers"]}
    assert "lm_head" in names and not any("down_proj" in n for n in names)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bits", "5"], "bits=5 is not supported: use one of 2, 3, 4, 8"),
        (["--group-size", "0"], "group_size=0 is not valid"),
        (["--method", "magic"], "method 'magic' is not available"),
    ],
)
def test_bad_scheme_exit_2_no_output(tiny_model_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), *args, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_model_exit_2(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "q")]) == 2
    _one_line_error(capsys, "no such directory")
    assert not (tmp_path / "q").exists()


def test_non_empty_out_then_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["quantize", str(tiny_model_dir), "--out", str(out)]) == 2
    _one_line_error(capsys, "pass --overwrite")
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "x").exists()


def test_info_on_bad_checkpoints(tiny_model_dir, tmp_path, capsys):
    assert main(["info", str(tiny_model_dir)]) == 2
    _one_line_error(capsys, "is not quantized")
    assert main(["info", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "no such directory")


def test_eval_bad_data(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--data", "/no/such.txt"]) == 2
    _one_line_error(capsys, "no such file")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err


def test_console_script(tiny_model_dir, tmp_path):
    # the script installed beside this interpreter (a venv run without activation), else the one on PATH
    exe = shutil.which("llmsqueeze", path=str(Path(sys.executable).parent)) or shutil.which("llmsqueeze")
    assert exe, "the console script is installed with the package"
    r = subprocess.run([exe, "quantize", str(tiny_model_dir), "--bits", "5", "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bits=5" in r.stderr
    assert not (tmp_path / "q").exists()


def test_quantize_gptq(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--calib", str(text_file), "--n-samples", "4",
                 "--seq-len", "32", "--act-order", "dynamic", "--true-sequential", "--out", str(out)]) == 0
    assert "gptq: 14 layers in 2 blocks" in capsys.readouterr().err
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "gptq"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["method_args"]["act_order"] and not cfg["method_args"]["static_groups"]
    assert cfg["method_args"]["n_samples"] == 4


@pytest.mark.parametrize("compute, log_line", [("float32", "compute in torch.float32"), ("model", None)])
def test_quantize_compute_dtype(tiny_model_dir, text_file, tmp_path, caplog, compute, log_line):
    """--compute-dtype: a bfloat16 model's blocks calibrate in float32 when asked, in bfloat16 under "model"."""
    caplog.set_level("INFO", logger="llmsqueeze")
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--calib", str(text_file), "--n-samples", "2",
                 "--seq-len", "16", "--dtype", "bfloat16", "--compute-dtype", compute, "--no-lazy",
                 "--out", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if "compute in" in r.getMessage()]
    assert (said and log_line in said[0]) if log_line else not said


def test_quantize_gptq_bad_calib(tiny_model_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--calib", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "g")]) == 2
    _one_line_error(capsys, "no such file")
    (tmp_path / "ds").mkdir()  # a dir that is no datasets dir (and not around --out, which may not lie in an input)
    assert main(["quantize", str(tiny_model_dir), "--method", "gptq", "--calib", str(tmp_path / "ds"),
                 "--out", str(tmp_path / "g")]) == 2
    _one_line_error(capsys, "not a datasets directory")


def test_quantize_gptq_bad_device_fails_before_loading(text_file, tmp_path, capsys):
    # the model path does not exist: the device error must come first, before any slow loading
    assert main(["quantize", str(tmp_path / "no-model"), "--method", "gptq", "--calib", str(text_file),
                 "--device", "gpu", "--out", str(tmp_path / "g")]) == 2
    _one_line_error(capsys, "'gpu' is not a device")
    assert not (tmp_path / "g").exists()

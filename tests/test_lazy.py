"""Lazy, block-by-block quantization straight to disk: equal to the in-memory path tensor for tensor,
resumable after a kill bit for bit, and refusing bad input (truncated shards, mismatched resumes,
too little disk or memory) with one line before any work."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAMILIES, interrupt_after_block, tiny_llama, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError, QuantScheme
from llmsqueeze.cli import main
from llmsqueeze.pipeline import STOP_AFTER_BLOCK_ENV, quantize_lazy


def _save(d, tie=False, layers=3):
    tiny_llama(layers=layers, tie_word_embeddings=tie).save_pretrained(d, max_shard_size="40KB")  # several shards
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("lazy-src"), layers=4)


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _files(d):
    """Every file's bytes: a resumed run must write exactly what an uninterrupted one does."""
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def _calib(n=4, t=24):
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, tie, lm_head", [("rtn", False, False), ("rtn", True, True), ("gptq", True, False),
                                                  ("gptq", False, False)])
def test_lazy_equals_in_memory(method, tie, lm_head, tmp_path):
    src = _save(tmp_path / "src", tie=tie)
    scheme = QuantScheme(bits=4, group_size=32, lm_head=lm_head)
    data = _calib() if method == "gptq" else None
    ref = llmsqueeze.load_dense(str(src))
    llmsqueeze.quantize(ref, scheme, data=data, method=method, progress=False)
    a = llmsqueeze.save_quantized(ref, tmp_path / "ref", max_shard_size="30KB")
    b, stats = quantize_lazy(str(src), tmp_path / "lazy", scheme, data=data, method=method, progress=False,
                             max_shard_size="30KB")
    assert stats.blocks == 3
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert len(list(b.glob("model-*.safetensors"))) > 1 and (b / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lazy", "ref", "src"]  # no .partial left
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(b)(ids).logits, ref(ids).logits)


def test_single_shard_and_bf16(tmp_path):
    src = tmp_path / "src"
    tiny_llama(layers=2).to(torch.bfloat16).save_pretrained(src)
    out, _ = quantize_lazy(str(src), tmp_path / "q", QuantScheme(bits=4, group_size=32), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    t = load_file(out / "model.safetensors")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_truncated_or_incomplete_shards_refused_before_any_work(model_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(model_dir, src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        quantize_lazy(str(src), tmp_path / "q", QuantScheme(), progress=False)
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):  # the in-memory path checks too
        llmsqueeze.load_dense(str(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    shard.write_bytes(data)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names model.layers.0.mlp.up_proj.weight in .*which does not hold it"):
        quantize_lazy(str(src), tmp_path / "q", QuantScheme(), progress=False)


def _cli(model_dir, out, text_file, *extra):
    return ["quantize", str(model_dir), "--method", "gptq", "--calib", str(text_file), "--n-samples", "4",
            "--seq-len", "16", "--bits", "4", "--group-size", "32", "--max-shard-size", "30KB", "--out", str(out),
            *extra]


def _spawn(args, **env):
    return subprocess.Popen([sys.executable, "-m", "llmsqueeze.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as the spawned ones do (OMP_NUM_THREADS=1): float reductions
    (the Hessian's matmuls) are blocked by the thread count, and GPTQ's rounding and clipping choices
    can flip on the last bit, so bit-identity holds between runs with the same thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clean_run(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "q"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as every other run here (see one_thread)
    try:
        assert main(_cli(model_dir, out, text_file)) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_killed_run_resumes_bit_identical(model_dir, text_file, clean_run, tmp_path, capsys):
    out = tmp_path / "q"
    p = _spawn(_cli(model_dir, out, text_file), **{STOP_AFTER_BLOCK_ENV: "1"})  # SIGKILL once block 1 is saved
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err
    partial = tmp_path / "q.partial"
    assert not out.exists() and json.loads((partial / "manifest.json").read_text())["blocks_done"] == 2

    # a resume with another scheme, or other calibration data, is refused in one line
    assert main(_cli(model_dir, out, text_file, "--resume", "--bits", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "used another scheme" in err
    assert main(_cli(model_dir, out, text_file, "--resume", "--seed", "1")) == 2
    assert "used another calibration data" in capsys.readouterr().err
    assert main(_cli(model_dir, out, text_file)) == 2  # neither --resume nor --overwrite
    assert "pass --resume to continue it" in capsys.readouterr().err

    assert main(_cli(model_dir, out, text_file, "--resume")) == 0
    assert _files(out) == _files(clean_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_sigterm_leaves_a_resumable_run(model_dir, text_file, clean_run, tmp_path):
    out = tmp_path / "q"
    p = _spawn(_cli(model_dir, out, text_file), LLMSQUEEZE_TEST_BLOCK_DELAY="1.5")
    manifest = tmp_path / "q.partial" / "manifest.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if manifest.is_file() and json.loads(manifest.read_text())["blocks_done"] >= 1:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llmsqueeze: interrupted after") and "--resume" in last, err
    assert not out.exists()
    p = _spawn(_cli(model_dir, out, text_file, "--resume"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert _files(out) == _files(clean_run)


def test_rtn_resume_and_overwrite(model_dir, tmp_path, monkeypatch):
    """RTN runs through the same engine (no data): killed by an exception after block 2, resumed."""
    scheme = QuantScheme(bits=3, group_size=32)
    ref, _ = quantize_lazy(str(model_dir), tmp_path / "ref", scheme, progress=False, max_shard_size="30KB")
    undo = interrupt_after_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match="after 3 of 4 blocks.*--resume"):
        quantize_lazy(str(model_dir), tmp_path / "q", scheme, progress=False, max_shard_size="30KB")
    undo()
    out, stats = quantize_lazy(str(model_dir), tmp_path / "q", scheme, progress=False, max_shard_size="30KB",
                               resume=True)
    assert stats.layers == 7  # only the last block was left
    assert _files(out) == _files(ref)
    with pytest.raises(LlmsqueezeError, match="no interrupted run"):
        quantize_lazy(str(model_dir), tmp_path / "q2", scheme, progress=False, resume=True)


def test_disk_and_memory_checks(model_dir, tmp_path, monkeypatch):
    import shutil as sh

    from llmsqueeze import lazy

    real = sh.disk_usage
    monkeypatch.setattr(lazy.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(LlmsqueezeError, match=r"needs about 0\.0 GiB on disk .* has 0\.0 GiB free"):
        quantize_lazy(str(model_dir), tmp_path / "q", QuantScheme(), progress=False)
    monkeypatch.setattr(lazy.shutil, "disk_usage", real)
    monkeypatch.setattr(lazy, "available_memory", lambda dev: 10_000)
    with pytest.raises(LlmsqueezeError, match=r"needs one block on cpu: .* but only 0\.0 GiB is free"):
        quantize_lazy(str(model_dir), tmp_path / "q", QuantScheme(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_no_lazy_and_fallback(model_dir, tmp_path, capsys):
    assert main(["quantize", str(model_dir), "--no-lazy", "--resume", "--out", str(tmp_path / "q")]) == 2
    assert "--resume continues a lazy run" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--no-lazy", "--group-size", "32", "--out", str(tmp_path / "a")]) == 0
    assert main(["quantize", str(model_dir), "--group-size", "32", "--out", str(tmp_path / "b")]) == 0
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_gptq_on_every_architecture(family, tmp_path):
    """Block paths, GPT-2's Conv1D, tied heads, and GPT-NeoX's renamed head (embed_out on disk)."""
    tiny_model(family).save_pretrained(tmp_path / "src")
    scheme, data = QuantScheme(bits=4, group_size=32), _calib(t=16)
    ref = llmsqueeze.load_dense(str(tmp_path / "src"))
    llmsqueeze.quantize(ref, scheme, data=data, method="gptq", progress=False)
    a = llmsqueeze.save_quantized(ref, tmp_path / "ref")
    b, _ = quantize_lazy(str(tmp_path / "src"), tmp_path / "lazy", scheme, data=data, method="gptq", progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

"""Checkpoint format, the temp-dir-then-rename save, and every bad input the core issue names."""
import json
import os

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors import safe_open

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError
from llmsqueeze.api import load_dense


@pytest.fixture
def quantized(tmp_path):
    model = tiny_model("llama")
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    return model


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_checkpoint_format(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q", tokenizer=tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "llmsqueeze" and qc["format_version"] == 1 and qc["method"] == "rtn"
    assert qc["scheme"]["bits"] == 4 and qc["scheme"]["group_size"] == 32
    assert "lm_head" in qc["modules_to_not_convert"]
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.layers.0.mlp.down_proj.qzeros" in keys
    assert _listing(tmp_path) == ["q"]  # no temp dir left beside it


def test_sharded_save_and_missing_shard(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q", max_shard_size="20KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.equal(llmsqueeze.from_pretrained(out)(ids).logits, quantized(ids).logits)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shards[1].name}.*re-create"):
        llmsqueeze.from_pretrained(out)


def test_truncated_safetensors(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        llmsqueeze.from_pretrained(out)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        llmsqueeze.from_pretrained(out)


def test_corrupt_header(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q")
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt header"):
        llmsqueeze.check_checkpoint(out)


def test_checkpoint_from_another_tool(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq", "nbits": 4, "group_size": 128}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="made by another tool.*'hqq'.*imports gptq, awq, compressed-tensors"):
        llmsqueeze.from_pretrained(out)
    # a format we import, whose config does not match its tensors: one line, before any model is built
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="down_proj.scales has shape \\[5, 80\\], but a 144->80 layer .* needs \\[2, 80\\].*does not match"):
        llmsqueeze.from_pretrained(out)


def test_newer_format_version_and_missing_tensor(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="upgrade llmsqueeze"):
        llmsqueeze.from_pretrained(out)

    from safetensors.torch import load_file, save_file

    cfg["quantization_config"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(out / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.scales"]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj lacks scales"):
        llmsqueeze.from_pretrained(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        llmsqueeze.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        llmsqueeze.from_pretrained(tmp_path / "empty")


def test_dense_dir_is_not_a_quantized_checkpoint(tiny_model_dir):
    with pytest.raises(CheckpointError, match="is not quantized"):
        llmsqueeze.from_pretrained(tiny_model_dir)


def test_non_empty_out_refused_unless_overwrite(quantized, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LlmsqueezeError, match="not empty; pass --overwrite"):
        llmsqueeze.save_quantized(quantized, out)
    assert _listing(out) == ["keep.txt"]
    llmsqueeze.save_quantized(quantized, out, overwrite=True)
    assert "keep.txt" not in _listing(out) and "model.safetensors" in _listing(out)
    assert _listing(tmp_path) == ["q"]


def test_unwritable_out(quantized, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LlmsqueezeError, match="is a file, not a directory"):
        llmsqueeze.save_quantized(quantized, blocker / "q")
    with pytest.raises(LlmsqueezeError, match="cannot write in /proc"):
        llmsqueeze.save_quantized(quantized, "/proc/llmsqueeze-q")
    if os.geteuid() != 0:  # permission bits bind only non-root users; /proc above covers root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(LlmsqueezeError, match="cannot write"):
            llmsqueeze.save_quantized(quantized, ro / "q")


def test_failed_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantized, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        llmsqueeze.save_quantized(quantized, tmp_path / "deep" / "er" / "q")
    assert _listing(tmp_path) == []


def test_saving_a_dense_model_is_refused(tmp_path):
    with pytest.raises(LlmsqueezeError, match="not quantized"):
        llmsqueeze.save_quantized(tiny_model("llama"), tmp_path / "q")


def test_quantizing_twice_is_refused(quantized):
    with pytest.raises(LlmsqueezeError, match="already quantized"):
        llmsqueeze.quantize(quantized, progress=False)


def test_load_dense_errors(tmp_path, monkeypatch):
    with pytest.raises(LlmsqueezeError, match="no such directory"):
        load_dense(str(tmp_path / "missing"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(LlmsqueezeError, match="cannot load model 'nobody/no-such-model-xyz'.*check the name"):
        load_dense("nobody/no-such-model-xyz")
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(LlmsqueezeError, match="'bert' model, which is not a causal LM"):
        load_dense(str(bert))
    from transformers import T5Config

    t5 = tmp_path / "t5"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(t5)
    with pytest.raises(LlmsqueezeError, match="'t5' model, which is not a causal LM"):
        load_dense(str(t5))


def test_no_matching_layers():
    with pytest.raises(LlmsqueezeError, match="loosen the patterns"):
        llmsqueeze.quantize(tiny_model("llama"), include=["nothing-matches"], progress=False)


def test_invalid_scheme_in_checkpoint(quantized, tmp_path):
    out = llmsqueeze.save_quantized(quantized, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["scheme"]["bits"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="invalid scheme.*bits=5.*re-create"):
        llmsqueeze.from_pretrained(out)


def test_loaded_checkpoint_saves_again(quantized, tmp_path):
    first = llmsqueeze.save_quantized(quantized, tmp_path / "a")
    loaded = llmsqueeze.from_pretrained(first)
    second = llmsqueeze.save_quantized(loaded, tmp_path / "b")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(second)(ids).logits, quantized(ids).logits)
    assert json.loads((second / "config.json").read_text())["quantization_config"]["quant_method"] == "llmsqueeze"

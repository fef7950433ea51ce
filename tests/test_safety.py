"""Lose nothing, say everything (issue 26): an --out apart from every input, BOS first where the
tokenizer puts it first, sequence lengths checked against the model's positions, one-line errors on
hostile input, and no layer left dense without a word. Tiny models from configs, the real CLI."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_llama, tiny_tokenizer
from tokenizers import processors

import llmsqueeze
from llmsqueeze import CheckpointError, LlmsqueezeError
from llmsqueeze.cli import main
from llmsqueeze.data import bos_token_id, calibration_batches
from llmsqueeze.evaluate import perplexity, tokenize_text


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmsqueeze: error:") and "\n" not in err, err
    assert needle in err, err
    return err


def _snapshot(d):
    """Every file under d with its bytes: what must not change."""
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    d = tmp_path / "models" / "dense"
    shutil.copytree(tiny_model_dir, d)
    return d


# ============================================================ 1. --out apart from the input
def _outs(model):
    """--out the input itself, a dir inside it, and a dir holding it."""
    return [model, model / "q", model.parent]


def test_quantize_and_prune_refuse_an_out_over_or_inside_the_model(model_copy, text_file, capsys):
    before = _snapshot(model_copy.parent)
    runs = [
        ["quantize", str(model_copy), "--bits", "4"],  # lazy
        ["quantize", str(model_copy), "--bits", "4", "--no-lazy"],
        ["quantize", str(model_copy), "--method", "gptq", "--calib", str(text_file), "--n-samples", "2", "--seq-len", "16"],
        ["prune", str(model_copy), "--method", "magnitude", "--sparsity", "0.5"],
        ["prune", str(model_copy), "--structured", "--mlp-ratio", "0.5", "--score", "l2"],
    ]
    for run in runs:
        for out in _outs(model_copy):
            assert main([*run, "--out", str(out), "--overwrite"]) == 2, (run, out)
            err = _one_line_error(capsys, "llmsqueeze never writes over or inside what it reads")
            assert str(model_copy.resolve()) in err
    assert _snapshot(model_copy.parent) == before  # nothing written, nothing replaced


def test_calibration_text_inside_out_is_refused(model_copy, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "calib.txt").write_text(TEXT)
    assert main(["quantize", str(model_copy), "--method", "gptq", "--calib", str(out / "calib.txt"), "--n-samples", "2",
                 "--seq-len", "16", "--out", str(out), "--overwrite"]) == 2
    _one_line_error(capsys, "contains the input")
    assert (out / "calib.txt").read_text() == TEXT


def test_export_and_finetune_refuse_an_out_over_or_inside_the_checkpoint(model_copy, text_file, tmp_path, capsys):
    q = tmp_path / "ckpt" / "q4"
    assert main(["quantize", str(model_copy), "--bits", "4", "--group-size", "32", "--out", str(q)]) == 0
    s = tmp_path / "ckpt" / "s50"
    assert main(["prune", str(model_copy), "--method", "magnitude", "--sparsity", "0.5", "--out", str(s)]) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path / "ckpt")
    for out in _outs(q):
        for fmt in ("compressed-tensors", "gptq"):
            assert main(["export", str(q), "--format", fmt, "--out", str(out), "--overwrite"]) == 2
            _one_line_error(capsys, "llmsqueeze never writes over or inside what it reads")
    assert main(["export", str(q), "--format", "gguf", "--out", str(q / "model.gguf")]) == 2
    _one_line_error(capsys, "lies inside the input")
    for out in _outs(s):
        assert main(["finetune", str(s), "--data", str(text_file), "--steps", "1", "--seq-len", "16", "--batch-size", "1",
                     "--quiet", "--out", str(out), "--overwrite"]) == 2
        _one_line_error(capsys, "llmsqueeze never writes over or inside what it reads")
    # a gradual run reads the dense model and may distil another: neither may be the output
    assert main(["prune", str(model_copy), "--schedule", "gradual", "--method", "magnitude", "--sparsity", "0.5",
                 "--data", str(text_file), "--steps", "2", "--seq-len", "16", "--quiet", "--distill", str(q),
                 "--out", str(q / "g")]) == 2
    _one_line_error(capsys, "lies inside the input")
    assert _snapshot(tmp_path / "ckpt") == before
    with pytest.raises(LlmsqueezeError, match="is the input"):  # the library refuses it too
        llmsqueeze.export(q, "gptq", q, overwrite=True)


# ============================================================ 2. BOS first
def bos_tokenizer():
    """The tests' word-level tokenizer with a post-processor that puts <s> first, as Llama 2/3's and
    Gemma's tokenizers do by default."""
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bos-llama")
    tiny_llama().save_pretrained(d)
    bos_tokenizer().save_pretrained(d)
    return d


def test_bos_detected_only_where_the_tokenizer_adds_it(bos_model_dir):
    from transformers import AutoTokenizer

    assert bos_token_id(tiny_tokenizer()) is None  # has a BOS token, but does not put it first
    assert bos_token_id(bos_tokenizer()) == 1
    assert bos_token_id(AutoTokenizer.from_pretrained(bos_model_dir)) == 1  # ... also once saved and loaded


def test_calibration_samples_start_with_bos_and_keep_their_length():
    plain, bos = tiny_tokenizer(), bos_tokenizer()
    ids = plain(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    a = calibration_batches(plain, [TEXT], n_samples=6, seq_len=32, seed=0)
    # without BOS: exactly the windows drawn before this change (SmolLM2's samples do not move)
    starts = torch.randint(0, ids.numel() - 32, (6,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, torch.stack([ids[s : s + 32] for s in starts.tolist()]))
    b = calibration_batches(bos, [TEXT], n_samples=6, seq_len=32, seed=0)
    assert b.shape == (6, 32) and (b[:, 0] == 1).all() and not (b[:, 1:] == 1).any()
    for row in b:  # BOS, then 31 consecutive text tokens
        hits = [s for s in range(ids.numel() - 31) if torch.equal(ids[s : s + 31], row[1:])]
        assert hits


def test_perplexity_windows_start_with_bos(bos_model_dir):
    model = tiny_llama()
    ids = tokenize_text(bos_tokenizer(), TEXT)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].clone()))
    res = perplexity(model, ids, seq_len=32, windows=3, progress=False, bos_token_id=1)
    assert res["bos"] and res["windows"] == 3 and res["tokens"] == 3 * 31
    assert [x.tolist() for x in seen] == [[1] + ids[i * 31 : (i + 1) * 31].tolist() for i in range(3)]
    with torch.no_grad():  # the NLL of the 31 text tokens each window predicts after BOS
        want = [torch.nn.functional.cross_entropy(model(x.view(1, -1)).logits[0, :-1], x[1:]).item() for x in seen[:3]]
    assert res["nll"] == pytest.approx(sum(want) / 3, rel=1e-6)
    seen.clear()  # no BOS: the windows of the protocol as before, seq_len text tokens each
    res = perplexity(model, ids, seq_len=32, windows=2, progress=False)
    assert not res["bos"] and [x.tolist() for x in seen] == [ids[i * 32 : (i + 1) * 32].tolist() for i in range(2)]


def test_cli_bos_model_dense_and_4bit(bos_model_dir, text_file, tmp_path, capsys, monkeypatch):
    import llmsqueeze.data as data

    drawn = []
    real = data.calibration_batches
    monkeypatch.setattr(data, "calibration_batches", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    q = tmp_path / "q4"
    assert main(["quantize", str(bos_model_dir), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib",
                 str(text_file), "--n-samples", "4", "--seq-len", "32", "--out", str(q)]) == 0
    assert drawn[0].shape == (4, 32) and (drawn[0][:, 0] == 1).all()
    capsys.readouterr()
    results = {}
    for name, path in (("dense", bos_model_dir), ("gptq 4-bit", q)):
        res = tmp_path / f"{name}.json"
        assert main(["eval", "ppl", str(path), "--data", str(text_file), "--seq-len", "32", "--windows", "4",
                     "--json", str(res)]) == 0
        assert "BOS first" in capsys.readouterr().out
        results[name] = json.loads(res.read_text())
        assert results[name]["bos"] and results[name]["tokens"] == 4 * 31
    # a random model: perplexity near the vocabulary size (64), 4 bits close to dense
    assert 10 < results["dense"]["ppl"] < 200
    assert results["gptq 4-bit"]["ppl"] == pytest.approx(results["dense"]["ppl"], rel=0.1)



def test_training_windows_without_bos_are_drawn_as_before():
    from llmsqueeze.pruning.finetune import batches

    ids = torch.arange(2, 102)
    got = next(batches(ids, 3, 16, torch.Generator().manual_seed(0)))
    # no BOS (SmolLM2): the windows the fine-tuning loop drew before BOS was added
    starts = torch.randint(0, ids.numel() - 16, (3,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, torch.stack([ids[s : s + 16] for s in starts.tolist()]))
    with_bos = next(batches(ids, 3, 16, torch.Generator().manual_seed(0), bos_token_id=1))
    assert with_bos.shape == (3, 16) and (with_bos[:, 0] == 1).all()
    assert all(torch.equal(row[1:], torch.arange(row[1], row[1] + 15)) for row in with_bos)  # 15 consecutive text tokens


@pytest.mark.parametrize("how", ["gradual", "finetune"])
def test_cli_training_windows_start_with_bos(bos_model_dir, text_file, tmp_path, monkeypatch, how):
    import llmsqueeze.pruning.finetune as ft

    drawn = []
    real = ft.random_windows
    monkeypatch.setattr(ft, "random_windows", lambda *a: drawn.append(real(*a)) or drawn[-1])
    if how == "gradual":
        cmd = ["prune", str(bos_model_dir), "--schedule", "gradual", "--method", "magnitude", "--sparsity", "0.5"]
    else:
        pruned = tmp_path / "pruned"
        assert main(["prune", str(bos_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                     "--out", str(pruned)]) == 0
        cmd = ["finetune", str(pruned)]
    out = tmp_path / "out"
    assert main([*cmd, "--data", str(text_file), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--quiet",
                 "--out", str(out)]) == 0
    assert len(drawn) == 2  # one batch per step: BOS, then 31 text tokens (the window keeps its length)
    assert all(b.shape == (2, 32) and (b[:, 0] == 1).all() and not (b[:, 1:] == 1).any() for b in drawn)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method_args"]["finetune"]["bos"]



ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bos", [True, False])
def test_eval_script_scores_a_bos_model_by_the_protocol(bos_model_dir, tiny_model_dir, tmp_path, monkeypatch, bos):
    """eval/grids.py (as every eval/ script that measures perplexity) passes the tokenizer's BOS, so a
    BOS model given with --model gets BOS-led windows; a tokenizer without one (SmolLM2) gets none."""
    import runpy

    import llmsqueeze.evaluate as ev

    calls = []
    real = ev.perplexity
    monkeypatch.setattr(ev, "perplexity", lambda *a, **k: calls.append(k) or real(*a, **k))
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join([TEXT] * 2))  # 6,000 tokens: two windows of 2048
    model = bos_model_dir if bos else tiny_model_dir
    monkeypatch.setattr(sys, "argv", ["grids.py", "--model", str(model), "--data", str(text), "--windows", "2",
                                      "--configs", "rtn:uniform:4:32", "--out", str(tmp_path / "grids.json")])
    runpy.run_path(str(ROOT / "eval" / "grids.py"), run_name="__main__")
    assert [c["bos_token_id"] for c in calls] == [1 if bos else None]
    row = json.loads((tmp_path / "grids.json").read_text())["results"][0]
    assert row["windows"] == 2 and 10 < row["ppl"] < 200  # a random model: near the vocabulary size (64)


def test_children_and_peers_cut_the_windows_perplexity_cuts(bos_model_dir, tiny_model_dir):
    """The eval/ child runs (torch-saved ids, the model's path) find the BOS from the model's tokenizer;
    the peer scripts, which run without llmsqueeze, get it as --bos and cut the same windows."""
    from llmsqueeze.evaluate import bos_args, model_bos_token_id

    assert model_bos_token_id(bos_model_dir) == 1 and model_bos_token_id(tiny_model_dir) is None
    assert bos_args(bos_model_dir) == ["--bos", "1"] and bos_args(tiny_model_dir) == []
    sys.path.insert(0, str(ROOT / "eval" / "peers"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "eval" / "peers"))
    model = tiny_llama().eval()
    ids = tokenize_text(bos_tokenizer(), TEXT)
    for bos in (1, None):
        ours = perplexity(model, ids, seq_len=64, windows=3, progress=False, bos_token_id=bos)["ppl"]
        assert common.perplexity(model, ids, seq_len=64, windows=3, bos=bos) == pytest.approx(ours, rel=1e-6)
    assert common.peer_parser().parse_args(["m", "c", "t", *bos_args(bos_model_dir)]).bos == 1


# ============================================================ 3. sequence length vs positions
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2-64")
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=64, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("run", [
    ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32"],
    ["prune", "--method", "wanda", "--sparsity", "0.5", "--quiet"],
])
def test_seq_len_past_learned_positions_is_clipped(gpt2_dir, text_file, tmp_path, caplog, run):
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
        assert main([run[0], str(gpt2_dir), *run[1:], "--calib", str(text_file), "--n-samples", "2", "--seq-len", "128",
                     "--out", str(out)]) == 0
    assert "--seq-len 128 is longer than the 64 positions gpt2 has learned (max_position_embeddings): using 64" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no OUT.partial left behind
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] in ("gptq", "wanda")


def test_training_windows_past_learned_positions_are_clipped(gpt2_dir, text_file, tmp_path, caplog):
    out = tmp_path / "g"
    with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
        assert main(["prune", str(gpt2_dir), "--schedule", "gradual", "--method", "magnitude", "--sparsity", "0.5",
                     "--data", str(text_file), "--steps", "2", "--seq-len", "128", "--batch-size", "1", "--quiet",
                     "--out", str(out)]) == 0
    assert "--seq-len 128 is longer than the 64 positions gpt2 has learned" in caplog.text
    finetune = json.loads((out / "config.json").read_text())["quantization_config"]["method_args"]["finetune"]
    assert finetune["seq_len"] == 64


def test_eval_windows_past_positions(gpt2_dir, tiny_model_dir, text_file, tmp_path, caplog):
    res = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
        assert main(["eval", "ppl", str(gpt2_dir), "--data", str(text_file), "--seq-len", "128", "--windows", "2",
                     "--json", str(res)]) == 0
    assert json.loads(res.read_text())["seq_len"] == 64 and "using 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmsqueeze"):  # RoPE (max_position_embeddings 256): runs, warned
        assert main(["eval", "ppl", str(tiny_model_dir), "--data", str(text_file), "--seq-len", "300", "--windows", "1",
                     "--json", str(res)]) == 0
    assert json.loads(res.read_text())["seq_len"] == 300
    assert caplog.text.count("is past llama's max_position_embeddings 256: RoPE runs on") == 1  # said once
    assert "--seq-len 300 is past llama's max_position_embeddings 256: RoPE runs on" in caplog.text


def test_api_refuses_samples_past_learned_positions(gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    data = torch.randint(3, 20, (2, 128))
    with pytest.raises(LlmsqueezeError, match="calibration seq_len=128 is longer than the 64 positions gpt2 has learned"):
        llmsqueeze.quantize(model, bits=4, group_size=32, method="gptq", data=data, progress=False)
    with pytest.raises(LlmsqueezeError, match="calibration seq_len=128 is longer"):
        llmsqueeze.prune(model, "wanda", 0.5, data=data, progress=False)
    assert model.config.quantization_config is None if hasattr(model.config, "quantization_config") else True
    with pytest.raises(LlmsqueezeError, match="seq_len=128 is longer than the 64 positions"):
        perplexity(model, torch.randint(3, 20, (600,)), seq_len=128, progress=False)


# ============================================================ 5. one line, not a traceback
def test_binary_and_empty_text_files_are_one_line(model_copy, tmp_path, capsys):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)  # 0x80.. are not UTF-8
    gptq = ["quantize", str(model_copy), "--method", "gptq", "--n-samples", "2", "--seq-len", "16"]
    assert main([*gptq, "--calib", str(binary), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"calibration data {binary} is not UTF-8 text (byte 0x80 at offset 128)")
    exe = tmp_path / "python-copy"
    shutil.copy(sys.executable, exe)  # a real executable
    assert main([*gptq, "--calib", str(exe), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"calibration data {exe} is not UTF-8 text")
    assert main(["eval", "ppl", str(model_copy), "--data", str(binary)]) == 2
    _one_line_error(capsys, f"evaluation data {binary} is not UTF-8 text")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*gptq, "--calib", str(empty), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"calibration data {empty} has 0 tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "empty.txt", "models", "python-copy"]


def test_corrupt_dense_config_is_the_only_line(model_copy, tmp_path, capsys, caplog):
    (model_copy / "config.json").write_text("{ not json")
    for lazy in ("--lazy", "--no-lazy"):
        with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
            assert main(["quantize", str(model_copy), lazy, "--out", str(tmp_path / "q")]) == 2
        _one_line_error(capsys, f"cannot load model {str(model_copy)!r}")
        assert "no tokenizer" not in caplog.text
    assert not (tmp_path / "q").exists()



def test_calibrating_a_model_without_tokenizer_is_the_only_line(model_copy, text_file, tmp_path, capsys, caplog):
    for f in model_copy.iterdir():  # the dense model alone, no tokenizer beside it
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    for lazy in ("--lazy", "--no-lazy"):
        with caplog.at_level(logging.WARNING, logger="llmsqueeze"):
            assert main(["quantize", str(model_copy), lazy, "--method", "gptq", "--bits", "4", "--group-size", "32",
                         "--calib", str(text_file), "--n-samples", "2", "--seq-len", "32", "--out", str(tmp_path / "q")]) == 2
        _one_line_error(capsys, "has no tokenizer to read --calib with; save one beside the model")
        assert "saving the model without one" not in caplog.text  # no warning about a save that will not happen
    assert not (tmp_path / "q").exists()


def test_tampered_checkpoint_through_transformers_names_its_path(model_copy, tmp_path):
    q = tmp_path / "q4"
    assert main(["quantize", str(model_copy), "--bits", "4", "--group-size", "32", "--out", str(q)]) == 0
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["scheme"]["bits"] = 5
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as ours:
        llmsqueeze.from_pretrained(q)
    from transformers import AutoModelForCausalLM

    with pytest.raises(CheckpointError) as theirs:
        AutoModelForCausalLM.from_pretrained(q)
    assert str(theirs.value) == str(ours.value) and str(q) in str(ours.value) and "bits=5" in str(ours.value)
    # as a user's script meets it: the last line names the checkpoint, no chained second traceback
    r = subprocess.run([sys.executable, "-c", "import sys, llmsqueeze, transformers; "
                        "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(q)],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1] == f"llmsqueeze.config.CheckpointError: {ours.value}"
    assert "During handling of the above exception" not in r.stderr


# ============================================================ 6, 7. nothing left dense without a word
def _save(model, d):
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory):
    """Block 0 a dense MLP (mlp_only_layers), block 1 MoE: 4 experts in fused 3-D parameters, a router
    (mlp.gate), a shared expert and its 64 -> 1 shared_expert_gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[0], max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(Qwen2MoeForCausalLM(cfg).eval(), tmp_path_factory.mktemp("qwen2-moe"))


def test_moe_quantize_reports_share_experts_and_routers(qwen2_moe_dir, tmp_path, capsys):
    """The experts are quantized (issue 22), the routers and gates stay dense and are listed, the share
    counts every parameter, and nothing is left dense without a word."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(qwen2_moe_dir)
    experts = dense.model.layers[1].mlp.experts
    n_experts = experts.gate_up_proj.numel() + experts.down_proj.numel()
    total = sum(p.numel() for p in dense.parameters())
    out = tmp_path / "q4"
    assert main(["quantize", str(qwen2_moe_dir), "--bits", "4", "--group-size", "32", "--no-lazy", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {layer["name"] for layer in info["layers"]}
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)  # routers and gates stay dense
    assert "model.layers.1.mlp.shared_expert.down_proj" in names and "model.layers.0.mlp.down_proj" in names
    assert info["left_dense"] == {}
    assert info["experts"]["quantized_weights"] == info["experts"]["weights"] == n_experts
    assert info["routers_kept_dense"] == {"model.layers.1.mlp.gate": 4 * 64, "model.layers.1.mlp.shared_expert_gate": 64}
    share = info["quantized_weights"] / total
    assert info["handled_share"] == pytest.approx(share) and info["dense_parameters"] == total
    assert "left dense" not in err and f"parameters quantized ({share:.1%})" in err  # the quantize run says it
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "left dense" not in text and f"({share:.1%}); the rest dense" in text
    assert "2 routers and gates (mlp.gate, mlp.shared_expert_gate; 320 weights)" in text
    assert "kept dense  1 linear modules (lm_head)" in text
    # 7: gate_proj of the dense MLP (64->128) and of the shared expert (64->96) are listed apart
    assert "gate_proj x1 (64->128)" in text and "gate_proj x1 (64->96)" in text
    model = llmsqueeze.from_pretrained(out)
    assert model(torch.tensor([[1, 5, 9, 3]])).logits.shape == (1, 4, 64)


def test_weights_in_unknown_modules_are_reported_left_dense(tiny_model_dir):
    """A 2-D parameter in a module llmsqueeze does not handle is counted as left dense, by name."""
    from llmsqueeze.info import coverage, coverage_lines
    from llmsqueeze.models import quantizable_modules

    model = llmsqueeze.load_dense(str(tiny_model_dir))
    extra = torch.nn.Module()
    extra.table = torch.nn.Parameter(torch.zeros(8, 12))
    model.model.layers[0].add_module("adapter", extra)
    handled = set(quantizable_modules(model, llmsqueeze.QuantScheme(bits=4, group_size=32)))
    cover = coverage(model, handled, {"lm_head"})
    assert cover["left_dense"] == {"model.layers.0.adapter": 96} and cover["routers"] == {}
    lines = coverage_lines({"quantized_weights": 10, "dense_parameters": 100, "handled_share": 0.1,
                            "scheme": {}, "left_dense": cover["left_dense"]})
    assert len(lines) == 2 and "96 weights in 1 modules llmsqueeze does not quantize" in lines[1]


def test_moe_prune_share_and_experts(tmp_path, text_file, capsys):
    """Wanda on a Mixtral prunes every expert (saved under transformers' block_sparse_moe. names) and
    says so; the routers stay dense."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    src = _save(MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval(), tmp_path / "mixtral")
    out = tmp_path / "w50"
    assert main(["prune", str(src), "--method", "wanda", "--sparsity", "0.5", "--calib", str(text_file), "--n-samples",
                 "2", "--seq-len", "32", "--quiet", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "left dense" not in err and "left dense" not in text
    assert "24 of 24 expert matrices pruned" in text
    assert "parameters pruned (" in text and "2 routers and gates (mlp.gate x2; 512 weights)" in text
    model = llmsqueeze.from_pretrained(out)
    w = model.model.layers[0].mlp.experts
    assert model(torch.tensor([[1, 5, 9, 3]])).logits.shape == (1, 4, 64) and type(w).__name__ == "MoEExperts"


def test_dense_family_reports_its_share(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "left dense" not in err and "share: " in err and "parameters quantized" in err
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["left_dense"] == {} and info["routers_kept_dense"] == {}
    assert 0 < info["handled_share"] < 1

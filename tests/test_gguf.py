"""GGUF: GGML's block formats (quant/ggml.py) against the gguf package's reference dequantization,
llama.cpp's type mixes, GGUFScheme through RTN and GPTQ, checkpoints and both loaders, and the .gguf
export read back by the gguf package and by transformers (gguf_file=)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXT, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import llmsqueeze
from llmsqueeze import GGUFLinear, GGUFScheme, LlmsqueezeError, QuantScheme
from llmsqueeze.formats.gguf import permute_rows
from llmsqueeze.quant import ggml

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402


def random_params(t: ggml.GGMLType, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, ggml.Params]:
    """Codes and block parameters over the format's whole ranges (signed scales, every code)."""
    q = torch.randint(0, t.levels, (n, k), generator=g)
    if not t.super:
        p = {"d": ggml.fp16(torch.randn(n, k // t.block, generator=g) * 0.01)}
        if t.kind == "affine":
            p["m"] = ggml.fp16(-torch.rand(n, k // t.block, generator=g) * 0.1)
        return q, p
    nsb, nsub = k // t.block, t.block // t.sub
    p = {"d": ggml.fp16(torch.rand(n, nsb, generator=g) * 0.01)}
    if t.kind == "sym":
        lo = -(2 ** (t.scale_bits - 1))
        p["sc"] = torch.randint(lo, -lo, (n, nsb, nsub), generator=g)
    else:
        top = 2**t.scale_bits
        p["sc"] = torch.randint(0, top, (n, nsb, nsub), generator=g)
        p["dmin"] = ggml.fp16(torch.rand(n, nsb, generator=g) * 0.01)
        p["mn"] = torch.randint(0, top, (n, nsb, nsub), generator=g)
    return q, p


# ------------------------------------------------------------------ the block formats
@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_pack_matches_gguf_reference_bit_for_bit(name):
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(1)
    q, p = random_params(t, 6, 2 * ggml.QK_K, g)
    blocks = ggml.pack(q, t, p)
    assert blocks.shape == (6, t.row_bytes(2 * ggml.QK_K)) and blocks.dtype == torch.uint8
    ref = quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(t.id))
    ours = ggml.dequantize(q, t, p)
    assert np.array_equal(ref.view(np.uint32), ours.numpy().view(np.uint32))
    q2, p2 = ggml.unpack(blocks, t, 2 * ggml.QK_K)
    assert torch.equal(q2, q)
    for key in p:
        assert torch.equal(p2[key].float(), p[key].float()), key


@pytest.mark.parametrize("name", list(ggml.TYPES))
def test_fitted_rtn_is_exact_in_the_reader_and_levels_hold_every_weight(name):
    t = ggml.TYPES[name]
    torch.manual_seed(0)
    w = torch.randn(16, 512) * torch.rand(16, 1)
    w[0, :64] = 0  # an all-zero block
    q, p = ggml.quantize(w, t)
    assert q.min() >= 0 and q.max() < t.levels
    blocks = ggml.pack(q, t, p)
    ref = torch.from_numpy(quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(t.id)))
    assert torch.equal(ref, ggml.dequantize(q, t, p))
    assert torch.isfinite(ref).all() and (ref[0, :64] == 0).all()
    # the table of each sub-block holds exactly the values its codes give, sorted
    table, flip = ggml.levels(t, p)
    assert (table[..., 1:] >= table[..., :-1]).all()
    idx = torch.where(flip.repeat_interleave(t.sub, 1), t.levels - 1 - q, q)
    vals = table.repeat_interleave(t.sub, 1).gather(2, idx.unsqueeze(2)).squeeze(2)
    assert torch.equal(vals, ref)
    rel = ((ref - w) ** 2).mean() / (w**2).mean()
    assert rel < {2: 0.12, 3: 0.04, 4: 0.012, 5: 0.003, 6: 0.001, 8: 1e-4}[t.bits]


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_fit_beats_the_gguf_packages_quantizer(name):
    """The weighted least-squares fit has a lower error than gguf's reference (llama.cpp's plain) one."""
    t = ggml.TYPES[name]
    torch.manual_seed(0)
    w = torch.randn(64, 1024)
    q, p = ggml.quantize(w, t)
    ours = ggml.dequantize(q, t, p)
    qt = gguf.GGMLQuantizationType(t.id)
    ref = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), qt), qt))
    assert ((ours - w) ** 2).mean() < 0.95 * ((ref - w) ** 2).mean()


def test_importance_weights_the_error():
    t = ggml.TYPES["q4_k"]
    torch.manual_seed(0)
    w = torch.randn(32, 512)
    imp = torch.ones(512)
    imp[::4] = 100.0
    for weights, better in ((imp, True), (None, False)):
        q, p = ggml.quantize(w, t, weights)
        err = ((ggml.dequantize(q, t, p) - w) ** 2 * imp).sum()
        if better:
            weighted = err
        else:
            plain = err
    assert weighted < plain


def test_llama_cpp_mix_rules():
    """llama-quant.cpp's choices on SmolLM2's shapes (30 layers, widths 576 and 1536, tied embeddings)."""
    mt = ggml.mix_type
    # Q4_K_M: width 576 is no multiple of 256, so Q4_K falls back to Q5_0 and Q6_K to Q8_0
    assert mt("q4_k_m", "attn_q", 5, 30, 576) == "q5_0"
    assert mt("q4_k_m", "attn_v", 0, 30, 576) == "q8_0"  # use_more_bits -> Q6_K -> fallback
    assert mt("q4_k_m", "attn_v", 4, 30, 576) == "q5_0"
    assert mt("q4_k_m", "ffn_down", 0, 30, 1536) == "q6_k"
    assert mt("q4_k_m", "ffn_down", 4, 30, 1536) == "q4_k"
    assert mt("q4_k_m", "ffn_down", 5, 30, 1536) == "q6_k"  # (5 - 3) % 3 == 2
    assert mt("q4_k_m", "token_embd", 0, 30, 576, tied=True) == "q8_0"
    assert mt("q4_k_m", "token_embd", 0, 30, 4096, tied=True) == "q6_k"
    assert mt("q4_k_m", "token_embd", 0, 30, 4096, tied=False) == "q4_k"
    assert mt("q3_k_m", "attn_q", 3, 30, 576) == "q4_0"
    assert mt("q3_k_m", "attn_v", 1, 30, 4096) == "q5_k"
    assert mt("q3_k_m", "attn_output", 1, 30, 4096) == "q4_k"
    assert mt("q3_k_m", "ffn_down", 0, 32, 11008) == "q5_k"
    assert mt("q3_k_m", "ffn_down", 9, 32, 11008) == "q4_k"
    assert mt("q4_0", "ffn_down", 0, 30, 1536) == "q4_0"
    assert mt("q4_0", "ffn_down", 0, 30, 1536, imatrix=True) == "q4_1"
    assert mt("q2_k", "attn_v", 0, 30, 4096, n_gqa=4) == "q4_k"
    assert mt("q4_k_m", "attn_q", 0, 30, 40) == "f16"  # no 32-block divides it


# ------------------------------------------------------------------ a tiny model with a BPE tokenizer
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<|endoftext|>", bos_token="<s>", eos_token="</s>")


def gguf_llama(hidden: int = 256, inter: int = 512):
    tok = bpe_tokenizer()
    model = tiny_llama(hidden=hidden, intermediate_size=inter, vocab=len(tok), layers=2)
    return model, tok


def calib(tok, n: int = 8, t: int = 64) -> torch.Tensor:
    ids = torch.tensor(tok(TEXT)["input_ids"])
    return torch.stack([ids[i * t:(i + 1) * t] for i in range(n)])


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    """A tiny Llama quantized to GGUF Q4_K_M by GPTQ and saved: (dir, in-memory model, tokenizer)."""
    model, tok = gguf_llama()
    llmsqueeze.quantize(model, GGUFScheme(mix="q4_k_m"), data=calib(tok), method="gptq", progress=False)
    d = tmp_path_factory.mktemp("gguf") / "q4km"
    llmsqueeze.save_quantized(model, d, tokenizer=tok)
    return d, model, tok


def test_every_selected_linear_gets_llama_cpps_type(q4km):
    _, model, _ = q4km
    types = model.config.quantization_config["scheme"]["layer_types"]
    assert len(types) == 14 and all(isinstance(model.get_submodule(n), GGUFLinear) for n in types)
    # use_more_bits(i, 2) holds for the last layer only (i >= 7*2//8)
    assert types["model.layers.0.mlp.down_proj"] == "q4_k" and types["model.layers.1.mlp.down_proj"] == "q6_k"
    assert types["model.layers.0.self_attn.v_proj"] == "q4_k" and types["model.layers.1.self_attn.v_proj"] == "q6_k"
    assert types["model.layers.0.self_attn.q_proj"] == "q4_k"


def test_gptq_beats_rtn_in_the_same_format():
    model, tok = gguf_llama()
    ids = calib(tok)
    x = ids[:2]
    with torch.no_grad():
        ref = model(x).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m, _ = gguf_llama()
        llmsqueeze.quantize(m, GGUFScheme(mix="q3_k_m"), data=ids if method == "gptq" else None, method=method,
                            progress=False)
        with torch.no_grad():
            errs[method] = ((m(x).logits - ref) ** 2).mean().item()
    assert errs["gptq"] < 0.8 * errs["rtn"]


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_balances_then_rounds_into_the_ggml_types(method, tmp_path):
    model, tok = gguf_llama()
    ids = calib(tok)
    x = ids[:2]
    with torch.no_grad():
        ref = model(x).logits
    llmsqueeze.quantize(model, GGUFScheme(mix="q3_k_m"), data=ids, method=method, progress=False)
    qc = model.config.quantization_config
    assert qc["method"] == "awq" and qc["method_args"]["awq"]["then"] == ("gptq" if method == "awq-gptq" else "rtn")
    assert all(isinstance(model.get_submodule(n), GGUFLinear) and model.get_submodule(n).ggml_type == t
               for n, t in qc["scheme"]["layer_types"].items())
    with torch.no_grad():
        out = model(x).logits
    assert ((out - ref) ** 2).mean() < 0.1 * (ref**2).mean()
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(d)(x).logits, out)


def test_checkpoint_loads_back_through_both_loaders(q4km):
    d, model, _ = q4km
    x = torch.randint(3, 200, (1, 24))
    with torch.no_grad():
        want = model(x).logits
        back = llmsqueeze.from_pretrained(d)
        assert isinstance(back.model.layers[1].mlp.down_proj, GGUFLinear)
        assert torch.equal(back(x).logits, want)
        hf = AutoModelForCausalLM.from_pretrained(d)
        assert torch.equal(hf(x).logits, want)
    from llmsqueeze.info import checkpoint_info, format_info

    info = checkpoint_info(d)
    assert info["quantized_layers"] == 14
    assert "gguf Q4_K_M" in format_info(info) and "Q6_K x" in format_info(info)


def test_corrupt_layer_types_are_one_line(q4km, tmp_path):
    import json
    import shutil

    d, _, _ = q4km
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["scheme"]["layer_types"]["model.layers.0.mlp.up_proj"] = "q8_0"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(llmsqueeze.CheckpointError, match="up_proj stores U8"):
        llmsqueeze.from_pretrained(bad)


# ------------------------------------------------------------------ the .gguf file
def read_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, quants.dequantize(t.data, t.tensor_type)) for t in r.tensors}


def test_export_writes_exactly_the_optimized_blocks(q4km, tmp_path):
    d, model, tok = q4km
    out = llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", progress=False)
    r = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok) and fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert len(fields["tokenizer.ggml.merges"]) > 0
    tensors = read_tensors(out)
    types = model.config.quantization_config["scheme"]["layer_types"]
    heads = {"attn_q": 4, "attn_k": 2}
    for name, t in types.items():
        i = name.split(".")[2]
        base = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.rsplit(".", 1)[1]]
        got_type, got = tensors[f"blk.{i}.{base}.weight"]
        assert got_type == t.upper()
        want = model.get_submodule(name).dequantize()
        if base in heads:  # llama's q/k rows permuted for ggml's rope: whole rows, exact
            want = want[permute_rows(want.shape[0], heads[base])]
        assert np.array_equal(got, want.numpy()), name
    # untied: the embeddings take the mix's type, the dense head llama.cpp's Q6_K for outputs
    assert tensors["token_embd.weight"][0] == "Q4_K" and tensors["output.weight"][0] == "Q6_K"
    assert tensors["output_norm.weight"][0] == "F32"
    emb = model.model.embed_tokens.weight.detach()
    assert ((torch.from_numpy(tensors["token_embd.weight"][1]) - emb) ** 2).mean() < 0.02 * (emb**2).mean()


def test_transformers_reads_the_export(q4km, tmp_path):
    """transformers' GGUF loader (gguf_file=) dequantizes our file into the same model."""
    d, model, _ = q4km
    out = llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", dense_type="f32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    x = torch.randint(3, 200, (1, 24))
    with torch.no_grad():
        a, b = hf(x).logits, model(x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sym,bits,group,want", [(True, 4, 32, "Q4_0"), (True, 4, 64, "Q4_0"), (False, 4, 32, "Q4_1"),
                                                 (True, 8, -1, "Q8_0")])
def test_uniform_checkpoints_map_exactly(tmp_path, sym, bits, group, want):
    model, tok = gguf_llama(hidden=96, inter=160)
    llmsqueeze.quantize(model, QuantScheme(bits=bits, group_size=group, sym=sym), progress=False)
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    tensors = read_tensors(llmsqueeze.export(d, "gguf", tmp_path / "q.gguf", progress=False))
    for i in range(2):
        got_type, got = tensors[f"blk.{i}.ffn_down.weight"]
        w = model.model.layers[i].mlp.down_proj.dequantize_weight()
        assert got_type == want
        if sym:
            assert torch.equal(torch.from_numpy(got), w)
        else:  # Q4_1 stores the min -scale*zero in fp16: one rounding per block
            assert torch.allclose(torch.from_numpy(got), w, atol=float(w.abs().max()) * 2e-3)
    got_type, got = tensors["blk.0.attn_q.weight"]
    want_q = model.model.layers[0].self_attn.q_proj.dequantize_weight()[permute_rows(96, 4)]
    assert got_type == want and (torch.equal(torch.from_numpy(got), want_q) or not sym)


@pytest.mark.parametrize("scheme,match", [
    (QuantScheme(bits=3, group_size=32), "bits=3"),
    (QuantScheme(bits=4, group_size=48), "group_size=48"),
    (QuantScheme(bits=8, group_size=32), "bits=8 asym"),
    (QuantScheme(bits=4, group_size=32, grid="nf"), "grid='nf'"),
])
def test_inexpressible_checkpoints_are_refused(tmp_path, scheme, match):
    model, tok = gguf_llama(hidden=96, inter=160)
    llmsqueeze.quantize(model, scheme, progress=False)
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    with pytest.raises(LlmsqueezeError, match=match):
        llmsqueeze.export(d, "gguf", tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists() and not list(tmp_path.glob(".q.gguf*"))


def test_fallback_types_on_widths_256_does_not_divide(tmp_path):
    model, tok = gguf_llama(hidden=96, inter=160)
    llmsqueeze.quantize(model, GGUFScheme(mix="q4_k_m"), progress=False)
    types = model.config.quantization_config["scheme"]["layer_types"]
    assert types["model.layers.0.self_attn.q_proj"] == "q5_0" and types["model.layers.1.mlp.down_proj"] == "q8_0"
    pure = tiny_llama(hidden=96, intermediate_size=160, vocab=len(tok), layers=2)
    llmsqueeze.quantize(pure, GGUFScheme(mix="q4_k"), progress=False)  # a type alone: every tensor in it (pure)
    assert set(pure.config.quantization_config["scheme"]["layer_types"].values()) == {"q5_0"}


def test_cli_quantize_export_and_one_line_errors(tmp_path, capsys):
    from llmsqueeze.cli import main

    model, tok = gguf_llama()
    src = tmp_path / "dense"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    assert main(["quantize", str(src), "--scheme", "gguf:q4_0", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    assert read_tensors(tmp_path / "q.gguf")["blk.0.attn_v.weight"][0] == "Q4_0"
    capsys.readouterr()
    for argv, msg in (
        (["quantize", str(src), "--scheme", "gguf:q9_k", "--out", str(tmp_path / "x")], "gguf type 'q9_k' is not known"),
        (["quantize", str(src), "--scheme", "fp9", "--out", str(tmp_path / "x")], "--scheme 'fp9' is not known"),
        (["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.bin")], "ends in .gguf"),
        (["export", str(tmp_path / "q"), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "y.gguf")],
         "was quantized as q4_0"),
        (["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")], "exists"),
        (["export", str(tmp_path / "q"), "--format", "gptq", "--type", "q4_0", "--out", str(tmp_path / "z")],
         "apply to --format gguf"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_a_gguf_file_loads_into_gguf_linears_and_saves_back(q4km, tmp_path):
    """from_pretrained(file.gguf) keeps the blocks (no dequantization), un-permutes q/k, and a save +
    export writes the same tensors again."""
    d, model, tok = q4km
    f = llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", dense_type="f32", progress=False)
    back = llmsqueeze.from_pretrained(f)
    for name, layer in model.named_modules():
        if isinstance(layer, GGUFLinear):
            got = back.get_submodule(name)
            assert isinstance(got, GGUFLinear) and got.ggml_type == layer.ggml_type
            assert torch.equal(got.blocks, layer.blocks), name
    x = torch.randint(3, 200, (1, 24))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    again = llmsqueeze.save_quantized(back, tmp_path / "again", tokenizer=tok)
    f2 = llmsqueeze.export(again, "gguf", tmp_path / "again.gguf", dense_type="f32", progress=False)
    a, b = read_tensors(f), read_tensors(f2)
    assert a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_other_families_export_and_transformers_reads_them(family, tmp_path):
    """Each family's metadata and tensor names as llama.cpp's converter writes them: transformers'
    GGUF loader rebuilds the same model (qwen2's q/k/v biases, qwen3's q/k norms; no permutation)."""
    import transformers as tf

    tok = bpe_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = {"mistral": lambda: tf.MistralConfig(**kw, sliding_window=None), "qwen2": lambda: tf.Qwen2Config(**kw),
           # transformers' GGUF reader takes no head_dim for qwen3 (its default 128 is the real models')
           "qwen3": lambda: tf.Qwen3Config(**kw, head_dim=128),
           "gemma2": lambda: tf.Gemma2Config(**kw, head_dim=64), "gemma3_text": lambda: tf.Gemma3TextConfig(**kw, head_dim=64),
           "phi3": lambda: tf.Phi3Config(**kw)}[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if family == "qwen2":  # non-zero biases, so that a lost bias shows
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.data.normal_(0, 0.5)
    ids = calib(tok)
    llmsqueeze.quantize(model, GGUFScheme(mix="q4_k_m"), data=ids, method="gptq", progress=False)
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    out = llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", dense_type="f32", progress=False)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == {"mistral": "llama", "gemma3_text": "gemma3"}.get(family, family)
    if family.startswith("gemma"):  # llama.cpp stores gemma's norms as 1 + w
        got = read_tensors(out)["blk.0.attn_norm.weight"][1]
        assert np.allclose(got, 1 + model.model.layers[0].input_layernorm.weight.detach().numpy())
        assert "blk.0.post_ffw_norm.weight" in read_tensors(out)
    if family == "phi3":  # fused projections keep llama.cpp's names
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(read_tensors(out))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    x = ids[:1, :24]
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
        if family in ("mistral", "qwen2", "qwen3"):  # the families our importer reads
            back = llmsqueeze.from_pretrained(out)
            assert torch.equal(back(x).logits, model(x).logits)


def test_a_quantized_head_is_the_output_tensor(tmp_path):
    """--lm-head: the head is quantized as llama.cpp's `output` (Q6_K under Q4_K_M) and exported as is."""
    model, tok = gguf_llama()
    llmsqueeze.quantize(model, GGUFScheme(mix="q4_k_m", lm_head=True), progress=False)  # (rtn: the head is outside the blocks)
    assert model.config.quantization_config["scheme"]["layer_types"]["lm_head"] == "q6_k"
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    tensors = read_tensors(llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", progress=False))
    assert tensors["output.weight"][0] == "Q6_K"
    assert np.array_equal(tensors["output.weight"][1], model.lm_head.dequantize().numpy())


def test_a_sentencepiece_tokenizer_is_written_as_llama_cpps_llama_model(q4km, tmp_path):
    """tokenizer.model beside the weights (Llama 2, Gemma, Phi-3): pieces, scores and types as llama.cpp's
    "llama" vocabulary, padded to the model's vocab_size."""
    import shutil

    spm = pytest.importorskip("sentencepiece")
    d, model, _ = q4km
    work = tmp_path / "ck"
    shutil.copytree(d, work)
    (tmp_path / "text.txt").write_text("\n".join(TEXT[i:i + 200] for i in range(0, len(TEXT), 200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(work / "tokenizer"),
                                   vocab_size=28, hard_vocab_limit=False, model_type="bpe", minloglevel=2)
    out = llmsqueeze.export(work, "gguf", tmp_path / "m.gguf", progress=False)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items() if not k.startswith("GGUF.")}
    assert fields["tokenizer.ggml.model"] == "llama"
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    sp = spm.SentencePieceProcessor(model_file=str(work / "tokenizer.model"))
    assert len(tokens) == model.config.vocab_size and tokens[5] == sp.id_to_piece(5)
    assert scores[5] == pytest.approx(sp.get_score(5)) and tokens[-1].startswith("[PAD")


# ------------------------------------------------------------------ learned rounding into the GGML types
from llmsqueeze.quant import autoround as ar  # noqa: E402


def _learned_state(t: ggml.GGMLType, w: torch.Tensor, g: torch.Generator):
    """ggml.fit's steps of w, random offsets V and multipliers (what training may reach)."""
    step0, bias0 = ggml.steps(t, ggml.fit(w, t))
    n, k = w.shape
    wg = w.view(n, k // t.sub, t.sub)
    v = (torch.rand(wg.shape, generator=g) - 0.5).requires_grad_()
    a_s = (0.7 + 0.6 * torch.rand(step0.shape, generator=g)).requires_grad_()
    a_m = None if bias0 is None else (0.7 + 0.6 * torch.rand(bias0.shape, generator=g)).requires_grad_()
    return wg, step0, bias0, v, a_s, a_m


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_learned_rounding_trains_on_the_stored_grid_and_freezes_to_it(name):
    """The fake-quantized weight autoround trains on is, bit for bit, what the stored bytes give in
    gguf's reference dequantization (the k-quants' 6/4/8-bit super-block scales included); at V = 0
    and multipliers 1 the stored parameters are ggml.fit's; the gradients reach V, the step and the min."""
    t = ggml.TYPES[name]
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 512, generator=g) * torch.rand(8, 1, generator=g)
    w[1, :256] *= 1e-3  # sub-blocks far below their super-block's largest: small (or zero) scale codes
    wg, step0, bias0, v, a_s, a_m = _learned_state(t, w, g)
    step, bias, params = ar.ggml_learned_steps(t, step0, bias0, a_s, a_m)
    fake = ar.ggml_fake_quant(wg, v, step, bias, t).reshape(8, 512)
    q = ar.ggml_codes(wg, v, step, bias, t)
    assert q.min() >= 0 and q.max() < t.levels
    stored = ggml.dequantize(q, t, params)
    ref = torch.from_numpy(quants.dequantize(ggml.pack(q, t, params).numpy(), gguf.GGMLQuantizationType(t.id)))
    assert torch.equal(ref, stored)
    live = (step != 0).repeat_interleave(t.sub, 1)  # a zero step: any code gives the bias; trained as 1e-30
    assert torch.equal(fake.detach()[live], stored[live])
    assert torch.allclose(fake.detach(), stored, atol=1e-25)
    fake.square().sum().backward()
    for p in (v, a_s) + (() if a_m is None else (a_m,)):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the start is the fitted grid itself
    ones = torch.ones_like(step0)
    _, _, start = ar.ggml_learned_steps(t, step0, bias0, ones, None if bias0 is None else ones)
    for key, val in ggml.fit(w, t).items():
        assert torch.equal(start[key], val), key


def _block0_error(model, ref_model, ids) -> float:
    """Mean squared error of decoder block 0's output (same embeddings in: the block's own error)."""
    with torch.no_grad():
        a = model(ids, output_hidden_states=True).hidden_states[1]
        b = ref_model(ids, output_hidden_states=True).hidden_states[1]
    return ((a - b) ** 2).mean().item()


@pytest.mark.parametrize("mix", ["q4_0", "q4_k", "q3_k", "q6_k"])
def test_autoround_into_ggml_types_beats_rtn_and_exports_its_bytes(mix, tmp_path):
    """autoround on a GGUFScheme: every Linear a GGUFLinear of its type whose bytes (gguf's reference
    dequantization) are its weight; block 0's output error below round-to-nearest's with the same
    fit; both loaders give the same logits, and the export holds exactly these bytes."""
    ref, tok = gguf_llama()
    ids = calib(tok)
    errs, models = {}, {}
    for method in ("rtn", "autoround"):
        m, _ = gguf_llama()
        kw = dict(iters=40, batch_samples=4) if method == "autoround" else {}
        llmsqueeze.quantize(m, GGUFScheme(mix=mix), data=None if method == "rtn" else ids, method=method,
                            progress=False, **kw)
        errs[method], models[method] = _block0_error(m, ref, ids), m
    assert errs["autoround"] < 0.8 * errs["rtn"], errs
    model = models["autoround"]
    qc = model.config.quantization_config
    assert qc["method"] == "autoround" and qc["method_args"]["iters"] == 40
    types = qc["scheme"]["layer_types"]
    want = {"q4_0": "q4_0", "q4_k": "q4_k", "q3_k": "q3_k", "q6_k": "q6_k"}[mix]
    assert set(types.values()) == {want}
    for name in types:
        layer = model.get_submodule(name)
        assert isinstance(layer, GGUFLinear) and layer.ggml_type == want
        got = quants.dequantize(layer.blocks.numpy(), gguf.GGMLQuantizationType(layer.type.id))
        assert np.array_equal(got, layer.dequantize().numpy()), name
    # the learned grid is not the fitted one: codes moved
    rtn_blocks = models["rtn"].model.layers[0].mlp.down_proj.blocks
    assert not torch.equal(model.model.layers[0].mlp.down_proj.blocks, rtn_blocks)
    d = llmsqueeze.save_quantized(model, tmp_path / "q", tokenizer=tok)
    x = ids[:2, :24]
    with torch.no_grad():
        want_logits = model(x).logits
        assert torch.equal(llmsqueeze.from_pretrained(d)(x).logits, want_logits)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(d)(x).logits, want_logits)
    out = llmsqueeze.export(d, "gguf", tmp_path / "m.gguf", progress=False)
    raw = {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in gguf.GGUFReader(str(out)).tensors}
    heads = {"q_proj": 4, "k_proj": 2}
    for name in types:
        i, base = name.split(".")[2], name.rsplit(".", 1)[1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[base]
        got_type, got = raw[f"blk.{i}.{gname}.weight"]
        blocks = model.get_submodule(name).blocks
        if base in heads:  # q/k rows permuted for ggml's rope: whole rows of blocks
            blocks = blocks[permute_rows(blocks.shape[0], heads[base])]
        assert got_type == want.upper() and np.array_equal(got.reshape(blocks.shape), blocks.numpy()), name


def test_cli_autoround_into_a_gguf_mix_and_one_line_errors(tmp_path, capsys):
    from llmsqueeze.cli import main

    model, tok = gguf_llama()
    src = tmp_path / "dense"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    assert main(["quantize", str(src), "--scheme", "gguf:q4_k_m", "--method", "autoround", "--iters", "3",
                 "--calib", str(text), "--n-samples", "4", "--seq-len", "32", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    tensors = read_tensors(tmp_path / "q.gguf")
    assert tensors["blk.0.ffn_down.weight"][0] == "Q4_K" and tensors["blk.1.ffn_down.weight"][0] == "Q6_K"
    import json

    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "autoround" and saved["method_args"]["iters"] == 3
    back = llmsqueeze.from_pretrained(tmp_path / "q")
    assert isinstance(back.model.layers[0].mlp.down_proj, GGUFLinear)
    capsys.readouterr()
    for argv, msg in (
        (["--scheme", "gguf:iq4_nl", "--method", "autoround"], "iq4_nl's 16 levels are not"),
        (["--scheme", "gguf:q4_k_m", "--method", "autoround", "--autoround-init", "clip"], "init='clip'"),
        (["--scheme", "gguf:q4_0", "--method", "autoround", "--iters", "0"], "iters=0"),
    ):
        assert main(["quantize", str(src), *argv, "--calib", str(text), "--out", str(tmp_path / "x")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_autoround_refuses_iq4_nl_layers_in_the_api():
    model, tok = gguf_llama()
    with pytest.raises(LlmsqueezeError, match="iq4_nl") as e:
        llmsqueeze.quantize(model, GGUFScheme(mix="iq4_nl"), data=calib(tok), method="autoround", progress=False)
    assert "\n" not in str(e.value)

"""Mixtures of experts: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss and DeepSeek-V3 models built
from their transformers 5 configs. Every expert matrix is split out of the fused 3-D experts (and
back, exactly), quantized, saved per expert, loaded back by both loaders with the same logits; the
CLI quantizes 100 % of the expert weights lazily from the checkpoint's per-expert (or fused)
tensors; calibration sees exactly the routed tokens of each expert, and rare experts all tokens."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_after_block, tiny_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmsqueeze
from llmsqueeze.cli import main
from llmsqueeze.engine import run_sequential
from llmsqueeze.info import checkpoint_info
from llmsqueeze.models import MOE_LAYOUTS, fuse_experts, moe_layouts, quantizable_modules, split_fused, split_fused_experts
from llmsqueeze.nn import QuantLinear, linear_weight
from llmsqueeze.nn_moe import MoEExperts, expert_linear_names

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"]
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 3, 7, 11, 15]])


def moe_config(family: str):
    """Tiny configs: hidden 64, 4 experts, top-2, 2 blocks; widths multiples of 16 (group 32 fits)."""
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=64, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, decoder_sparse_step=1)
    if family == "gpt_oss":
        return tf.GptOssConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                               sliding_window=64)
    if family == "deepseek_v3":
        c = dict(common)
        c.pop("num_key_value_heads")
        return tf.DeepseekV3Config(**c, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                   first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                   qk_nope_head_dim=16, v_head_dim=16)
    raise KeyError(family)


def moe_model(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(family), dtype=torch.float32).eval()
    with torch.no_grad():  # random routers spread tokens over the experts; gpt-oss's starts at zero
        for n, p in model.named_parameters():
            if p.dim() == 3 or "router" in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def dense_dir(family, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dense-{family}")
    moe_model(family).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_split_and_fuse_are_exact_inverses(family):
    model = moe_model(family)
    layouts = moe_layouts(model)
    assert layouts and all(v is MOE_LAYOUTS[family] for v in layouts.values())
    name, layout = next(iter(layouts.items()))
    p = dict(model.get_submodule(name).named_parameters())
    parts = split_fused(layout, p["gate_up_proj"], p["down_proj"], p.get("gate_up_proj_bias"), p.get("down_proj_bias"))
    back = fuse_experts(layout, parts)
    assert set(back) == set(p)
    for k, t in back.items():
        assert torch.equal(t, p[k])
    with torch.no_grad():
        ref = model(IDS).logits
    assert split_fused_experts(model) == list(layouts)
    assert split_fused_experts(model) == []  # idempotent
    moe = model.get_submodule(name)
    assert isinstance(moe, MoEExperts)
    e1 = moe.expert(1)
    assert torch.equal(e1.gate_proj.weight, parts["gate_proj"][0][1]) and torch.equal(e1.down_proj.weight, parts["down_proj"][0][1])
    with torch.no_grad():
        got = model(IDS).logits
    # the same products, summed over the experts in another order: float32 rounding only
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_quantize_save_load_both_loaders(family, tmp_path):
    model = moe_model(family)
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    experts = expert_linear_names(model)
    assert experts and all(isinstance(model.get_submodule(n), QuantLinear) for n in experts)
    for dense in MOE_LAYOUTS[family].dense:  # the shared-expert gate (a router) stays dense
        assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(dense))
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.isfinite(ref).all()
    # the packed experts compute what their fake-quantized dense weights compute
    sim = moe_model(family)
    split_fused_experts(sim)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                sim.get_submodule(n).weight.copy_(m.dequantize_weight())
        torch.testing.assert_close(sim(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # per expert, under the block names transformers saves (Mixtral's MLP: block_sparse_moe)
    mlp = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert f"model.layers.1.{mlp}.experts.3.down_proj.qweight" in keys
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in experts)
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, ref)


def test_cli_rtn_quantizes_every_expert_lazily(family, dense_dir, tmp_path, capsys):
    with safe_open(str(dense_dir / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    layout = MOE_LAYOUTS[family]
    if layout.disk is not None:  # transformers saves the family's per-expert names
        block = "model.layers.1."
        assert block + layout.disk["down_proj"].format(e=3) in on_disk
    out = tmp_path / "q"
    assert main(["quantize", str(dense_dir), "--bits", "4", "--method", "rtn", "--out", str(out)]) == 0
    info = checkpoint_info(out)
    x = info["experts"]
    assert x["experts"] == 4 * x["moe_layers"] and x["matrices"] == 3 * x["experts"]
    assert x["quantized_matrices"] == x["matrices"] and x["quantized_weights"] == x["weights"] > 0
    assert x["dense"] == []
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{x['matrices']} of {x['matrices']} expert matrices quantized" in text and "100.0% of" in text
    # the lazy checkpoint equals quantize() in memory + save, tensor for tensor
    model = llmsqueeze.load_dense(str(dense_dir))
    llmsqueeze.quantize(model, bits=4, group_size=128, progress=False)
    mem = llmsqueeze.save_quantized(model, tmp_path / "mem")
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(mem / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    loaded = llmsqueeze.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_lazy_reads_fused_experts_on_disk(tmp_path):
    """A checkpoint that stores the fused 3-D tensors (as gpt-oss's do, or one saved that way)."""
    from safetensors.torch import save_file

    model = moe_model("qwen3_moe")
    d = tmp_path / "fused"
    model.save_pretrained(d)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    out = llmsqueeze.quantize_lazy(str(d), tmp_path / "q", llmsqueeze.QuantScheme(bits=4, group_size=32),
                                   progress=False)[0]
    split_fused_experts(model)
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(out)(IDS).logits, model(IDS).logits)


class _Rows:
    """An engine method that records how many input rows each Linear's statistics came from."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    def collect(self, name, module, x):
        self.rows[name] = self.rows.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]

    def apply(self, name, module):
        return module


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_each_expert_calibrates_on_its_routed_tokens(family, caplog):
    model = moe_model(family)
    split_fused_experts(model)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    routed = {}  # tokens per expert, from the real router's choices on the block's true inputs

    def count(name):
        def hook(module, args, out):
            idx = args[1]
            routed[name] = torch.bincount(idx.reshape(-1), minlength=module.num_experts) + routed.get(name, 0)
        return hook

    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoEExperts)}
    handles = [m.register_forward_hook(count(n)) for n, m in moes.items()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    n_tokens = ids.numel()
    names = quantizable_modules(model, llmsqueeze.QuantScheme())
    assert set(expert_linear_names(model)) <= set(names)
    # block 0's inputs are the embeddings either way; min_tokens above some experts' counts
    min_tokens = int(routed["model.layers.0.mlp.experts"].float().median()) + 1
    method = _Rows()
    caplog.set_level("INFO", logger="llmsqueeze")
    stats = run_sequential(model, list(ids.split(2)), method, names, progress=False, expert_min_tokens=min_tokens)
    block0 = "model.layers.0.mlp.experts"
    rare = {r["expert"] for r in stats.rare_experts}
    for e, c in enumerate(routed[block0].tolist()):
        for role in ("gate_proj", "up_proj", "down_proj"):
            got = method.rows[f"{block0}.{e}.{role}"]
            if c >= min_tokens:  # exactly the routed tokens, unweighted
                assert got == c and f"{block0}.{e}" not in rare
            else:  # the rare-expert policy: all tokens too (the routed ones then twice)
                assert got == c + n_tokens and f"{block0}.{e}" in rare
    assert any("calibrated on all" in r.message for r in caplog.records)
    assert rare  # the median threshold leaves some expert below it


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_gptq_quantizes_every_expert_finite(family, tmp_path):
    model = moe_model(family)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    llmsqueeze.quantize(model, bits=4, group_size=32, data=ids, method="gptq", progress=False, expert_min_tokens=64)
    experts = expert_linear_names(model)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in experts)
    for n in experts:
        m = model.get_submodule(n)
        assert torch.isfinite(m.scales).all()
    # 64 tokens x top-2 over 4 experts: 32 per expert on average, so most are below 64 and saw all tokens
    rare = model._llmsqueeze_stats.rare_experts
    assert rare and all(r["routed_tokens"] < 64 and r["calibrated_on"] == 64 for r in rare)
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.isfinite(ref).all()
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "gptq"
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, ref)


def test_bad_expert_min_tokens_is_one_line():
    model = moe_model("qwen3_moe")
    ids = torch.randint(3, 64, (2, 8))
    with pytest.raises(llmsqueeze.LlmsqueezeError, match="expert_min_tokens"):
        llmsqueeze.quantize(model, bits=4, data=ids, method="gptq", progress=False, expert_min_tokens=0)


def test_cli_gptq_lazy_equals_in_memory(tmp_path, text_file):
    """GPTQ block by block from the per-expert tensors on disk (Mixtral's renamed MLP included) writes
    what loading, quantizing and saving in memory writes, tensor for tensor."""
    src = tmp_path / "mixtral"
    moe_model("mixtral").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    args = ["quantize", str(src), "--bits", "4", "--group-size", "32", "--method", "gptq", "--calib", str(text_file),
            "--n-samples", "4", "--seq-len", "16"]
    assert main(args + ["--out", str(tmp_path / "lazy")]) == 0
    assert main(args + ["--no-lazy", "--out", str(tmp_path / "mem")]) == 0
    with safe_open(str(tmp_path / "lazy/model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "mem/model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(".experts.3.up_proj.qweight" in k for k in a.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert checkpoint_info(tmp_path / "lazy")["experts"]["dense"] == []


def test_true_sequential_calibrates_expert_inputs_before_outputs():
    from llmsqueeze.engine import _groups
    from llmsqueeze.models import ARCHS

    model = moe_model("qwen2_moe")
    split_fused_experts(model)
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if type(m) is torch.nn.Linear and n != "mlp.shared_expert_gate"]
    groups = _groups(names, ARCHS["qwen2_moe"].sequential, True)
    assert groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert groups[1] == ["self_attn.o_proj"]
    assert set(groups[2]) == {f"mlp.experts.{e}.{r}" for e in range(4) for r in ("gate_proj", "up_proj")} | {
        "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"}
    assert set(groups[3]) == {f"mlp.experts.{e}.down_proj" for e in range(4)} | {"mlp.shared_expert.down_proj"}
    assert len(groups) == 4


def _olmoe():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OlmoeConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_generic_fallback_reads_experts_from_transformers_flags(tmp_path):
    """OLMoE has no row: its experts carry @use_experts_implementation's flags and the plain gated MLP."""
    model = _olmoe()
    assert model.config.model_type not in MOE_LAYOUTS and len(moe_layouts(model)) == 2
    src = tmp_path / "olmoe"
    model.save_pretrained(src)
    out = llmsqueeze.quantize_lazy(str(src), tmp_path / "q", llmsqueeze.QuantScheme(bits=4, group_size=32),
                                   progress=False)[0]
    llmsqueeze.quantize(model, bits=4, group_size=32, progress=False)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in expert_linear_names(model))
    with torch.no_grad():
        ref = model(IDS).logits
    for loaded in (llmsqueeze.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)):
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, ref)


def test_unknown_fused_experts_are_one_line(tmp_path, capsys):
    """Llama 4's experts are fused differently (no flags, routing folded into the inputs): refused, not left dense."""
    import transformers as tf

    cfg = tf.Llama4TextConfig(vocab_size=64, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=128, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    src = tmp_path / "llama4"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    capsys.readouterr()
    assert main(["quantize", str(src), "--bits", "4", "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "feed_forward.experts (Llama4TextExperts)" in err and "MoELayout" in err
    assert not (tmp_path / "q").exists()


def test_export_writes_per_expert_names_and_imports_back(tmp_path):
    """compressed-tensors and GPTQ exports name each expert's matrices as the Qwen MoE checkpoints do
    (mlp.experts.{e}.down_proj.*), and import back into per-expert QuantLinears with the same logits."""
    model = moe_model("qwen3_moe")
    llmsqueeze.quantize(model, bits=4, group_size=16, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    q = llmsqueeze.save_quantized(model, tmp_path / "q")
    for fmt, suffix in (("compressed-tensors", "weight_packed"), ("gptq", "qweight")):
        out = llmsqueeze.export(q, fmt, tmp_path / fmt)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f"model.layers.1.mlp.experts.3.down_proj.{suffix}" in set(f.keys())
        loaded = llmsqueeze.from_pretrained(out)
        assert all(isinstance(loaded.get_submodule(n), QuantLinear) for n in expert_linear_names(model))
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-3, atol=1e-3)  # gptq: scales re-stored


def test_interrupted_gptq_resumes_with_per_expert_names(tmp_path, monkeypatch):
    """A lazy GPTQ run stopped after block 0 and resumed writes what an uninterrupted run writes."""
    src = tmp_path / "mixtral"
    moe_model("mixtral").save_pretrained(src)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    scheme = llmsqueeze.QuantScheme(bits=4, group_size=32)
    kw = dict(data=ids, method="gptq", progress=False)
    ref, _ = llmsqueeze.quantize_lazy(str(src), tmp_path / "ref", scheme, **kw)
    undo = interrupt_after_block(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt, match="after 1 of 2 blocks"):
        llmsqueeze.quantize_lazy(str(src), tmp_path / "q", scheme, **kw)
    undo()
    out, stats = llmsqueeze.quantize_lazy(str(src), tmp_path / "q", scheme, resume=True, **kw)
    assert stats.blocks == 2
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(ref / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_reaches_every_expert(method, tmp_path):
    """Wanda's norms and SparseGPT's Hessians come from each expert's routed tokens (the same engine);
    every expert matrix ends exactly 50 % sparse per row, saved sparse, loaded back equal."""
    model = moe_model("qwen2_moe")
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    llmsqueeze.prune(model, method, 0.5, data=ids, progress=False)
    experts = expert_linear_names(model)
    for n in experts:
        w = model.get_submodule(n).weight
        assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all(), n
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.isfinite(ref).all()
    out = llmsqueeze.save_quantized(model, tmp_path / "s")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(experts) <= set(qc["sparsity"]["layers"])
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(out)(IDS).logits, ref)


class _Live(_Rows):
    """Also the most Linears whose statistics were held at once (collected, not yet applied)."""

    def __init__(self):
        super().__init__()
        self.live, self.most = set(), 0

    def collect(self, name, module, x):
        super().collect(name, module, x)
        self.live.add(name)
        self.most = max(self.most, len(self.live))

    def apply(self, name, module):
        self.live.discard(name)
        return module


def test_experts_per_pass_bounds_statistics_and_keeps_the_result(tmp_path):
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    counts = {}
    for per_pass in (None, 1):
        model = moe_model("qwen3_moe")
        split_fused_experts(model)
        method = _Live()
        run_sequential(model, list(ids.split(2)), method, quantizable_modules(model, llmsqueeze.QuantScheme()),
                       progress=False, expert_min_tokens=1, experts_per_pass=per_pass)
        counts[per_pass] = (method.most, method.rows)
    assert counts[None][0] == 4 + 4 * 3  # q, k, v, o and every expert's three matrices at once
    assert counts[1][0] == 4  # one expert's three, or the attention's four
    assert counts[1][1] == counts[None][1]  # each Linear saw the same tokens
    outs = []
    for per_pass in (None, 1):
        model = moe_model("qwen2_moe")
        llmsqueeze.quantize(model, bits=4, group_size=32, data=ids, method="gptq", progress=False,
                            experts_per_pass=per_pass)
        outs.append(llmsqueeze.save_quantized(model, tmp_path / f"q{per_pass}"))
    with safe_open(str(outs[0] / "model.safetensors"), "pt") as a, safe_open(str(outs[1] / "model.safetensors"), "pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("flag", [["--expert-min-tokens", "0"], ["--experts-per-pass", "0"]])
def test_cli_bad_expert_options_are_one_line(flag, tmp_path, text_file, capsys):
    src = tmp_path / "m"
    moe_model("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    capsys.readouterr()
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "gptq", "--calib", str(text_file), "--n-samples", "2",
                 "--seq-len", "16", *flag, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0].lstrip("-").replace("-", "_") in err
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_balancing_folds_keep_the_float_moe_block(family):
    """SmoothQuant/AWQ's folds for MoE blocks (attention norms and v -> o; each expert's and the shared
    expert's up -> down; never the post-attention norm the router reads) leave the float block's
    function unchanged, routing included."""
    from llmsqueeze.quant.smoothquant import input_names, smooth_block, smooth_map_for

    model = moe_model(family)
    split_fused_experts(model)
    smap = smooth_map_for(model)
    assert not any(norm == "post_attention_layernorm" for norm, _ in smap.norms)
    block = model.model.layers[-1]
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, -1)
    kw = dict(position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None, position_ids=pos)
    with torch.no_grad():
        ref = block(x, **kw)
        ref = ref[0] if isinstance(ref, tuple) else ref
        names = input_names(block, smap, True)
        if family != "gpt_oss":
            assert "mlp.experts.3.down_proj" in names
        g = torch.Generator().manual_seed(1)
        absmax = {n: torch.rand(linear_weight(block.get_submodule(n)).shape[1], generator=g) * 4 + 0.1 for n in names}
        applied = smooth_block(block, smap, absmax, 0.5)
        assert applied
        got = block(x, **kw)
        got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_balances_every_expert(method, tmp_path, caplog):
    model = moe_model("qwen3_moe")
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    caplog.set_level("INFO", logger="llmsqueeze")
    llmsqueeze.quantize(model, bits=4, group_size=16, data=ids, method=method, progress=False, expert_min_tokens=40)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in expert_linear_names(model))
    groups = {r["group"] for r in model._llmsqueeze_report if "group" in r}
    assert {f"model.layers.{i}.mlp.experts.{e}.up_proj" for i in range(2) for e in range(4)} <= groups
    assert not any("post_attention_layernorm" in g for g in groups)
    assert all(r["error"] <= r["error_rtn"] for r in model._llmsqueeze_report if "group" in r)
    assert any("calibrated on all tokens" in r.message for r in caplog.records)  # 32 per expert on average < 40
    with torch.no_grad():
        ref = model(IDS).logits
    assert torch.isfinite(ref).all()
    out = llmsqueeze.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(llmsqueeze.from_pretrained(out)(IDS).logits, ref)


def _never_route_to(model, expert: int):
    """Make every router of `model` send expert `expert`'s picks to expert 0: no calibration token reaches it."""
    for layer in model.model.layers:
        gate = layer.mlp.gate
        real = gate.forward

        def forward(h, real=real):
            logits, weights, idx = real(h)
            return logits, weights, torch.where(idx == expert, torch.zeros_like(idx), idx)

        gate.forward = forward


@pytest.mark.parametrize("method", ["gptq", "awq", "w8a8-static", "sparsegpt"])
def test_an_expert_no_token_reaches_is_calibrated_on_all_tokens(method):
    model = moe_model("qwen3_moe")
    _never_route_to(model, 3)
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    if method == "sparsegpt":
        llmsqueeze.prune(model, method, 0.5, data=ids, progress=False)
    elif method == "w8a8-static":
        llmsqueeze.quantize(model, llmsqueeze.W8A8Scheme(act="static"), data=ids, progress=False)
    else:
        llmsqueeze.quantize(model, bits=4, group_size=16, data=ids, method=method, progress=False)
    if method != "awq":  # (AWQ's statistics come from its own pass, with the same policy: logged)
        never = [r for r in model._llmsqueeze_stats.rare_experts if r["expert"].endswith("experts.3")]
        assert len(never) == 2 and all(r["routed_tokens"] == 0 and r["calibrated_on"] == 64 for r in never)
    for n in expert_linear_names(model):
        layer = model.get_submodule(n)
        for t in layer.state_dict().values():
            assert not t.is_floating_point() or torch.isfinite(t).all(), n
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()

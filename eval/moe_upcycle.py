#!/usr/bin/env python3
"""A mixture of experts made from the real SmolLM2-135M (no real MoE is small enough for these
machines), and GPTQ on it beside llm-compressor's, same calibration ids, same protocol (issue 22).

    python eval/moe_upcycle.py build                      # -> ~/.cache/llmsqueeze/smollm2-moe-e4k2
    python eval/moe_upcycle.py run --llmc-python /work/venvs/llmc/bin/python

The recipe (`build`), seeded: a Mixtral model with SmolLM2-135M's embeddings (tied head), norms and
attention as they are. Each block's MLP becomes E experts (default 4, top-2 routing, Mixtral's
softmax over the top-k): expert e's gate, up and down are the MLP's matrices plus independent Gaussian
noise of `--noise` (default 0.05) times each matrix's standard deviation, so the experts differ but
each still computes about what the MLP did. The router of each block has Gaussian weights scaled so
that its logits have standard deviation `--router-std` (default 1.0) on the block's real inputs (the
post-attention norm's outputs on the first 512 tokens of WikiText-2 valid.txt through the dense model):
tokens then spread over the experts instead of collapsing on one. Saved as a bf16 checkpoint with its
tokenizer, loadable by any transformers with Mixtral.

`run`: dense perplexity, RTN w4 g64 (ours), then eval/compare_llmcompressor.py's GPTQ w4 g64 rows (ours
and llm-compressor's GPTQModifier in its own venv, the same 128 x 512 calibration ids of valid.txt, seed
0) on this model; WikiText-2 test and Python's reference docs, 8 windows of 2048 tokens. JSON to
eval/results/moe_upcycle.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = Path("~/.cache/llmsqueeze/smollm2-moe-e4k2").expanduser()


def build(src: str, out: Path, experts: int, top_k: int, noise: float, router_std: float, seed: int,
          calib_text: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
        router_jitter_noise=0.0, output_router_logits=False)
    moe = MixtralForCausalLM(cfg).eval()

    # the blocks' real inputs to the MLP: post-attention norm outputs of the dense model
    text = Path(calib_text).read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    feats: dict[int, torch.Tensor] = {}
    hooks = [b.post_attention_layernorm.register_forward_hook(
        lambda m, a, o, i=i: feats.__setitem__(i, o.detach()[0])) for i, b in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()

    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for i, (db, mb) in enumerate(zip(dense.model.layers, moe.model.layers)):
            mlp = db.mlp
            moe_mlp = mb.mlp
            ws = {r: getattr(mlp, r).weight for r in ("gate_proj", "up_proj", "down_proj")}
            per = {r: torch.stack([w + noise * w.std() * torch.randn(w.shape, generator=g) for _ in range(experts)])
                   for r, w in ws.items()}
            moe_mlp.experts.gate_up_proj.copy_(torch.cat([per["gate_proj"], per["up_proj"]], dim=1))
            moe_mlp.experts.down_proj.copy_(per["down_proj"])
            r = torch.randn(experts, c.hidden_size, generator=g)
            logits_std = (feats[i] @ r.t()).std()
            moe_mlp.gate.weight.copy_(r * (router_std / logits_std))
    left = [k for k in missing if ".mlp." not in k and "lm_head" not in k]
    assert not left, left

    # how the router spreads the calibration text's tokens (top-k counts per expert, block 0 and the last)
    spread = {}
    for i in (0, c.num_hidden_layers - 1):
        top = (feats[i] @ moe.model.layers[i].mlp.gate.weight.t()).topk(top_k, dim=-1).indices
        spread[f"block {i}"] = torch.bincount(top.flatten(), minlength=experts).tolist()
    out.mkdir(parents=True, exist_ok=True)
    moe.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    recipe = {"source": src, "experts": experts, "top_k": top_k, "noise": noise, "router_std": router_std,
              "seed": seed, "router_scaled_on": f"first 512 tokens of {calib_text}", "tokens_per_expert": spread,
              "parameters": sum(p.numel() for p in moe.parameters())}
    (out / "upcycle_recipe.json").write_text(json.dumps(recipe, indent=1))
    return recipe


def ppl_rows(model: str, calib: str, test: str, test2: str, windows: int) -> list[dict]:
    """Dense and RTN w4 g64 (ours) on both texts, in this process."""
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, perplexity

    bos = model_bos_token_id(model)
    rows = []
    for label in ("dense", "llmsqueeze rtn w4 g64"):
        m = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        if label != "dense":
            llmsqueeze.quantize(m, llmsqueeze.QuantScheme(bits=4, group_size=64), method="rtn", progress=False)
        tq = time.perf_counter() - t0
        row = {"run": label, "quantize_s": tq}
        for key, ids in (("ppl", test), ("ppl python-docs", test2)):
            row[key] = perplexity(m, torch.load(ids), windows=windows, progress=False, bos_token_id=bos)["ppl"]
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["build", "run"])
    add_protocol_args(ap)
    ap.add_argument("--moe", default=str(DEFAULT_OUT), help="the upcycled model's directory")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--router-std", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "moe_upcycle.json"))
    args = ap.parse_args()

    if args.what == "build":
        print(json.dumps(build(str(Path(args.model).expanduser()), Path(args.moe), args.experts, args.top_k,
                               args.noise, args.router_std, args.seed, args.calib), indent=1))
        return

    import torch

    from llmsqueeze.evaluate import protocol_files, write_results

    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        from pydoc_data.topics import topics
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.moe)
        test2 = str(Path(tmp) / "pydocs.pt")
        torch.save(tok("\n\n".join(topics[k] for k in sorted(topics)), return_tensors="pt").input_ids[0], test2)
        rows = ppl_rows(args.moe, calib, test, test2, args.windows)
        gptq_json = str(Path(tmp) / "gptq.json")
        cmd = [sys.executable, str(HERE / "compare_llmcompressor.py"), "--model", args.moe, "--calib", args.calib,
               "--test", args.test, "--windows", str(args.windows), "--schemes", "4:64:asym", "--defaults-only",
               "--llmc-python", args.llmc_python, "--out", gptq_json]
        subprocess.run(cmd + (["--skip-peer"] if args.skip_peer else []), check=True)
        rows += json.loads(Path(gptq_json).read_text())["results"]
    recipe = json.loads((Path(args.moe) / "upcycle_recipe.json").read_text())
    print("\n| run | WikiText-2 | quantize s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r.get('ppl', float('nan')):.3f} | {r.get('quantize_s', float('nan')):.0f} |")
    write_results(args.out, rows, model=args.moe, protocol=protocol, recipe=recipe)


if __name__ == "__main__":
    main()

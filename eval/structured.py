#!/usr/bin/env python3
"""Structured MLP pruning on the real model: perplexity, parameter count and CPU prefill speed-up vs the
fraction of MLP channels removed (the same count in every block, so the saved model is a plain
transformers model with a smaller intermediate_size).

    python eval/structured.py --removed 0.1 0.2 0.3 0.4 0.5 --score l2 activation
    python eval/structured.py --removed 0.1 0.5 --score l2 --windows 1 --prompt-len 128 --out /tmp/s.json   # quick

Perplexity by the protocol of ../shared/README.md (2048-token windows of WikiText-2 test, first N,
float32 CPU); the activation score calibrates on 128 x 512 tokens (seed 0) of valid.txt; prefill:
one forward over a random prompt, best of 3 after a warm-up, in --dtype, on --threads threads.
Prints a markdown table, writes JSON and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--test", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--removed", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--score", nargs="*", default=["l2", "activation"], choices=("l2", "activation"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/results/structured_mlp.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    import llmsqueeze
    from llmsqueeze.data import bos_token_id, calibration_batches
    from llmsqueeze.evaluate import load_eval_text, perplexity, tokenize_text, write_results
    from llmsqueeze.pruning.structured import prune_mlp_channels

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    test = tokenize_text(tok, load_eval_text(args.test))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    calib = calibration_batches(tok, args.calib, args.n_samples, args.seq_len, seed=0) if "activation" in args.score else None
    prompt = torch.randint(0, tok.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def prefill_s(model) -> float:
        m = model.to(getattr(torch, args.dtype))
        best = float("inf")
        for r in range(4):
            t0 = time.perf_counter()
            m(prompt, use_cache=False)
            if r:
                best = min(best, time.perf_counter() - t0)
        model.float()
        return best

    def measure(label: str, score: str | None, removed: float, model) -> dict:
        params = sum(p.numel() for p in model.parameters())
        ppl = perplexity(model, test, windows=args.windows, progress=False, bos_token_id=bos)["ppl"]
        row = {"label": label, "score": score, "removed": removed, "intermediate_size": model.config.intermediate_size,
               "params": params, "ppl": ppl, "prefill_s": prefill_s(model)}
        print(f"{label:24s} I={row['intermediate_size']:5d} params {params / 1e6:7.2f} M  ppl {ppl:8.2f}  "
              f"prefill {args.prompt_len / row['prefill_s']:7.0f} tok/s", flush=True)
        return row

    rows = [measure("dense", None, 0.0, llmsqueeze.load_dense(args.model, dtype=torch.float32).eval())]
    for score in args.score:
        for removed in args.removed:
            model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            prune_mlp_channels(model, 1 - removed, score=score, data=calib)
            row = measure(f"{score} -{removed:.0%} MLP", score, removed, model)
            row["prune_s"] = time.perf_counter() - t0
            rows.append(row)
    dense = rows[0]
    for r in rows:
        r["param_ratio"] = r["params"] / dense["params"]
        r["prefill_speedup"] = dense["prefill_s"] / r["prefill_s"]

    print(f"\n| MLP channels removed | score | intermediate | parameters | perplexity ({args.windows} windows) "
          f"| prefill speed-up ({args.prompt_len} tokens, {args.dtype}, {args.threads} threads) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['removed']:.0%} | {r['score'] or 'dense'} | {r['intermediate_size']} | {r['params'] / 1e6:.1f} M "
              f"({r['param_ratio']:.0%}) | {r['ppl']:.2f} | {r['prefill_speedup']:.2f}x |")
    out = write_results(
        args.out, rows, model=args.model,
        protocol=f"perplexity on {args.test}, 2048-token windows, first {args.windows}, float32 CPU; activation score "
                 f"calibrated on {args.n_samples}x{args.seq_len} tokens (seed 0) of {args.calib}; prefill "
                 f"{args.prompt_len} tokens, {args.dtype}, {args.threads} threads, best of 3",
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for score in args.score:
        rs = [dense] + [r for r in rows if r["score"] == score]
        ax[0].plot([r["removed"] for r in rs], [r["ppl"] for r in rs], "o-", label=f"{score} score")
        ax[1].plot([r["removed"] for r in rs], [r["prefill_speedup"] for r in rs], "o-", label=f"{score} score")
    ax[0].set(xlabel="fraction of MLP channels removed", ylabel=f"perplexity (WikiText-2, {args.windows} windows)",
              yscale="log", title="quality")
    ax[1].set(xlabel="fraction of MLP channels removed", ylabel="CPU prefill speed-up vs dense", title="speed")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"{Path(args.model).name}: structured MLP pruning")
    fig.tight_layout()
    png = Path(out).with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""WikiText-2 perplexity of RTN schemes on a real model (the protocol of shared/README.md).

    python eval/perplexity.py --model ~/.cache/llmsqueeze/smollm2-135m \
        --data ../shared/data/wikitext-2/test.txt --windows 8

Runs dense, then RTN at 8/4/3 bits x group 128/64 x asym/sym x plain/clip-search (the default,
magnitude-weighted objective; at 4 and 3 bits also the plain-MSE objective as an ablation); prints a
markdown table (with the independent reference numbers where the protocol gives them) and writes
JSON to eval/results/perplexity_rtn.json.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import llmsqueeze
from llmsqueeze.data import bos_token_id
from llmsqueeze.evaluate import load_eval_text, perplexity, tokenize_text, write_results

# Measured with this protocol by an implementation independent of the project (shared/README.md).
REFERENCE = {
    "dense": 17.04,
    (4, 64, False): 21.60,
    (4, 64, True): 23.84,
    (3, 64, False): 52.03,
    (8, 64, False): 17.03,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--windows", type=int, default=8, help="8 = quick protocol; 0 = all windows")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--out", default="eval/results/perplexity_rtn.json")
    ap.add_argument("--no-ablation", action="store_true", help="skip the plain-MSE clipping rows")
    args = ap.parse_args()
    windows = args.windows or None

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tok, load_eval_text(args.data))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    rows = []

    def run(label: str, cfg: dict | None) -> None:
        model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        if cfg is not None:
            llmsqueeze.quantize(model, llmsqueeze.QuantScheme(**cfg), progress=False)
        tq = time.perf_counter() - t0
        res = perplexity(model, ids, windows=windows, progress=False, bos_token_id=bos)
        key = "dense" if cfg is None else (cfg["bits"], cfg["group_size"], cfg["sym"])
        ref = REFERENCE.get(key) if cfg is None or not cfg.get("clip_search") else None
        row = {"config": label, **(cfg or {}), "ppl": res["ppl"], "windows": res["windows"],
               "quantize_s": tq, "reference": ref,
               "vs_reference_pct": None if ref is None else 100 * (res["ppl"] / ref - 1)}
        rows.append(row)
        extra = "" if ref is None else f"  (reference {ref}, {row['vs_reference_pct']:+.2f}%)"
        print(f"{label:38s} ppl {res['ppl']:8.3f}   quantize {tq:6.1f}s{extra}", flush=True)
        del model

    run("dense", None)
    for bits, g, sym in itertools.product(args.bits, args.group_sizes, (False, True)):
        name = f"rtn w{bits} g{g} {'sym' if sym else 'asym'}"
        run(name, {"bits": bits, "group_size": g, "sym": sym})
        run(name + " +clip", {"bits": bits, "group_size": g, "sym": sym, "clip_search": True})
        if bits < 8 and not args.no_ablation:  # the plain-MSE clipping objective, for comparison
            run(name + " +clip (plain MSE)", {"bits": bits, "group_size": g, "sym": sym, "clip_search": True,
                                              "clip_weight_power": 0.0})

    print("\n| scheme | perplexity | reference | quantize time |\n|---|---|---|---|")
    for r in rows:
        ref = "" if r["reference"] is None else f"{r['reference']} ({r['vs_reference_pct']:+.2f}%)"
        print(f"| {r['config']} | {r['ppl']:.2f} | {ref} | {r['quantize_s']:.1f} s |")
    write_results(
        args.out, rows, model=args.model,
        protocol=f"WikiText-2 test, seq_len 2048, {'all' if windows is None else windows} windows, float32 CPU",
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Non-uniform grids (NF, k-means codebooks) vs the uniform grid on a real model: WikiText-2
perplexity (the protocol of shared/README.md), bits per weight with scales/zeros/codebooks, wall time.

    python eval/grids.py --model ~/.cache/llmsqueeze/smollm2-135m \
        --data ../shared/data/wikitext-2/test.txt --calib ../shared/data/wikitext-2/valid.txt \
        --configs rtn:uniform:4:64 rtn:nf:4:64 rtn:kmeans:3:128 gptq:kmeans:3:-1

A config is METHOD:GRID:BITS:GROUP (group -1 = one group per output channel). GPTQ uses 128 x 512
calibration tokens from --calib (seed 0), static act-order, its default clipping for the uniform
grid. Prints a markdown table and writes JSON (command, versions, date, os.getloadavg() before and
after each run: the CPU is shared, so times are indicative) to --out.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import llmsqueeze
from llmsqueeze.data import bos_token_id
from llmsqueeze.evaluate import load_eval_text, perplexity, tokenize_text, write_results
from llmsqueeze.nn import LUTLinear, QuantLinear

PACKED = ("qweight", "scales", "qzeros", "g_idx", "codebook")


def bits_per_weight(model) -> float:
    """Stored bits per quantized weight: packed indices/codes plus scales, zeros and codebooks."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, LUTLinear)):
            weights += m.in_features * m.out_features
            bits += sum(8 * t.numel() * t.element_size() for n in PACKED if (t := getattr(m, n, None)) is not None)
    return bits / max(weights, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--windows", type=int, default=8, help="8 = quick protocol; 0 = all windows")
    ap.add_argument("--configs", nargs="+", default=["rtn:uniform:4:64", "rtn:nf:4:64", "rtn:uniform:4:128",
                                                     "rtn:nf:4:128", "rtn:kmeans:4:-1", "rtn:kmeans:3:128"])
    ap.add_argument("--out", default="eval/results/grids.json")
    args = ap.parse_args()
    windows = args.windows or None

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tok, load_eval_text(args.data))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    calib = None
    rows = []
    for cfg in args.configs:
        method, grid, bits, group = cfg.split(":")
        scheme = llmsqueeze.QuantScheme(bits=int(bits), group_size=int(group), grid=grid)
        model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
        data = None
        if method == "gptq":
            if calib is None:
                from llmsqueeze.data import calibration_batches, load_calibration_texts

                calib = calibration_batches(tok, load_calibration_texts(args.calib), 128, 512, seed=0)
            data = calib
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        llmsqueeze.quantize(model, scheme, data=data, method=method, progress=False)
        tq = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = perplexity(model, ids, windows=windows, progress=False, bos_token_id=bos)
        te = time.perf_counter() - t1
        row = {"config": cfg, "method": method, "grid": grid, "bits": int(bits), "group_size": int(group),
               "scheme": model.config.quantization_config["scheme"], "ppl": res["ppl"], "windows": res["windows"],
               "bits_per_weight": bits_per_weight(model), "quantize_s": tq, "eval_s": te,
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        rows.append(row)
        print(f"{cfg:24s} ppl {row['ppl']:8.3f}  {row['bits_per_weight']:.3f} bits/w  quantize {tq:6.1f}s  "
              f"eval {te:5.1f}s  load {load_before[0]:.1f}", flush=True)
        del model
        write_results(args.out, rows, model=args.model, protocol=(
            f"WikiText-2 test, seq_len 2048, {'all' if windows is None else windows} windows, float32 CPU; "
            "GPTQ calibration 128 x 512 tokens of valid.txt, seed 0"))

    print("\n| method | grid | bits | group | perplexity | bits/weight | quantize time |\n|---|---|---|---|---|---|---|")
    for r in rows:
        g = "per-channel" if r["group_size"] == -1 else r["group_size"]
        print(f"| {r['method']} | {r['grid']} | {r['bits']} | {g} | {r['ppl']:.2f} | {r['bits_per_weight']:.3f} | "
              f"{r['quantize_s']:.0f} s |")


if __name__ == "__main__":
    main()

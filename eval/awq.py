#!/usr/bin/env python3
"""AWQ balancing then RTN ("awq") or GPTQ ("awq-gptq") on the real model, protocol of shared/README.md.

    python eval/awq.py                                   # all methods x schemes below
    python eval/awq.py --methods awq --schemes 4:64:asym

Calibration: 128 samples x 512 tokens at random offsets (seed 0) of WikiText-2 valid.txt (the
samples of our GPTQ evals). Perplexity: WikiText-2 test, 2048-token windows, first 8, float32 CPU.
Each run is a fresh process; its wall time is the quantization alone, and os.getloadavg() is
recorded before and after it (the CPU is shared: times are only comparable at similar loads).
Prints a markdown table and writes eval/results/awq.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

SCHEMES = ["4:64:asym", "4:128:asym", "3:64:asym"]
METHODS = ["awq-gptq", "awq"]


def run_one(model: str, calib: str, test: str, bits: int, group: int, sym: bool, method: str, windows: int) -> dict:
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity

    torch.manual_seed(0)
    ids = torch.load(calib)
    m = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    llmsqueeze.quantize(m, llmsqueeze.QuantScheme(bits=bits, group_size=group, sym=sym), data=ids, method=method,
                        progress=False)
    tq = time.perf_counter() - t0
    load1 = os.getloadavg()
    args = m.config.quantization_config["method_args"]
    alphas = list(args["awq"]["alphas"].values())
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    ppl = perplexity(m, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return {"tool": f"llmsqueeze {llmsqueeze.__version__}", "method": method, "quantize_s": tq,
            "peak_rss_mib": peak_rss_mib(), "ppl": ppl, "loadavg_before": load0, "loadavg_after": load1,
            "threads": torch.get_num_threads(), "alpha_mean": sum(alphas) / len(alphas),
            "clip_wins": args["awq"].get("clip_wins"), "alphas": args["awq"]["alphas"]}


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--schemes", nargs="*", default=SCHEMES, help="bits:group:sym|asym, e.g. 4:64:asym")
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--out", default="eval/results/awq.json")
    ap.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one run
        model, calib, test, bits, group, sym, method = args.one
        print(json.dumps(run_one(model, calib, test, int(bits), int(group), sym == "1", method, args.windows)))
        return

    from llmsqueeze.evaluate import protocol_files, run_json, write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        for spec in args.schemes:
            b, g, s = spec.split(":")
            name = f"w{b} g{g} {s}"
            for method in args.methods:
                cmd = [sys.executable, __file__, "--windows", str(args.windows), "--one", args.model, calib, test,
                       b, g, "1" if s == "sym" else "0", method]
                res = run_json(cmd)
                rows.append({"scheme": name, "bits": int(b), "group_size": int(g), "sym": s == "sym", **res})
                write_results(args.out, rows, model=args.model, protocol=protocol, partial=True)  # a stop keeps the rows
                if "error" in res:
                    print(f"{name:14s} {method:9s} ERROR {res['error']}", flush=True)
                else:
                    print(f"{name:14s} {method:9s} ppl {res['ppl']:8.3f}  quantize {res['quantize_s']:7.1f} s  "
                          f"load {res['loadavg_before'][0]:.1f}->{res['loadavg_after'][0]:.1f}", flush=True)

    print("\n| scheme | method | perplexity (8 windows) | quantize time | load avg (1 min) before/after |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r.get('method', '?')} | error: {r['error']} | | |")
        else:
            print(f"| {r['scheme']} | {r['method']} | {r['ppl']:.2f} | {r['quantize_s']:.0f} s | "
                  f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f} |")
    write_results(args.out, rows, model=args.model, protocol=protocol, partial=False)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Mixed precision vs uniform bit widths on the real model (the protocol of shared/README.md).

    python eval/mixed.py --model ~/.cache/llmsqueeze/smollm2-135m --budgets 3.5 3.25 2.5 \
        --methods rtn gptq --uniform 3 4

The sensitivity table (each Linear's RTN output error at 2/3/4/8 bits on the calibration inputs,
llmsqueeze.mixed) is measured once on the dense model and reused by every budget and method.
Calibration: 128 x 512 tokens of WikiText-2 valid.txt (seed 0); perplexity on test.txt, 2048-token
windows, first 8, float32 CPU. Bits per weight are what the packed layers store (qweight, scales,
qzeros), over the quantized Linears. Prints a markdown table and writes eval/results/mixed.json
after every row (the CPU is shared: os.getloadavg() is recorded per row).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import llmsqueeze
from llmsqueeze.evaluate import (
    add_protocol_args,
    model_bos_token_id,
    peak_rss_mib,
    perplexity,
    protocol_data,
    write_results,
)
from llmsqueeze.mixed import layer_bits_cost, measure_sensitivity
from llmsqueeze.models import quantizable_modules

# our earlier uniform runs, same protocol (README / eval/results/gptq_*.json, perplexity_rtn.json)
EARLIER = {("gptq", 3): 23.77, ("gptq", 4): 18.59, ("rtn", 4): 21.60, ("rtn", 3): 52.03}


def stored_bits(model, scheme) -> float:
    """Bits per quantized weight of the packed layers, from their buffers."""
    from llmsqueeze.nn import QuantLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += sum(8 * t.numel() * t.element_size() for t in (m.qweight, m.scales, m.qzeros))
            bits += 0 if m.g_idx is None else 8 * m.g_idx.numel() * 4
            weights += m.in_features * m.out_features
    return bits / weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="*", default=[3.5])
    ap.add_argument("--uniform", type=int, nargs="*", default=[3, 4], help="uniform widths to run beside")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--uniform-methods", nargs="*", default=["rtn"],
                    help="methods whose uniform rows are re-run (the others are quoted from earlier runs)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--out", default="eval/results/mixed.json")
    ap.add_argument("--runs", nargs="*", default=None,
                    help="explicit runs in order instead of --budgets/--methods/--uniform: METHOD:BUDGET or METHOD:uBITS")
    ap.add_argument("--sens-samples", type=int, default=None,
                    help="measure the sensitivity on the first N calibration samples only (default: all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's choice); 1 is much faster on a CPU shared with other jobs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    calib, test, protocol = protocol_data(args)
    bos = model_bos_token_id(args.model)  # BOS first in each window where the tokenizer puts it first
    base = llmsqueeze.QuantScheme(bits=4, group_size=args.group_size)
    protocol += f"; group {args.group_size} asym"

    model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
    names = quantizable_modules(model, base)
    t0 = time.perf_counter()
    table = measure_sensitivity(model, names, calib[: args.sens_samples], base, args.candidates, progress=False)
    sens_s = time.perf_counter() - t0
    sens_n = len(calib[: args.sens_samples])
    protocol += f"; sensitivity on the first {sens_n} calibration samples"
    print(f"sensitivity of {len(names)} layers at {args.candidates} bits on {sens_n} samples: {sens_s:.0f} s", flush=True)
    del model
    rows: list[dict] = []

    def save():
        write_results(args.out, rows, model=args.model, protocol=protocol, sensitivity_s=sens_s,
                      candidates=args.candidates, wall_s=time.perf_counter() - t_start,
                      sensitivity={n: {str(b): e for b, e in t.items()} for n, t in table.items()})

    def run(method: str, bits: int | None, budget: float | None) -> None:
        model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        llmsqueeze.quantize(model, llmsqueeze.QuantScheme(bits=bits or 4, group_size=args.group_size),
                            data=calib if method == "gptq" else None, method=method, progress=False,
                            **({} if budget is None else {"avg_bits": budget, "sensitivity": table,
                                                          "bit_candidates": tuple(args.candidates)}))
        tq = time.perf_counter() - t0
        qc = model.config.quantization_config
        hist = getattr(model, "_llmsqueeze_mixed", {}).get("histogram", {str(bits): len(names)})
        ppl = perplexity(model, test, windows=args.windows, progress=False, bos_token_id=bos)["ppl"]
        row = {"method": method, "budget": budget, "uniform_bits": bits, "bits_per_weight": stored_bits(model, qc),
               "histogram": hist, "ppl": ppl, "quantize_s": tq, "peak_rss_mib": peak_rss_mib(),
               "loadavg": os.getloadavg(), "earlier_ppl": EARLIER.get((method, bits))}
        rows.append(row)
        label = f"uniform {bits}-bit" if budget is None else f"mixed avg<={budget}"
        print(f"{method:5s} {label:18s} {row['bits_per_weight']:.3f} bits/w  ppl {ppl:8.3f}  widths {hist}  "
              f"quantize {tq:5.0f} s  load {row['loadavg'][0]:.1f}", flush=True)
        save()

    if args.runs:  # an explicit order, e.g. rtn:3.5 gptq:3.5 rtn:u3 (u = uniform width)
        for spec in args.runs:
            method, what = spec.split(":")
            run(method, int(what[1:]), None) if what.startswith("u") else run(method, None, float(what))
    else:
        for budget in args.budgets:  # the first budget under every method first: the CPU is shared
            for method in args.methods:
                run(method, None, budget)
        for method in args.methods:
            if method in args.uniform_methods:
                for b in args.uniform:
                    run(method, b, None)

    print("\n| method | scheme | bits/weight (stored) | widths (layers) | perplexity | quantize time |\n|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        if method not in args.uniform_methods or not any(r["method"] == method and r["budget"] is None for r in rows):
            for b in args.uniform:
                if (method, b) in EARLIER:
                    bpw = layer_bits_cost(576, 576, b, base) / 576**2  # every width here is a multiple of 32
                    print(f"| {method} | uniform {b}-bit (earlier run) | {bpw:.3f} | {b}: all | {EARLIER[(method, b)]:.2f} | |")
        for r in (r for r in rows if r["method"] == method):
            scheme = f"uniform {r['uniform_bits']}-bit" if r["budget"] is None else f"mixed, budget {r['budget']}"
            hist = ", ".join(f"{b}: {n}" for b, n in r["histogram"].items())
            print(f"| {method} | {scheme} | {r['bits_per_weight']:.3f} | {hist} | {r['ppl']:.2f} | {r['quantize_s']:.0f} s |")
    save()


if __name__ == "__main__":
    main()

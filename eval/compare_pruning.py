#!/usr/bin/env python3
"""Pruning side by side with llm-compressor on the real model, same calibration samples, same protocol:
magnitude (baseline, ours), Wanda and SparseGPT at 50 % unstructured and 2:4 (ours and llm-compressor's
WandaPruningModifier / SparseGPTModifier), and SparseGPT 2:4 joint with 4-bit quantization (ours).

    python eval/compare_pruning.py --llmc-python /work/venvs/llmc/bin/python
    python eval/compare_pruning.py --cases wanda:0.5 sparsegpt:2:4 --n-samples 16 --windows 2 --skip-peer   # quick

Calibration: 128 samples x 512 tokens at random offsets (seed 0) of WikiText-2 valid.txt, tokenized
once here and handed to both tools as token ids. Perplexity: WikiText-2 test, 2048-token windows,
first 8, float32 CPU. Each run is a fresh process. Prints a markdown table and writes
eval/results/pruning_vs_llmcompressor.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# case: method:target[:+bits]  target = sparsity or N:M
CASES = ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4",
         "sparsegpt:2:4:w4g128"]
PEERS = ("wanda", "sparsegpt")


def parse_case(case: str) -> tuple[str, dict, str | None]:
    """'sparsegpt:2:4:w4g128' -> ('sparsegpt', {'pattern': '2:4'}, 'w4g128')."""
    parts = case.split(":")
    method, rest = parts[0], parts[1:]
    bits = rest.pop() if rest[-1].startswith("w") else None
    target = {"pattern": f"{rest[0]}:{rest[1]}"} if len(rest) == 2 else {"sparsity": float(rest[0])}
    return method, target, bits


def run_ours(model: str, calib: str, test: str, case: str, opts: dict, windows: int) -> dict:
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity
    from llmsqueeze.pruning.masks import sparsity_of

    method, target, bits = parse_case(case)
    scheme = None
    if bits:
        b, g = bits[1:].split("g")
        scheme = llmsqueeze.QuantScheme(bits=int(b), group_size=int(g))
    ids = torch.load(calib)
    model_ = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    llmsqueeze.prune(model_, method, data=ids, scheme=scheme, progress=False, **target, **opts)
    tp = time.perf_counter() - t0
    rss = peak_rss_mib()
    layers = model_.config.quantization_config["sparsity"]["layers"]
    ws = [model_.get_submodule(n) for n in layers]
    ws = [m.dequantize_weight() if hasattr(m, "dequantize_weight") else m.weight for m in ws]
    measured = sum(sparsity_of(w) * w.numel() for w in ws) / sum(w.numel() for w in ws)
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    ppl = perplexity(model_, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return {"tool": f"llmsqueeze {llmsqueeze.__version__}", "options": opts, "prune_s": tp, "peak_rss_mib": rss,
            "measured_sparsity": measured, "ppl": ppl}


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python", help="python of llm-compressor's venv")
    ap.add_argument("--cases", nargs="*", default=None, help=f"method:target[:wBgG] (default: {' '.join(CASES)})")
    ap.add_argument("--opts", default="{}", help="JSON of extra llmsqueeze.prune() options for our runs")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--out", default="eval/results/pruning_vs_llmcompressor.json")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one of our runs
        model, calib, test, case, opts = args.one
        print(json.dumps(run_ours(model, calib, test, case, json.loads(opts), args.windows)))
        return

    from llmsqueeze.evaluate import bos_args, protocol_files, run_json, write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        for case in args.cases or CASES:
            method, target, bits = parse_case(case)
            runs = [(f"llmsqueeze {method}", [sys.executable, __file__, "--windows", str(args.windows), "--one",
                                              args.model, calib, test, case, args.opts])]
            if not args.skip_peer and method in PEERS and bits is None:
                cmd = [args.llmc_python, str(HERE / "peers" / "llmcompressor_prune.py"), args.model, calib, test, *bos_args(args.model),
                       "--method", method, "--windows", str(args.windows)]
                cmd += ["--pattern", target["pattern"]] if "pattern" in target else ["--sparsity", str(target["sparsity"])]
                runs.append((f"llm-compressor {method}", cmd))
            for label, cmd in runs:
                res = run_json(cmd)
                row = {"case": case, "run": label, **res}
                rows.append(row)
                if "error" in res:
                    print(f"{case:22s} {label:28s} ERROR {res['error']}", flush=True)
                else:
                    print(f"{case:22s} {label:28s} ppl {res['ppl']:8.3f}  prune {res['prune_s']:7.1f} s  "
                          f"sparsity {res['measured_sparsity']:.3f}  peak RSS {res['peak_rss_mib']:6.0f} MiB", flush=True)

    print("\n| case | tool | perplexity | measured sparsity | prune time | peak RSS |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | {r['run']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['case']} | {r['run']} | {r['ppl']:.2f} | {r['measured_sparsity']:.3f} | {r['prune_s']:.0f} s "
                  f"| {r['peak_rss_mib']:.0f} MiB |")
    write_results(
        args.out, rows, model=args.model,
        protocol=protocol,
    )


if __name__ == "__main__":
    main()

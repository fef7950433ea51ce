#!/usr/bin/env python3
"""GPTQ side by side with llm-compressor on the real model, same calibration samples, same protocol.

    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor
    python eval/compare_llmcompressor.py --llmc-python /work/venvs/llmc/bin/python

Calibration: 128 samples x 512 tokens at random offsets (seed 0) of WikiText-2 valid.txt, tokenized
once here and handed to both tools as token ids. Perplexity: WikiText-2 test, 2048-token windows,
first 8, float32 CPU. Each run is a fresh process (wall time of the quantization alone, peak RSS of
that process). Prints a markdown table and writes eval/results/gptq_vs_llmcompressor.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMES = [  # bits, group, sym
    (4, 64, False),
    (4, 64, True),
    (3, 64, False),
    (4, 128, False),
]
OURS = {  # label -> quantize() options
    "llmsqueeze gptq (defaults: act-order static)": {},
    "llmsqueeze gptq natural order": {"act_order": False, "static_groups": False},
}


def run_ours(model: str, calib: str, test: str, bits: int, group: int, sym: bool, opts: dict, windows: int) -> dict:
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity

    sys.path.insert(0, str(HERE / "peers"))
    from common import cpu_seconds  # eval/peers/common.py

    ids = torch.load(calib)
    model_ = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    opts = dict(opts)
    scheme = llmsqueeze.QuantScheme(bits=bits, group_size=group, sym=sym, **opts.pop("scheme", {}))
    t0, c0 = time.perf_counter(), cpu_seconds()
    llmsqueeze.quantize(model_, scheme, data=ids, method="gptq", progress=False, **opts)
    tq, cq = time.perf_counter() - t0, cpu_seconds() - c0
    rss = peak_rss_mib()
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    ppl = perplexity(model_, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return {"tool": f"llmsqueeze {llmsqueeze.__version__}", "options": opts, "quantize_s": tq, "quantize_cpu_s": cq,
            "peak_rss_mib": rss,
            "ppl": ppl}


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python", help="python of llm-compressor's venv")
    ap.add_argument("--schemes", nargs="*", default=None, help="e.g. 4:64:asym 3:64:asym (default: all four)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--llmc-bypass-divisibility", action="store_true",
                    help="llm-compressor with bypass_divisibility_checks=True (group sizes that do not divide K)")
    ap.add_argument("--defaults-only", action="store_true", help="run only our default options beside the peer")
    ap.add_argument("--ours", action="append", default=[], metavar="LABEL=JSON",
                    help='instead of the built-in option sets, run ours with these quantize() options; "scheme" '
                         'holds QuantScheme fields, e.g. \'grid20={"scheme": {"clip_grid": 20}}\' (repeatable)')
    ap.add_argument("--out", default="eval/results/gptq_vs_llmcompressor.json")
    ap.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one of our runs
        model, calib, test, bits, group, sym, opts = args.one
        print(json.dumps(run_ours(model, calib, test, int(bits), int(group), sym == "1", json.loads(opts), args.windows)))
        return

    from llmsqueeze.evaluate import bos_args, protocol_files, run_json, write_results

    schemes = SCHEMES
    if args.schemes:
        schemes = [(int(b), int(g), s == "sym") for b, g, s in (x.split(":") for x in args.schemes)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        for bits, group, sym in schemes:
            name = f"w{bits} g{group} {'sym' if sym else 'asym'}"
            runs = []
            ours = dict(x.split("=", 1) for x in args.ours)
            ours = {f"llmsqueeze gptq {k}": json.loads(v) for k, v in ours.items()} or dict(
                list(OURS.items())[: 1 if args.defaults_only else None])
            for label, opts in ({} if args.skip_ours else ours).items():
                cmd = [sys.executable, __file__, "--windows", str(args.windows), "--one", args.model, calib, test,
                       str(bits), str(group), "1" if sym else "0", json.dumps(opts)]
                runs.append((label, cmd))
            if not args.skip_peer:
                cmd = [args.llmc_python, str(HERE / "peers" / "llmcompressor_gptq.py"), args.model, calib, test, *bos_args(args.model),
                       "--bits", str(bits), "--group-size", str(group), "--windows", str(args.windows)]
                label = "llm-compressor gptq (defaults: actorder static)"
                if args.llmc_bypass_divisibility:
                    cmd, label = cmd + ["--bypass-divisibility"], label + ", bypass_divisibility_checks"
                runs.append((label, cmd + (["--sym"] if sym else [])))
            for label, cmd in runs:
                res = run_json(cmd)
                row = {"scheme": name, "bits": bits, "group_size": group, "sym": sym, "run": label, **res}
                rows.append(row)
                if "error" in res:
                    print(f"{name:14s} {label:48s} ERROR {res['error']}", flush=True)
                else:
                    print(f"{name:14s} {label:48s} ppl {res['ppl']:8.3f}  quantize {res['quantize_s']:7.1f} s  "
                          f"({res.get('quantize_cpu_s', float('nan')):7.1f} CPU-s)  peak RSS {res['peak_rss_mib']:6.0f} MiB", flush=True)

    print("\n| scheme | tool | perplexity | quantize time | CPU time | peak RSS |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['run']} | error: {r['error']} | | | |")
        else:
            print(f"| {r['scheme']} | {r['run']} | {r['ppl']:.2f} | {r['quantize_s']:.0f} s | {r.get('quantize_cpu_s', float('nan')):.0f} s | "
                  f"{r['peak_rss_mib']:.0f} MiB |")
    write_results(
        args.out, rows, model=args.model,
        protocol=protocol,
    )


if __name__ == "__main__":
    main()

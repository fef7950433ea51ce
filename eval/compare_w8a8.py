#!/usr/bin/env python3
"""W8A8 side by side with llm-compressor on the real model: same calibration samples, same protocol.

    python -m venv /work/venvs/llmc && /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor
    python eval/compare_w8a8.py --llmc-python /work/venvs/llmc/bin/python

Both quantize every Linear but the head to int8 per-channel symmetric weights and int8 activations
(per token at run time, or one calibrated scale per layer for "static"). llm-compressor runs its
documented recipe: SmoothQuantModifier(smoothing_strength=0.8), then GPTQModifier (or, for the
round-to-nearest rows, QuantizationModifier); its perplexity is measured on the model as oneshot
leaves it, whose Linears quantize their inputs on every forward (eval/peers/llmcompressor_w8a8.py
checks that). Ours runs W8A8Scheme's defaults (alpha searched per block, the static scale searched)
through Int8Linear's integer GEMM. Calibration: 128 samples x 512 tokens at random offsets (seed 0) of
WikiText-2 valid.txt, tokenized once here and handed to both as token ids; perplexity on WikiText-2
test, 2048-token windows, first 8, float32 CPU. Each run is a fresh process (wall and CPU time of the
quantization alone, peak RSS of that process). Prints a markdown table and writes
eval/results/w8a8_vs_llmcompressor.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# label -> (act, smoothing on, method)
CONFIGS = {
    "dynamic, SmoothQuant, GPTQ": ("dynamic", True, "gptq"),
    "dynamic, SmoothQuant, RTN": ("dynamic", True, "rtn"),
    "dynamic, no smoothing, RTN": ("dynamic", False, "rtn"),
    "static, SmoothQuant, RTN": ("static", True, "rtn"),
}


def run_ours(model: str, calib: str, test: str, act: str, smooth: bool, method: str, windows: int) -> dict:
    import time

    import torch

    import llmsqueeze
    from llmsqueeze.evaluate import model_bos_token_id, peak_rss_mib, perplexity

    sys.path.insert(0, str(HERE / "peers"))
    from common import cpu_seconds  # eval/peers/common.py

    model_ = llmsqueeze.load_dense(model, dtype=torch.float32).eval()
    res = {"tool": f"llmsqueeze {llmsqueeze.__version__}"}
    if act != "dense":
        scheme = llmsqueeze.W8A8Scheme(act=act, smooth_alpha="auto" if smooth else None)
        t0, c0 = time.perf_counter(), cpu_seconds()
        llmsqueeze.quantize(model_, scheme, data=torch.load(calib), method=method, progress=False)
        res.update(quantize_s=time.perf_counter() - t0, quantize_cpu_s=cpu_seconds() - c0, peak_rss_mib=peak_rss_mib(),
                   scheme=scheme.to_dict())
    bos = model_bos_token_id(model)  # BOS first in each window where the tokenizer puts it first
    res["ppl"] = perplexity(model_, torch.load(test), windows=windows, progress=False, bos_token_id=bos)["ppl"]
    return res


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python", help="python of llm-compressor's venv")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS), metavar="LABEL",
                    help=f"which rows (default all): {'; '.join(CONFIGS)}")
    ap.add_argument("--smoothing-strength", type=float, default=0.8, help="llm-compressor's SmoothQuant alpha")
    ap.add_argument("--llmc-act-observer", nargs="*", default=[None], metavar="NAME",
                    help="static rows: llm-compressor's activation observers to run, e.g. minmax static_minmax mse "
                         "(default: its default, minmax)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--out", default="eval/results/w8a8_vs_llmcompressor.json")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child: one of our runs
        model, calib, test, act, smooth, method = args.one
        print(json.dumps(run_ours(model, calib, test, act, smooth == "1", method, args.windows)))
        return

    from llmsqueeze.evaluate import bos_args, protocol_files, run_json, write_results

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test, protocol = protocol_files(args, tmp)
        ours = [sys.executable, __file__, "--windows", str(args.windows), "--one", args.model, calib, test]
        plan = [] if args.skip_ours else [("dense", "llmsqueeze", ours + ["dense", "0", "rtn"])]
        for label in args.configs:
            act, smooth, method = CONFIGS[label]
            if not args.skip_ours:
                plan.append((label, "llmsqueeze", ours + [act, "1" if smooth else "0", method]))
            for observer in ([] if args.skip_peer else args.llmc_act_observer if act == "static" else [None]):
                peer = [args.llmc_python, str(HERE / "peers" / "llmcompressor_w8a8.py"), args.model, calib, test, *bos_args(args.model),
                        "--act", act, "--method", method, "--windows", str(args.windows),
                        "--smoothing-strength", str(args.smoothing_strength if smooth else -1)]
                tool = "llm-compressor" + (f" (observer {observer})" if observer else "")
                plan.append((label, tool, peer + (["--act-observer", observer] if observer else [])))
        dense = None
        for label, tool, cmd in plan:
            res = run_json(cmd)
            if label == "dense" and "ppl" in res:
                dense = res["ppl"]
            row = {"config": label, "run": tool, **res}
            if dense is not None and "ppl" in res:
                row["vs_dense_pct"] = 100 * (res["ppl"] / dense - 1)
            rows.append(row)
            if "error" in res:
                print(f"{label:28s} {tool:40s} ERROR {res['error']}", flush=True)
            else:
                print(f"{label:28s} {tool:40s} ppl {res['ppl']:8.3f}  quantize {res.get('quantize_s', 0):7.1f} s  "
                      f"({res.get('quantize_cpu_s', 0):7.1f} CPU-s)  peak RSS {res.get('peak_rss_mib', 0):6.0f} MiB",
                      flush=True)

    print("\n| configuration | tool | perplexity | vs dense | quantize time | CPU time | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['run']} | error: {r['error']} | | | | |")
            continue
        pct = f"{r['vs_dense_pct']:+.2f}%" if "vs_dense_pct" in r and r["config"] != "dense" else ""
        t = f"{r['quantize_s']:.0f} s | {r['quantize_cpu_s']:.0f} s | {r['peak_rss_mib']:.0f} MiB" if "quantize_s" in r else " | |"
        print(f"| {r['config']} | {r['run']} | {r['ppl']:.3f} | {pct} | {t} |")
    write_results(args.out, rows, model=args.model, protocol=protocol,
                  llmcompressor_recipe=f"SmoothQuantModifier(smoothing_strength={args.smoothing_strength}) + "
                                       "GPTQModifier / QuantizationModifier, ignore=['lm_head']")


if __name__ == "__main__":
    main()

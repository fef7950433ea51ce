#!/usr/bin/env python3
"""CPU latency of a 4-bit model vs the same model dense, batch 1: prefill and decode tokens/s.

    python eval/latency.py --model ~/.cache/llmsqueeze/smollm2-135m --threads 2

Quantizes the model once (RTN 4-bit, group 128; and W8A8 dynamic) into a temp dir, then measures each
configuration in a fresh process (so peak RSS belongs to that configuration alone): dense fp32, dense
bf16, 4-bit with bf16 activations (CPU int4 kernel for decode), 4-bit with fp32 activations
(dequantize + matmul), W8A8 (int8 GEMM) with fp32 and bf16 activations. Prints a markdown table and
writes eval/results/latency_cpu.json. W8A8 is a prefill (compute-bound) scheme: compare it with

    python eval/latency.py --prompt-len 2048 --new-tokens 8 --configs 0 1 4 5 --out eval/results/latency_cpu_w8a8.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [
    # label, which model, dtype
    ("dense fp32", "dense", "float32"),
    ("dense bf16", "dense", "bfloat16"),
    ("rtn w4 g128, bf16 activations", "q4", "bfloat16"),
    ("rtn w4 g128, fp32 activations", "q4", "float32"),
    ("w8a8 dynamic (int8 GEMM), fp32 activations", "w8a8", "float32"),
    ("w8a8 dynamic (int8 GEMM), bf16 activations", "w8a8", "bfloat16"),
]


def measure_one(model_dir: str, dtype: str, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict:
    import torch

    from llmsqueeze.cli import _load_any
    from llmsqueeze.evaluate import latency, peak_rss_mib

    if threads:
        torch.set_num_threads(threads)
    model, _ = _load_any(model_dir, dtype)
    rss_loaded = peak_rss_mib()
    res = latency(model, prompt_len=prompt_len, new_tokens=new_tokens, batch=1, repeats=repeats)
    res["rss_after_load_mib"] = rss_loaded
    res["weights_mib"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    # the CPU int4 kernel's own packed copy of each 4-bit layer, built on first decode step
    caches = [m._int4_cache for m in model.modules() if getattr(m, "_int4_cache", None) is not None]
    res["int4_kernel_copy_mib"] = sum(c[1].numel() * c[1].element_size() + c[2].numel() * c[2].element_size()
                                      for c in caches) / 2**20
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="*", type=int, help="indices into the configuration list (default: all)")
    ap.add_argument("--out", default="eval/results/latency_cpu.json")
    ap.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child process: one configuration, JSON on the last line of stdout
        res = measure_one(args.one[0], args.one[1], args.prompt_len, args.new_tokens, args.repeats, args.threads)
        print(json.dumps(res))
        return

    from llmsqueeze.evaluate import write_results

    configs = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    with tempfile.TemporaryDirectory() as tmp:
        q4 = str(Path(tmp) / "q4")
        if any(c[1] == "q4" for c in configs):
            subprocess.run(
                [sys.executable, "-m", "llmsqueeze.cli", "quantize", args.model, "--bits", "4", "--group-size", "128",
                 "--out", q4], check=True, stdout=subprocess.DEVNULL,
            )
        w8a8 = str(Path(tmp) / "w8a8")  # speed does not depend on SmoothQuant: skip its calibration
        if any(c[1] == "w8a8" for c in configs):
            subprocess.run(
                [sys.executable, "-m", "llmsqueeze.cli", "quantize", args.model, "--scheme", "w8a8", "--smooth-alpha",
                 "off", "--out", w8a8], check=True, stdout=subprocess.DEVNULL,
            )
        rows = []
        for label, which, dtype in configs:
            cmd = [sys.executable, __file__, "--one", {"dense": args.model, "q4": q4, "w8a8": w8a8}[which], dtype,
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            rows.append({"config": label, "dtype": dtype, **res})
            print(f"{label:34s} prefill {res['prefill_tok_s']:8.1f} tok/s  decode {res['decode_tok_s']:7.2f} tok/s  "
                  f"weights {res['weights_mib']:6.1f} MiB  peak RSS {res['peak_rss_mib']:6.0f} MiB", flush=True)

    print(f"\n| model | prefill tok/s ({args.prompt_len} tokens) | decode tok/s | weights in memory | peak RSS |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['weights_mib']:.0f} MiB "
              f"| {r['peak_rss_mib']:.0f} MiB |")
    write_results(args.out, rows, model=args.model, batch=1)


if __name__ == "__main__":
    main()

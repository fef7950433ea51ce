#!/usr/bin/env python3
"""W8A8 on a real model: perplexity with and without SmoothQuant (and with GPTQ weights), and the CPU
speed of the int8 GEMM against fp32/bf16 matmul at 2048 tokens.

    python eval/w8a8.py --model ~/.cache/llmsqueeze/smollm2-135m \
        --data ../shared/data/wikitext-2/test.txt --calib ../shared/data/wikitext-2/valid.txt --windows 8
    python eval/w8a8.py --gemm --threads 2          # GEMM timings only
    python eval/w8a8.py --prefill --threads 1       # whole-model prefill, eager vs torch.compile(model)

Perplexity follows the protocol of shared/README.md (2048-token windows of WikiText-2 test, float32
on the CPU; calibration 128 x 512 tokens of valid.txt, seed 0). Each configuration starts from a
fresh dense model. Prints markdown tables; writes eval/results/w8a8.json and, for --gemm,
eval/results/w8a8_gemm_cpu.json (the GPU's W8A8 row is in eval/kernel_bench.py and eval/w8a8_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIGS = [
    # label, method, W8A8Scheme kwargs (None: dense)
    ("dense", None, None),
    ("w8a8 dynamic, no smoothing", "rtn", dict(act="dynamic", smooth_alpha=None)),
    ("w8a8 dynamic, SmoothQuant alpha 0.5", "rtn", dict(act="dynamic", smooth_alpha=0.5)),
    ("w8a8 dynamic, SmoothQuant alpha auto", "rtn", dict(act="dynamic", smooth_alpha="auto")),
    ("w8a8 dynamic, SmoothQuant auto + GPTQ", "gptq", dict(act="dynamic", smooth_alpha="auto")),
    ("w8a8 static, no smoothing", "rtn", dict(act="static", smooth_alpha=None)),
    ("w8a8 static, SmoothQuant alpha auto", "rtn", dict(act="static", smooth_alpha="auto")),
    # the static scale as max|x| (static_clip "max"), the default before the clip search
    ("w8a8 static, SmoothQuant alpha auto, scale = max|x|", "rtn", dict(act="static", smooth_alpha="auto", static_clip="max")),
    ("w8a8 static, no smoothing, scale = max|x|", "rtn", dict(act="static", smooth_alpha=None, static_clip="max")),
    # smoothing only the norm -> q/k/v and norm -> gate/up pairs (llm-compressor's SmoothQuant mapping for Llama)
    ("w8a8 static, SmoothQuant alpha auto, norm pairs only", "rtn", dict(act="static", smooth_alpha="auto", smooth_pairs="norm")),
    ("w8a8 dynamic, SmoothQuant alpha auto, norm pairs only", "rtn", dict(act="dynamic", smooth_alpha="auto", smooth_pairs="norm")),
]

# (label, M, K, N): SmolLM2-135M's Linears and a Llama-2-7B layer's, at 2048 tokens of prefill
GEMM_SHAPES = [
    ("smollm2 q/o_proj", 2048, 576, 576),
    ("smollm2 gate/up_proj", 2048, 576, 1536),
    ("smollm2 down_proj", 2048, 1536, 576),
    ("7B q/k/v/o_proj", 2048, 4096, 4096),
    ("7B gate/up_proj", 2048, 4096, 11008),
    ("7B down_proj", 2048, 11008, 4096),
]


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


@torch.no_grad()
def gemm_rows(shapes=GEMM_SHAPES, repeats: int = 3) -> list[dict]:
    """Per shape: fp32 and bf16 x @ W^T, the bare int8 GEMM (torch._int_mm), and the whole W8A8
    Linear (per-token activation quantization + int8 GEMM + rescale), best of `repeats`, in ms: with
    torch's eager passes (`w8a8_linear`) and as Int8Linear runs it on the CPU by default (the
    quantization and rescale compiled into fused loops, nn_int8's "compile" backend)."""
    from llmsqueeze import nn_int8
    from llmsqueeze.nn_int8 import Int8Linear
    from llmsqueeze.quant.int8 import int8_mm, quantize_per_token, w8a8_linear

    def layer_call(layer, x):  # Int8Linear on its CPU default, the fused loops, whatever the environment says
        nn_int8.forget_quantized_input()  # quantize x on every call (the layer caches a repeated input)
        backend, nn_int8.BACKEND = nn_int8.BACKEND, "compile"
        try:
            return layer(x)
        finally:
            nn_int8.BACKEND = backend

    rows = []
    g = torch.Generator().manual_seed(0)
    for label, m, k, n in shapes:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) / k**0.5
        xb, wb = x.bfloat16(), w.bfloat16()
        layer = Int8Linear.from_float(w)
        xq, _ = quantize_per_token(x)
        r = repeats if k * n <= 4096 * 4096 else max(1, repeats - 1)
        row = {
            "shape": label, "M": m, "K": k, "N": n,
            "fp32_ms": _best_ms(lambda: torch.nn.functional.linear(x, w), r),
            "bf16_ms": _best_ms(lambda: torch.nn.functional.linear(xb, wb), r),
            "int8_gemm_ms": _best_ms(lambda: int8_mm(xq, layer.weight), r),
            # w8a8_linear, not layer(x): Int8Linear reuses the quantized input of a repeated call on the
            # same tensor (q/k/v share one), which would drop the activation quantization from the timing
            "w8a8_linear_fp32_ms": _best_ms(lambda: w8a8_linear(x, layer.weight, layer.weight_scale), r),
            "w8a8_linear_bf16_ms": _best_ms(lambda: w8a8_linear(xb, layer.weight, layer.weight_scale), r),
            "int8linear_fused_fp32_ms": _best_ms(lambda: layer_call(layer, x), r),
            "int8linear_fused_bf16_ms": _best_ms(lambda: layer_call(layer, xb), r),
        }
        row["speedup_vs_fp32"] = row["fp32_ms"] / row["w8a8_linear_fp32_ms"]
        row["speedup_vs_bf16"] = row["bf16_ms"] / row["w8a8_linear_bf16_ms"]
        row["fused_speedup_vs_fp32"] = row["fp32_ms"] / row["int8linear_fused_fp32_ms"]
        row["fused_speedup_vs_bf16"] = row["bf16_ms"] / row["int8linear_fused_bf16_ms"]
        rows.append(row)
        print(f"{label:22s} fp32 {row['fp32_ms']:8.1f}  bf16 {row['bf16_ms']:8.1f}  int8 GEMM {row['int8_gemm_ms']:8.1f}  "
              f"W8A8 eager {row['w8a8_linear_fp32_ms']:8.1f} / {row['w8a8_linear_bf16_ms']:8.1f}  "
              f"fused {row['int8linear_fused_fp32_ms']:8.1f} / {row['int8linear_fused_bf16_ms']:8.1f} ms", flush=True)
    return rows


@torch.no_grad()
def prefill_rows(model_dir: str, tokens: int = 2048, repeats: int = 3, dtype=torch.bfloat16) -> list[dict]:
    """One forward over `tokens` tokens (prefill, no cache), dense vs W8A8 dynamic (RTN, no smoothing:
    values do not change speed), each eager and as torch.compile(model, fullgraph=True): best of
    `repeats` after the warm-up call, whose time (compilation included) is kept as first_call_s."""
    import tempfile

    import llmsqueeze
    from llmsqueeze import nn_int8

    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = llmsqueeze.load_dense(model_dir, dtype=torch.float32).eval()
        llmsqueeze.quantize(dense, llmsqueeze.W8A8Scheme(smooth_alpha=None), progress=False)
        llmsqueeze.save_quantized(dense, Path(tmp) / "w8a8")
        del dense
        for kind in ("dense", "w8a8"):
            for compiled in (False, True):
                model = (llmsqueeze.load_dense(model_dir, dtype=dtype) if kind == "dense"
                         else llmsqueeze.from_pretrained(Path(tmp) / "w8a8", dtype=dtype)).eval()
                torch._dynamo.reset()
                fwd = torch.compile(model, fullgraph=True) if compiled else model
                t0 = time.perf_counter()
                fwd(ids)
                first = time.perf_counter() - t0

                def call(fwd=fwd):
                    nn_int8.forget_quantized_input()
                    fwd(ids)

                ms = _best_ms(call, repeats)
                rows.append({"model": kind, "compiled": compiled, "dtype": str(dtype).removeprefix("torch."),
                             "tokens": tokens, "ms": ms, "tok_s": tokens / ms * 1000, "first_call_s": first})
                print(f"{kind:6s} {'torch.compile' if compiled else 'eager':13s} {tokens / ms * 1000:7.1f} tok/s "
                      f"(first call {first:.1f} s)", flush=True)
                del model, fwd
    base = {r["compiled"]: r["tok_s"] for r in rows if r["model"] == "dense"}
    for r in rows:
        r["vs_dense_same_mode"] = r["tok_s"] / base[r["compiled"]]
    return rows


def print_gemm(rows: list[dict]) -> None:
    print("\n| shape (M x K x N) | fp32 | bf16 | int8 GEMM (torch._int_mm) | W8A8 Linear eager, fp32 / bf16 in+out "
          "| Int8Linear fused, fp32 / bf16 in+out | fused vs fp32 | fused vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} ({r['M']}x{r['K']}x{r['N']}) | {r['fp32_ms']:.1f} | {r['bf16_ms']:.1f} | "
              f"{r['int8_gemm_ms']:.1f} | {r['w8a8_linear_fp32_ms']:.1f} / {r['w8a8_linear_bf16_ms']:.1f} | "
              f"{r['int8linear_fused_fp32_ms']:.1f} / {r['int8linear_fused_bf16_ms']:.1f} | "
              f"{r['fused_speedup_vs_fp32']:.2f}x | {r['fused_speedup_vs_bf16']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--data", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="8 = quick protocol; 0 = all windows")
    ap.add_argument("--configs", nargs="*", type=int, help="indices into the configuration list (default: all)")
    ap.add_argument("--search-batches", type=int, default=4, help="calibration batches of the alpha search")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gemm", action="store_true", help="only time the GEMMs")
    ap.add_argument("--prefill", action="store_true",
                    help="only time whole-model prefill (2048 tokens, bf16), eager and torch.compile(model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true",
                    help="add to the rows already in --out (run the configurations one process at a time)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llmsqueeze.evaluate import write_results

    if args.gemm:
        rows = gemm_rows(repeats=args.repeats)
        print_gemm(rows)
        write_results(args.out or "eval/results/w8a8_gemm_cpu.json", rows, tokens=2048)
        return
    if args.prefill:
        rows = prefill_rows(args.model, repeats=args.repeats)
        print("\n| model | forward | tokens/s | vs dense, same forward | first call |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} {r['dtype']} | {'torch.compile(fullgraph)' if r['compiled'] else 'eager'} | "
                  f"{r['tok_s']:.0f} | {r['vs_dense_same_mode']:.2f}x | {r['first_call_s']:.1f} s |")
        write_results(args.out or "eval/results/w8a8_prefill_cpu.json", rows, model=args.model,
                      threads=torch.get_num_threads())
        return

    from transformers import AutoTokenizer

    import llmsqueeze
    from llmsqueeze.data import bos_token_id, calibration_batches
    from llmsqueeze.evaluate import load_eval_text, perplexity, tokenize_text

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tokenize_text(tok, load_eval_text(args.data))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    calib = calibration_batches(tok, args.calib, args.n_samples, args.seq_len, seed=0)
    windows = args.windows or None
    configs = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
    out = args.out or "eval/results/w8a8.json"
    rows = json.loads(Path(out).read_text())["results"] if args.append and Path(out).is_file() else []
    dense = next((r["ppl"] for r in rows if r["scheme"] is None), None)
    for label, method, kw in configs:
        model = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        if kw is not None:
            llmsqueeze.quantize(model, llmsqueeze.W8A8Scheme(**kw), data=calib, method=method, progress=False,
                                search_batches=args.search_batches)
        tq = time.perf_counter() - t0
        res = perplexity(model, ids, windows=windows, progress=False, bos_token_id=bos)
        if kw is None:
            dense = res["ppl"]
        qc = getattr(model.config, "quantization_config", None) or {}
        sq = (qc.get("method_args") or {}).get("smoothquant") or {}
        row = {"config": label, "method": method, "scheme": kw, "ppl": res["ppl"], "windows": res["windows"],
               "vs_dense_pct": None if dense is None else 100 * (res["ppl"] / dense - 1), "quantize_s": tq,
               "alphas": sq.get("alphas")}
        rows = [r for r in rows if r["config"] != label] + [row]
        pct = "" if row["vs_dense_pct"] is None else f" ({row['vs_dense_pct']:+.2f}% vs dense)"
        print(f"{label:42s} ppl {res['ppl']:8.3f}{pct}  quantize {tq:6.1f} s", flush=True)
        del model

    print(f"\n| configuration | perplexity ({rows[-1]['windows']} windows) | vs dense | quantize time | alphas per block |")
    print("|---|---|---|---|---|")
    for r in rows:
        pct = "" if r["vs_dense_pct"] is None else f"{r['vs_dense_pct']:+.2f}%"
        a = "" if not r["alphas"] else f"{min(r['alphas']):.2f}..{max(r['alphas']):.2f} (mean {sum(r['alphas']) / len(r['alphas']):.2f})"
        print(f"| {r['config']} | {r['ppl']:.3f} | {pct} | {r['quantize_s']:.1f} s | {a} |")
    write_results(
        out, rows, model=args.model, threads=torch.get_num_threads(),
        protocol=f"calibration {args.n_samples}x{args.seq_len} tokens (seed 0) of {args.calib}; perplexity on "
                 f"{args.data}, 2048-token windows, first {args.windows or 'all'}, float32 CPU; "
                 f"alpha search on {args.search_batches} calibration batches",
    )


if __name__ == "__main__":
    main()

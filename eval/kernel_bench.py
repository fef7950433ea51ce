#!/usr/bin/env python3
"""W4A16 kernel benchmark: Llama-2-7B layer shapes x batch rows M, our Triton kernels vs fp16 cuBLAS.

    python eval/kernel_bench.py                       # on a CUDA GPU: the full table, JSON + markdown + PNG
    python eval/kernel_bench.py --smoke               # anywhere: tiny shapes under TRITON_INTERPRET=1, checks only

Shapes are K x N (in x out features) of Llama-2-7B: q/k/v/o 4096x4096, gate/up 4096x11008,
down 11008x4096, fused QKV 4096x12288; M in {1, 2, 4, ..., 2048}. Weights are random (speed does
not depend on values): 4-bit, group 128, fp16 scales, asymmetric (true zero points).

Methods, each timed with triton.testing.do_bench (CUDA events, median of the repeats):
  fp16 cuBLAS             F.linear(x, W) with a dense fp16 weight (the baseline of every speed-up)
  llmsqueeze triton       llmsqueeze.nn_kernels.quant_linear: gemv / split-K / gemm picked by M, autotuned
  llmsqueeze deq+mm       our dequantize kernel, then x @ W^T (cuBLAS)
  torch deq+mm            QuantLinear's torch fallback: dequantize in torch, then matmul
  llmsqueeze w8a8         Int8Linear (W8A8, issue 9): per-token int8 quantization kernel + int8 GEMM
                          with the scales fused in its epilogue; its error is int8 activation error,
                          so the W4A16 bound below does not apply (reported as rel_err)
  llmsqueeze fp8          FloatLinear fp8 (FP8 W8A8, issue 24): per-token E4M3 quantization in torch, then
                          torch._scaled_mm with both scales in its epilogue (sm_89+); error reported as rel_err
  torchao int4 / gemlite  peers, when they import on this machine (else listed as unavailable)

Achieved bandwidth counts the bytes a kernel must move at least once: packed weights, scales,
zeros, x and y (dense: the fp16 weight, x and y). `--peak-gbs` overrides the table of peak HBM
bandwidths by device name. Every output is checked against the fp32 product first, with the error
bound of tests/test_kernels.py (exit 1 if one of ours breaks it; peers quantize in their own way).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096), ("qkv fused", 4096, 12288)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
SMOKE_SHAPES = [("smoke", 256, 192), ("smoke odd", 576, 96)]
SMOKE_MS = [1, 3, 16, 33]
PEAK_GBS = {"H100 SXM": 3352, "H100 80GB HBM3": 3352, "H100 PCIe": 2039, "H100 NVL": 3900, "H200": 4800,
            "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE": 1555, "L40S": 864, "RTX 4090": 1008}


def peak_gbs(name: str) -> float | None:
    hits = [v for k, v in PEAK_GBS.items() if k.lower() in name.lower()]
    if not hits and "H100" in name:
        return PEAK_GBS["H100 SXM"]
    return hits[0] if hits else None


def random_layer(k: int, n: int, group: int, device, seed: int = 0):
    """A 4-bit QuantLinear with random packed values and realistic scale magnitudes."""
    import torch

    from llmsqueeze.nn import QuantLinear

    g = torch.Generator(device=device).manual_seed(seed)
    layer = QuantLinear(k, n, 4, group, device=device)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, generator=g, device=device, dtype=torch.int32))
    layer.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, layer.qzeros.shape, generator=g, device=device, dtype=torch.int32))
    layer.scales.copy_(torch.rand(layer.scales.shape, generator=g, device=device) * 2e-3 + 1e-3)
    return layer


def peers(layer, w_dense, group: int) -> dict:
    """name -> (fn(x) or None, note). torchao int4 (tinygemm) and gemlite through torchao's quantize_."""
    import torch
    from torch import nn

    out = {}
    for name, cfg_name, dtype in [("torchao int4", "Int4WeightOnlyConfig", torch.bfloat16),
                                  ("gemlite (torchao)", "GemliteUIntXWeightOnlyConfig", torch.float16)]:
        try:
            import torchao.quantization as tq

            cfg_cls = getattr(tq, cfg_name, None)
            if cfg_cls is None:
                import torchao.prototype.quantization as tpq  # newer torchao moved gemlite here

                cfg_cls = tpq.UIntxWeightOnlyConfig
            lin = nn.Linear(layer.in_features, layer.out_features, bias=False, device=w_dense.device, dtype=dtype)
            lin.weight.data.copy_(w_dense.to(dtype))
            tq.quantize_(lin, cfg_cls(group_size=group))
            out[name] = (lambda x, lin=lin, dtype=dtype: lin(x.to(dtype)), f"torchao {__import__('torchao').__version__}")
        except Exception as e:  # a peer that does not install or run is reported, not fatal
            out[name] = (None, f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    return out


def methods(layer, dtype, with_peers: bool) -> dict:
    """name -> (fn(x) -> y, bytes moved besides x and y, note)."""
    import torch.nn.functional as F

    from llmsqueeze import nn_float, nn_int8, nn_kernels
    from llmsqueeze.kernels import quant_matmul as qm

    w_dense = layer.dequantize_weight(dtype).contiguous()  # [N, K]
    packed = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
    nn_kernels.kernel_weights(layer)
    m = {
        "fp16 cuBLAS": (lambda x: F.linear(x, w_dense), w_dense.numel() * w_dense.element_size(), ""),
        "llmsqueeze triton": (lambda x: nn_kernels.quant_linear(x, layer), packed, ""),
        "llmsqueeze deq+mm": (lambda x: x @ qm.dequantize(layer.qweight, layer.scales, layer.qzeros, None, 4,
                                                          layer.group_size, layer.in_features, x.dtype), packed, ""),
        "torch deq+mm": (lambda x: x @ layer.dequantize_weight_t(x.dtype), packed, ""),
    }
    # W8A8 beside the weight-only kernels: int8 weights (per channel, from the same weight) and int8
    # activations quantized on every call (the layer reuses a repeated input's codes, so drop them)
    w8 = nn_int8.Int8Linear.from_float(w_dense.float())

    def w8a8(x):
        nn_int8.forget_quantized_input()
        return w8(x)

    m["llmsqueeze w8a8"] = (w8a8, w8.weight.numel() + 4 * w8.out_features, "int8 x int8 GEMM, rescale fused")
    # FP8 W8A8 (issue 24): E4M3 weights per channel, activations E4M3 per token, torch._scaled_mm on sm_89+
    f8 = nn_float.FloatLinear.from_float(w_dense.float(), "fp8")
    m["llmsqueeze fp8"] = (f8, f8.weight.numel() + 4 * f8.out_features,
                           "fp8 x fp8 torch._scaled_mm, row/column scales in its epilogue")
    if with_peers:
        for name, (fn, note) in peers(layer, w_dense, layer.group_size).items():
            m[name] = (fn, packed, note)
    return m


def bench(fn, x, smoke: bool, cudagraph: bool = False) -> float:
    """Median µs of fn(x); with `cudagraph`, replayed from a CUDA graph (no host launch overhead: what a
    torch.compile(mode="reduce-overhead") decode step sees)."""
    if smoke:  # the interpreter: one timed run, only to exercise the code
        t0 = time.perf_counter()
        fn(x)
        return (time.perf_counter() - t0) * 1e6
    from triton.testing import do_bench, do_bench_cudagraph

    if cudagraph:
        fn(x)  # autotuning and caches outside the capture
        return do_bench_cudagraph(lambda: fn(x), rep=100, return_mode="median") * 1e3
    return do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median") * 1e3


def run(args) -> list[dict]:
    import torch

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    ms = SMOKE_MS if args.smoke else (args.m or MS)
    peak = args.peak_gbs or (None if args.smoke else peak_gbs(torch.cuda.get_device_name(0)))
    rows = []
    for label, k, n in shapes:
        layer = random_layer(k, n, args.group_size, device)
        w32 = layer.dequantize_weight_t(torch.float32)
        meths = methods(layer, dtype, with_peers=not args.smoke and not args.no_peers)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = x.float() @ w32
            bound = x.float().abs() @ w32.abs()  # tests/test_kernels.py: |y - ref| <= (2u + K 2^-24) |x| @ |W^T|
            limit = 2 * 2.0**-11 + k * 2.0**-24
            base_us = None
            for name, (fn, wbytes, note) in meths.items():
                row = {"shape": label, "K": k, "N": n, "M": m, "method": name, "note": note}
                if fn is None:
                    rows.append({**row, "us": None})
                    continue
                try:
                    y = fn(x)
                    rel = ((y.float() - ref).norm() / ref.norm()).item()
                    row["err_over_bound"] = ((y.float() - ref).abs() / bound.clamp_min(1e-30)).max().item() / limit
                    us = bench(fn, x, args.smoke, args.cudagraph)
                except Exception as e:  # record and go on (a peer that rejects a shape)
                    rows.append({**row, "us": None, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                    continue
                moved = wbytes + 2 * m * (k + n)  # weights + x + y in fp16
                base_us = us if name == "fp16 cuBLAS" else base_us
                row.update(us=us, rel_err=rel, gb_s=moved / us / 1e3, tflops=2 * m * k * n / us / 1e6,
                           speedup_vs_fp16=(base_us / us) if base_us else None,
                           pct_peak_bw=(100 * moved / us / 1e3 / peak) if peak else None)
                rows.append(row)
                print(f"{label:10s} K={k:5d} N={n:5d} M={m:4d} {name:20s} {us:10.1f} us  "
                      f"{row['gb_s']:7.0f} GB/s  x{row['speedup_vs_fp16'] or 0:5.2f}  err {rel:.1e}", flush=True)
        del layer, meths
    return rows


def markdown(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["method"] for r in rows))
    head = "| shape (K x N) | M | " + " | ".join(f"{n} µs (x fp16)" for n in names) + " | triton GB/s (% peak) |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    keys = list(dict.fromkeys((r["shape"], r["K"], r["N"], r["M"]) for r in rows))
    for key in keys:
        cells = []
        tri = None
        for name in names:
            r = next((r for r in rows if (r["shape"], r["K"], r["N"], r["M"]) == key and r["method"] == name), None)
            if r is None or r.get("us") is None:
                cells.append("n/a")
                continue
            sp = r.get("speedup_vs_fp16")
            cells.append(f"{r['us']:.1f} ({sp:.2f}x)" if sp else f"{r['us']:.1f}")
            tri = r if name == "llmsqueeze triton" else tri
        bw = f"{tri['gb_s']:.0f}" + (f" ({tri['pct_peak_bw']:.0f} %)" if tri and tri.get("pct_peak_bw") else "") if tri else ""
        lines.append(f"| {key[0]} {key[1]}x{key[2]} | {key[3]} | " + " | ".join(cells) + f" | {bw} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["shape"], r["K"], r["N"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, (label, k, n) in zip(axes[0], shapes):
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["M"], r["speedup_vs_fp16"]) for r in rows
                   if (r["shape"], r["K"], r["N"]) == (label, k, n) and r["method"] == name and r.get("speedup_vs_fp16")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{label} {k}x{n}")
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("speed-up vs fp16 cuBLAS")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (no timings worth reading)")
    ap.add_argument("--shapes", nargs="*", help=f"subset of {[s[0] for s in SHAPES]}")
    ap.add_argument("--m", type=int, nargs="*", help=f"rows to run (default {MS})")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--cudagraph", action="store_true", help="time graph replays (no host launch overhead; H200 "
                    "eager timings showed a ~40-60 us floor per call on our path)")
    ap.add_argument("--peak-gbs", type=float, help="peak memory bandwidth of this GPU in GB/s")
    ap.add_argument("--out", default="eval/results/kernels.json", help="JSON path; .md and .png beside it")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before llmsqueeze.kernels defines its kernels
        os.environ.setdefault("LLMSQUEEZE_INT8_BACKEND", "triton")  # the W8A8 row on the kernels, not the CPU path
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("eval/kernel_bench.py measures GPU kernels and needs CUDA; run `python eval/kernel_bench.py --smoke` to "
              "exercise it on the CPU under the Triton interpreter", file=sys.stderr)
        return 2
    rows = run(args)
    # peers quantize the dense weight their own way: their error is quantization error, not checked
    ours = ("fp16 cuBLAS", "llmsqueeze triton", "llmsqueeze deq+mm", "torch deq+mm")
    bad = [r for r in rows if r["method"] in ours and r.get("err_over_bound") is not None and r["err_over_bound"] > 1]
    out = Path(args.out)
    import triton

    from llmsqueeze.evaluate import write_results

    write_results(out, rows, smoke=args.smoke, group_size=args.group_size, triton=triton.__version__,
                  peak_gbs=args.peak_gbs or (peak_gbs(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None))
    md = markdown(rows)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    plot(rows, out.with_suffix(".png"))
    if bad:
        print(f"\n{len(bad)} results break the error bound of tests/test_kernels.py: {json.dumps(bad[:3])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

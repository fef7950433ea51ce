#!/usr/bin/env python3
"""W8A8 vs fp16 cuBLAS on a CUDA GPU, Llama-2-7B Linear shapes, prefill rows M (default 512..4096).

    python eval/w8a8_gpu.py --out eval/results/w8a8_gpu.json

Per shape and M, timed with triton.testing.do_bench (CUDA events, median):
  fp16 cuBLAS         F.linear(x, W) with a dense fp16 weight
  int8 GEMM           torch._int_mm(xq, Wq^T) alone (int8 x int8 -> int32, cuBLASLt)
  W8A8 Linear eager   quant.int8.w8a8_linear (what Int8Linear runs) on fp16 input: per-token quantization +
                      int8 GEMM + rescale, with no reuse of a previous call's quantized input
  W8A8 Linear compiled  the same function through torch.compile (quantization and rescale fused by Inductor)
Every W8A8 output is checked against the fp32 product of the dequantized operands first. GPU only:
without CUDA it says so and exits 2.
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="eval/results/w8a8_gpu.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from llmsqueeze.evaluate import write_results
    from llmsqueeze.nn_int8 import Int8Linear
    from llmsqueeze.quant.int8 import int8_mm, quantize_per_token, w8a8_linear

    if not torch.cuda.is_available():
        print("eval/w8a8_gpu.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    fwd = torch.compile(w8a8_linear, dynamic=True) if not args.no_compile else None  # one graph for all shapes
    for label, k, n in SHAPES:
        w = (torch.randn(n, k, device=dev) / k**0.5)
        layer = Int8Linear.from_float(w).to(dev)
        w16 = w.half()
        wq, ws = layer.weight, layer.weight_scale
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = w8a8_linear(x, wq, ws)
            ref = F.linear(x.float(), w)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 0.05:
                print(f"{label} M={m}: W8A8 relative error {err:.3g} is too large", file=sys.stderr)
                return 1
            xq, _ = quantize_per_token(x)
            row = {"shape": label, "M": m, "K": k, "N": n, "rel_err_vs_fp32": err,
                   "fp16_ms": do_bench(lambda: F.linear(x, w16)),
                   "int8_gemm_ms": do_bench(lambda: int8_mm(xq, layer.weight)),
                   "w8a8_eager_ms": do_bench(lambda: w8a8_linear(x, wq, ws))}
            if fwd is not None:
                yc = fwd(x, wq, ws)
                row["compiled_rel_err_vs_eager"] = ((yc.float() - y.float()).norm() / y.float().norm()).item()
                row["w8a8_compiled_ms"] = do_bench(lambda: fwd(x, wq, ws))
            for key in ("int8_gemm_ms", "w8a8_eager_ms", "w8a8_compiled_ms"):
                if key in row:
                    row[key.replace("_ms", "_speedup")] = row["fp16_ms"] / row[key]
            rows.append(row)
            print(f"{label:8s} M={m:5d} fp16 {row['fp16_ms']:.3f} ms  int8 GEMM {row['int8_gemm_ms']:.3f}  "
                  f"W8A8 eager {row['w8a8_eager_ms']:.3f}  compiled {row.get('w8a8_compiled_ms', float('nan')):.3f}",
                  flush=True)
    print("\n| shape (K x N) | M | fp16 cuBLAS | int8 GEMM | W8A8 Linear eager | W8A8 Linear compiled | "
          "speed-up (GEMM / eager / compiled) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        c, cs = r.get("w8a8_compiled_ms"), r.get("w8a8_compiled_speedup")
        print(f"| {r['shape']} ({r['K']}x{r['N']}) | {r['M']} | {r['fp16_ms']:.3f} ms | {r['int8_gemm_ms']:.3f} ms | "
              f"{r['w8a8_eager_ms']:.3f} ms | {'-' if c is None else f'{c:.3f} ms'} | {r['int8_gemm_speedup']:.2f}x / "
              f"{r['w8a8_eager_speedup']:.2f}x / {'-' if cs is None else f'{cs:.2f}x'} |")
    write_results(args.out, rows, gpu=torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())

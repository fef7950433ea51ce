#!/usr/bin/env python3
"""W8A8 vs fp16 cuBLAS on a CUDA GPU, Llama-2-7B Linear shapes, prefill rows M (default 512..4096).

    python eval/w8a8_gpu.py --out eval/results/w8a8_gpu.json

Per shape and M, timed with triton.testing.do_bench (CUDA events, median of many launches):
  fp16 cuBLAS           F.linear(x, W) with a dense fp16 weight
  int8 GEMM             torch._int_mm(xq, Wq^T) alone (int8 x int8 -> int32, cuBLASLt)
  W8A8 torch eager      quant.int8.w8a8_linear (Int8Linear's torch backend) on fp16 input: per-token
                        quantization + int8 GEMM + rescale, with no reuse of a previous call's quantized input
  W8A8 torch compiled   the same function through torch.compile (quantization and rescale fused by Inductor)
  Triton quant          llmsqueeze/kernels/int8_matmul.py per-token quantization kernel alone (one pass per row)
  Triton GEMM           the int8 GEMM with the rescale fused into its epilogue (fp16 out) alone
  Triton W8A8           quant kernel + fused GEMM: the whole W8A8 Linear
  Int8Linear triton     Int8Linear.forward on the Triton backend (the layer's Python around the two kernels)
and, with CUDA graphs (triton.testing.do_bench_cudagraph: launch overhead removed, as in a captured
decoder), fp16 cuBLAS and Triton W8A8 again. Speed-ups are fp16 time / W8A8 time (graph rows: vs the
fp16 graph). The fused GEMM's tile config is picked by timing its candidates on the first call of
each shape (llmsqueeze/kernels/int8_matmul.py: _choose); the pick is recorded per row.

Checks before any timing: every W8A8 output against the fp32 product of the dequantized operands
(relative error < 5%), and the Triton path against the torch path, which the design makes bit-exact
(the quantization kernel's codes and scales, the fused GEMM's output vs int8_mm + rescale). A
mismatch is recorded in the row and makes the script exit 1 after writing the JSON.
GPU only: without CUDA it says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [("q/k/v/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096)]
TIMES = [("fp16_ms", "fp16 cuBLAS"), ("int8_gemm_ms", "int8 GEMM (_int_mm)"), ("w8a8_eager_ms", "W8A8 torch eager"),
         ("w8a8_compiled_ms", "W8A8 torch compiled"), ("triton_quant_ms", "Triton quant"),
         ("triton_gemm_ms", "Triton GEMM (fused)"), ("triton_w8a8_ms", "Triton W8A8"),
         ("int8linear_triton_ms", "Int8Linear triton"), ("fp16_graph_ms", "fp16 graph"),
         ("triton_w8a8_graph_ms", "Triton W8A8 graph")]
SPEEDUPS = [("int8_gemm_ms", "fp16_ms"), ("w8a8_eager_ms", "fp16_ms"), ("w8a8_compiled_ms", "fp16_ms"),
            ("triton_gemm_ms", "fp16_ms"), ("triton_w8a8_ms", "fp16_ms"), ("int8linear_triton_ms", "fp16_ms"),
            ("triton_w8a8_graph_ms", "fp16_graph_ms")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--no-triton", action="store_true", help="skip the Triton rows")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--out", default="eval/results/w8a8_gpu.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("eval/w8a8_gpu.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    import llmsqueeze.nn_int8 as nn_int8
    from llmsqueeze.evaluate import write_results
    from llmsqueeze.nn_int8 import Int8Linear
    from llmsqueeze.quant.int8 import int8_mm, quantize_per_token, rescale, w8a8_linear

    im = None
    if not args.no_triton:
        from llmsqueeze.kernels import int8_matmul as im

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, mismatch = [], False
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
            xq, xs = quantize_per_token(x)
            row = {"shape": label, "M": m, "K": k, "N": n, "rel_err_vs_fp32": err,
                   "fp16_ms": do_bench(lambda: F.linear(x, w16)),
                   "int8_gemm_ms": do_bench(lambda: int8_mm(xq, layer.weight)),
                   "w8a8_eager_ms": do_bench(lambda: w8a8_linear(x, wq, ws))}
            if fwd is not None:
                yc = fwd(x, wq, ws)
                row["compiled_rel_err_vs_eager"] = ((yc.float() - y.float()).norm() / y.float().norm()).item()
                row["w8a8_compiled_ms"] = do_bench(lambda: fwd(x, wq, ws))
            if im is not None:
                # exactness first: same codes and scales, same output as int8_mm + rescale
                tq, ts = im.quantize_per_token(x)
                row["triton_quant_bit_exact"] = bool(torch.equal(tq, xq) and torch.equal(ts, xs))
                yt = im.scaled_mm(xq, wq, xs, ws, None, torch.float16)  # times its tile candidates once
                yr = rescale(int8_mm(xq, wq), xs, ws, None, torch.float16)
                row["triton_gemm_bit_exact"] = bool(torch.equal(yt, yr))
                row["triton_gemm_max_abs_diff"] = (yt.float() - yr.float()).abs().max().item()
                mismatch |= not (row["triton_quant_bit_exact"] and row["triton_gemm_bit_exact"])

                def triton_w8a8():
                    q, s = im.quantize_per_token(x)
                    return im.scaled_mm(q, wq, s, ws, None, torch.float16)

                def int8linear_triton():
                    nn_int8.forget_quantized_input()  # a new activation every call: no reuse of the quantized input
                    return layer(x)

                nn_int8.BACKEND = "triton"
                row["int8linear_triton_bit_exact"] = bool(torch.equal(int8linear_triton(), y))
                mismatch |= not row["int8linear_triton_bit_exact"]
                row["triton_config"] = list(im._best.get((im._bucket(m), n, k, torch.float16, im.tma_ok(xq, wq)), ()))
                row["triton_quant_ms"] = do_bench(lambda: im.quantize_per_token(x))
                row["triton_gemm_ms"] = do_bench(lambda: im.scaled_mm(xq, wq, xs, ws, None, torch.float16))
                row["triton_w8a8_ms"] = do_bench(triton_w8a8)
                row["int8linear_triton_ms"] = do_bench(int8linear_triton)
                nn_int8.BACKEND = "auto"
                if not args.no_graph:
                    row["fp16_graph_ms"] = do_bench_cudagraph(lambda: F.linear(x, w16))
                    row["triton_w8a8_graph_ms"] = do_bench_cudagraph(triton_w8a8)
            for key, base in SPEEDUPS:
                if key in row:
                    row[key.replace("_ms", "_speedup")] = row[base] / row[key]
            rows.append(row)
            print(f"{label:8s} M={m:5d} " + "  ".join(f"{name} {row[key]:.3f}" for key, name in TIMES if key in row)
                  + ("" if im is None else f"  exact quant/gemm/layer {row['triton_quant_bit_exact']}/"
                     f"{row['triton_gemm_bit_exact']}/{row['int8linear_triton_bit_exact']} cfg {row['triton_config']}"),
                  flush=True)
    keys = [(key, name) for key, name in TIMES if any(key in r for r in rows)]
    print("\ntimes (ms)\n| shape (K x N) | M | " + " | ".join(name for _, name in keys) + " |\n|"
          + "---|" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['shape']} ({r['K']}x{r['N']}) | {r['M']} | "
              + " | ".join("-" if key not in r else f"{r[key]:.4f}" for key, _ in keys) + " |")
    ups = [(key, base) for key, base in SPEEDUPS if any(key in r for r in rows)]
    names = dict(TIMES)
    print("\nspeed-up vs fp16 cuBLAS (graph rows: vs the fp16 graph)\n| shape (K x N) | M | "
          + " | ".join(names[key] for key, _ in ups) + " |\n|" + "---|" * (len(ups) + 2))
    for r in rows:
        print(f"| {r['shape']} ({r['K']}x{r['N']}) | {r['M']} | "
              + " | ".join("-" if key not in r else f"{r[key.replace('_ms', '_speedup')]:.2f}x" for key, _ in ups) + " |")
    rejected = [] if im is None else [[str(v) for v in key] + list(cfg) for key, cfg in im.rejected]
    if rejected:
        print(f"tile configs rejected for a wrong output (not used): {rejected}", file=sys.stderr)
    write_results(args.out, rows, gpu=torch.cuda.get_device_name(), triton=triton.__version__,
                  rejected_configs=rejected)
    if mismatch:
        print("the Triton W8A8 path differs from the torch path somewhere (see *_bit_exact above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

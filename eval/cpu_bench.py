#!/usr/bin/env python3
"""One Linear on the CPU: llmsqueeze's float32 kernels vs dense float32 / bfloat16 and torch's int4
kernel, beside the machine's measured memory bandwidth.

    python eval/cpu_bench.py --threads 2                   # this CPU as it is
    python eval/cpu_bench.py --threads 2 --as-avx2         # torch, MKL and llmsqueeze limited to AVX2 + FMA

Shapes: Llama-2-7B's (4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down) and SmolLM2-135M's
(576x576, 1536x576, 576x1536 and the 49152x576 head), N x K, at M = 1, 4, 16 and 128 rows; 4-bit,
group 128, asymmetric, fp16 scales (the README's quickstart scheme).

Rows per shape and M:
  ours q4 (fp32 act)     QuantLinear on the float32 C kernels (GEMV up to 16 rows, dequantize tiles + BLAS above)
  torch int4 (bf16 act)  aten._weight_int4pack_mm_for_cpu, the int4 path before (needs its own packed copy)
  dense fp32 / bf16      F.linear on a dense weight of that dtype
  ours w16 (fp32 act)    the dense bf16 weight as stored, float32 compute (HalfStorageLinear), M <= 16
Each timing cycles over enough copies of the weights that together exceed 4x the last-level cache, so
no call reads its weights from cache (the median of --reps calls after warm-up). Bandwidth: the best
of 5 sums over a 1 GiB float32 tensor with the same threads (read only, what a GEMV does). "bf16 bound"
is the fastest any dense bf16 GEMV could run here: its bytes over that bandwidth (where bf16 is not
native, measured bf16 times are far slower; the bound is what a target compares against honestly).

--as-avx2 re-runs this script with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2 and LLMSQUEEZE_CPU_FLAGS=avx2,fma,f16c: torch's, MKL's and oneDNN's
kernels and llmsqueeze's choices then are those of an AVX2-only CPU. (Memory and cache stay this
machine's. oneDNN's bf16 fallback under that limit is slower than torch's own on a real AVX2 CPU, so the
dense bf16 row is skipped there; the bound above stands in for it.)

Writes eval/results/cpu_linear[_avx2].json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llmsqueeze.kernels.cpu import as_avx2_env

HERE = Path(__file__).resolve().parent
SHAPES = {"7b q/k/v/o": (4096, 4096), "7b gate/up": (11008, 4096), "7b down": (4096, 11008),
          "smollm2 q/o": (576, 576), "smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536),
          "smollm2 head": (49152, 576)}
AVX2_ENV = as_avx2_env()  # the child processes of --as-avx2 (torch, MKL, oneDNN, our kernels, Inductor's cache)


def cpu_flags() -> list[str]:
    want = {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"}
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return sorted(want & set(line.split()))
    return []


def llc_bytes() -> int:
    """The last-level cache of cpu0 (sysfs), or 64 MiB when it cannot be read."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            best = max(best, int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1))
        except (OSError, ValueError):
            pass
    return best or 64 << 20


def timed(fn, calls: int, reps: int) -> float:
    """Median seconds of one call, over `reps` rounds of `calls` calls (each on the next weight copy)."""
    for i in range(min(calls, 4)):
        fn(i)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        ts.append((time.perf_counter() - t0) / calls)
    return statistics.median(ts)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from llmsqueeze.evaluate import read_bandwidth_gbs
    from llmsqueeze.kernels import cpu
    from llmsqueeze.nn import HalfStorageLinear, QuantLinear

    torch.set_num_threads(args.threads)
    info = cpu.cpu()
    bw = read_bandwidth_gbs()
    llc = llc_bytes()
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        if args.shapes and label not in args.shapes:
            continue
        ng = -(-k // 128)
        w = torch.randn(n, k, generator=g) * 0.02
        q = torch.randint(0, 16, (n, k), generator=g)
        s = (torch.rand(n, ng, generator=g) * 0.01 + 1e-3).half()
        z = torch.randint(0, 16, (n, ng), generator=g)
        base = QuantLinear.from_quantized(q, s, z, 4, 128)
        q4_bytes = base.qweight.numel() * 4 + base.scales.numel() * 2 + base.qzeros.numel() * 4
        copies = max(1, min(args.max_copies, -(-4 * llc // q4_bytes)))  # the 4-bit weights, > 4x the cache
        layers = [base] + [QuantLinear.from_quantized(q, s, z, 4, 128) for _ in range(copies - 1)]
        dcopies = max(1, min(args.max_copies, -(-4 * llc // (n * k * 2))))
        w32 = [w.clone() for _ in range(dcopies)]
        w16 = [w.bfloat16() for _ in range(dcopies)]
        half = []
        for t in w16:
            lin = HalfStorageLinear(k, n, bias=False)
            lin.weight = torch.nn.Parameter(t, requires_grad=False)
            half.append(lin)
        del q, z
        for m in args.m:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            r = {"shape": label, "n": n, "k": k, "m": m, "copies": copies}
            with torch.no_grad():
                r["ours_q4_s"] = timed(lambda i: layers[i % copies](x), copies, args.reps)
                r["ours_q4_path"] = base.cpu_path(x)
                r["dense_fp32_s"] = timed(lambda i: F.linear(x, w32[i % dcopies]), dcopies, args.reps)
                if not args.as_avx2_child:
                    r["dense_bf16_s"] = timed(lambda i: F.linear(xb, w16[i % dcopies]), dcopies, args.reps)
                if m <= 16:
                    r["ours_w16_s"] = timed(lambda i: half[i % dcopies](x), dcopies, args.reps)
                if m <= 64 and not args.as_avx2_child:
                    for lay in layers:  # torch's int4 kernel, its own packed copy built first
                        lay._int4_cpu_weights(torch.bfloat16)
                    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

                    kk = layers[0]._int4_cache[4]
                    xk = F.pad(xb, (0, kk - k))  # the kernel's K is a whole number of its groups

                    def int4(i):
                        packed, table, kg, _ = layers[i % copies]._int4_cache[1:]
                        return mm(xk, packed, kg, table)

                    r["torch_int4_s"] = timed(int4, copies, args.reps)
                    for lay in layers:
                        lay._int4_cache = None
            r["q4_gbs"] = q4_bytes / r["ours_q4_s"] / 1e9
            r["q4_bw_share"] = r["q4_gbs"] / bw
            r["bf16_bound_s"] = n * k * 2 / (bw * 1e9)
            dense_best = min(r["dense_fp32_s"], r.get("dense_bf16_s", float("inf")))
            r["vs_faster_dense"] = dense_best / r["ours_q4_s"]
            r["vs_bf16_bound"] = min(dense_best, r["bf16_bound_s"]) / r["ours_q4_s"]
            rows.append(r)
            print(f"{label:16s} M={m:4d}  ours q4 {r['ours_q4_s'] * 1e3:8.3f} ms ({r['q4_gbs']:5.1f} GB/s, "
                  f"{100 * r['q4_bw_share']:3.0f}% of bw)  fp32 {r['dense_fp32_s'] * 1e3:8.3f}  "
                  f"bf16 {r.get('dense_bf16_s', float('nan')) * 1e3:8.3f}  int4 {r.get('torch_int4_s', float('nan')) * 1e3:7.3f}  "
                  f"w16 {r.get('ours_w16_s', float('nan')) * 1e3:7.3f}  x{r['vs_faster_dense']:.2f} dense, "
                  f"x{r['vs_bf16_bound']:.2f} bf16 bound", flush=True)
    return {"rows": rows, "bandwidth_gbs": bw, "llc_bytes": llc, "cpu": info.describe(),
            "torch": torch.__version__, "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 128])
    ap.add_argument("--shapes", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--max-copies", type=int, default=16)
    ap.add_argument("--as-avx2", action="store_true", help="run as an AVX2-only CPU (see the docstring)")
    ap.add_argument("--as-avx2-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.as_avx2:
        cmd = [sys.executable, __file__, "--as-avx2-child", "--threads", str(args.threads), "--reps", str(args.reps),
               "--max-copies", str(args.max_copies), "--m", *map(str, args.m)]
        if args.shapes:
            cmd += ["--shapes", *args.shapes]
        cmd += ["--out", str(args.out or HERE / "results" / "cpu_linear_avx2.json")]
        sys.exit(subprocess.call(cmd, env={**os.environ, **AVX2_ENV}))
    t0 = time.time()
    res = run(args)
    res.update(command="python eval/cpu_bench.py " + " ".join(sys.argv[1:]).replace("--as-avx2-child", "--as-avx2"),
               cpu_flags=cpu_flags(), emulated_avx2=args.as_avx2_child,
               env={k: os.environ[k] for k in AVX2_ENV if k in os.environ}, machine=platform.machine(),
               load_avg=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               seconds=round(time.time() - t0))
    out = args.out or HERE / "results" / ("cpu_linear_avx2.json" if args.as_avx2_child else "cpu_linear.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"bandwidth {res['bandwidth_gbs']:.1f} GB/s; {res['cpu']}; wrote {out}")


if __name__ == "__main__":
    main()

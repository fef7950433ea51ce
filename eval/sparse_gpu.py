#!/usr/bin/env python3
"""2:4 semi-structured sparse vs dense on a CUDA GPU: one 7B-shaped Llama MLP (hidden 4096,
intermediate 11008: gate/up 4096->11008, down 11008->4096) through llmsqueeze.nn.SparseLinear (torch
semi-structured tensors, fp16) and through dense nn.Linear fp16, prefill of --tokens tokens (default
2048): median time of --iters runs after warm-up (CUDA events) and peak memory. GPU only: on a
machine without CUDA it says so and exits 2; no numbers are made up.

    python eval/sparse_gpu.py --tokens 2048 --out eval/results/sparse24_gpu.json
"""
from __future__ import annotations

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--backend", choices=("default", "cutlass", "cusparselt"), default="default",
                    help="torch's semi-structured backend (SparseSemiStructuredTensor._FORCE_CUTLASS); the H200 run "
                         "with torch 2.11's default was 0.30x of dense")
    ap.add_argument("--out", default="eval/results/sparse24_gpu.json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch import nn

    from llmsqueeze.evaluate import write_results
    from llmsqueeze.nn import SparseLinear
    from llmsqueeze.pruning.masks import nm_mask

    if not torch.cuda.is_available():
        print("eval/sparse_gpu.py needs a CUDA GPU; none is visible here", file=sys.stderr)
        return 2
    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    if args.backend != "default":
        from torch.sparse import SparseSemiStructuredTensor

        SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    h, i = args.hidden, args.intermediate
    torch.manual_seed(0)

    def mlp(kind: str):
        layers = {}
        for name, (k, n) in {"gate": (h, i), "up": (h, i), "down": (i, h)}.items():
            w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
            if kind == "dense":
                lin = nn.Linear(k, n, bias=False, device=dev, dtype=dtype)
                lin.weight.data.copy_(w)
            else:
                lin = SparseLinear.from_dense(w * nm_mask(w.abs(), 2, 4), None, (2, 4)).to(dev)
            layers[name] = lin
        return layers

    def forward(layers, x):
        return layers["down"](F.silu(layers["gate"](x)) * layers["up"](x))

    x = torch.randn(args.tokens, h, device=dev, dtype=dtype)
    rows = []
    for kind in ("dense", "2:4 semi-structured"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        layers = mlp("dense" if kind == "dense" else "sparse")
        with torch.no_grad():
            for _ in range(5):
                forward(layers, x)  # SparseLinear builds its semi-structured weight on first use
            sparse_ok = kind == "dense" or type(layers["gate"]._cache[1]).__name__ != "Tensor"
            torch.cuda.synchronize()
            times = []
            for _ in range(args.iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                forward(layers, x)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
        times.sort()
        weights_mib = sum(t.numel() * t.element_size() for lay in layers.values() for t in
                          ([lay.weight] if isinstance(lay, nn.Linear) else [lay.values, lay.indices])) / 2**20
        row = {"kind": kind, "median_ms": times[len(times) // 2], "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
               "stored_weights_mib": weights_mib, "semi_structured_kernel": sparse_ok,
               "sparse_class": None if kind == "dense" else type(layers["gate"]._cache[1]).__name__}
        rows.append(row)
        print(f"{kind:22s} {row['median_ms']:8.3f} ms  peak {row['peak_mib']:8.0f} MiB  kernel used: {sparse_ok}")
        del layers
    print(f"speed-up {rows[0]['median_ms'] / rows[1]['median_ms']:.2f}x")
    write_results(args.out, rows, device=torch.cuda.get_device_name(), shape=f"MLP {h}->{i}->{h}, {args.tokens} tokens, "
                  f"{args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

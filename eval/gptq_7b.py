#!/usr/bin/env python3
"""GPTQ time and memory at 7B scale: a Llama-2-7B-shaped model (random weights from its config;
values do not change the time), quantized block by block by the sequential engine on one GPU.

    python eval/gptq_7b.py --device cuda --out eval/results/gptq_7b_h100.json
    python eval/gptq_7b.py --tiny --device cpu          # anywhere: the same code path on a toy shape

The model is built on the meta device and materialised on the host in fp16 (normal(0, 0.02), seeded),
so host memory holds the 13.5 GB of weights and the GPU only what the engine moves there: one
decoder block, its calibration activations (--offload cpu keeps them on the host between blocks)
and GPTQ's Hessians. Calibration: --n-samples x --seq-len random token ids (seed 0), 128 x 2048 by
default (the GPTQ paper's setting). Reports wall time (build, capture, all blocks), seconds per
block, peak GPU memory (torch.cuda.max_memory_allocated over the whole run) and peak host RSS.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def build_random(cfg_kwargs: dict, layers: int | None, dtype, seed: int, gen_device: str = "cpu"):
    """A LlamaForCausalLM from the config with N(0, 0.02) weights in `dtype` on the host, no init pass
    (the random numbers are drawn on `gen_device`: a GPU draws 6.7 B of them in a blink)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(cfg_kwargs)
    if layers:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw, torch_dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator(device=gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=gen_device, dtype=torch.float32).mul_(0.02).to(dtype))
        model.model.rotary_emb.__init__(config)  # inv_freq buffers were left empty by to_empty
    model.eval()
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--offload", default=None, help="where activations wait between blocks (default: --device)")
    ap.add_argument("--tiny", action="store_true", help="a toy shape (tests the path on any machine)")
    ap.add_argument("--layers", type=int, default=0, help="decoder blocks (0: the config's 32)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--clip-grid", type=int, default=None, help="clip search grid (default: the scheme's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="eval/results/gptq_7b.json")
    args = ap.parse_args()

    import torch
    import transformers

    import llmsqueeze
    from llmsqueeze.evaluate import peak_rss_mib, write_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("eval/gptq_7b.py --device cuda needs a CUDA GPU; none is visible here (try --tiny --device cpu)",
              file=sys.stderr)
        return 2
    cfg = TINY if args.tiny else LLAMA2_7B
    seq_len = min(args.seq_len, cfg["max_position_embeddings"])
    t0 = time.perf_counter()
    model = build_random(cfg, args.layers, torch.float16, args.seed, "cuda" if args.device.startswith("cuda") else "cpu")
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.2f} B parameters in {build_s:.1f} s; peak RSS {peak_rss_mib():.0f} MiB", flush=True)

    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, cfg["vocab_size"], (args.n_samples, seq_len), generator=g)
    scheme_kw = dict(bits=args.bits, group_size=args.group_size, sym=args.sym)
    if args.clip_grid is not None:
        scheme_kw["clip_grid"] = args.clip_grid
    scheme = llmsqueeze.QuantScheme(**scheme_kw)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    llmsqueeze.quantize(model, scheme, data, method="gptq", device=args.device, offload=args.offload,
                        act_order=not args.no_act_order)
    quant_s = time.perf_counter() - t1
    stats = model._llmsqueeze_stats
    peak_dev = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    row = {
        "model": "random Llama-2-7B shape" if not args.tiny else "random tiny Llama",
        "config": {**cfg, **({"num_hidden_layers": args.layers} if args.layers else {})},
        "parameters": n_params,
        "scheme": scheme.to_dict(),
        "act_order": not args.no_act_order,
        "n_samples": args.n_samples, "seq_len": seq_len,
        "device": args.device, "offload": args.offload or args.device,
        "build_s": round(build_s, 1),
        "gptq_wall_s": round(quant_s, 1),
        "engine_s": round(stats.seconds, 1),
        "per_block_s": [round(s, 2) for s in stats.per_block_s],
        "peak_gpu_mib": None if peak_dev is None else round(peak_dev),
        "peak_rss_mib": round(peak_rss_mib()),
    }
    if torch.cuda.is_available():
        row["gpu"] = torch.cuda.get_device_name()
    row["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version()}
    row["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(row, indent=1))
    mean_block = sum(stats.per_block_s) / max(1, len(stats.per_block_s))
    print(f"\n| model | calibration | GPTQ wall | s/block | peak GPU | peak host RSS |\n|---|---|---|---|---|---|\n"
          f"| {row['model']} ({n_params / 1e9:.2f} B) | {args.n_samples}x{seq_len} | {quant_s:.0f} s | {mean_block:.1f} | "
          f"{'-' if peak_dev is None else f'{peak_dev / 1024:.2f} GiB'} | {row['peak_rss_mib'] / 1024:.1f} GiB |")
    write_results(args.out, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())

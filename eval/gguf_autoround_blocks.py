#!/usr/bin/env python3
"""Learned rounding into GGML types on the real model's first decoder blocks: block output error of
RTN (ggml.fit), GPTQ and autoround into the same types, on text never calibrated on.

    python eval/gguf_autoround_blocks.py --mix q4_0 --blocks 2 --iters 50 --threads 1

SmolLM2-135M cut to its first --blocks decoder blocks (the real weights; the head is kept but not
scored), quantized with GGUFScheme(mix=MIX) (each Linear the type llama-quantize gives it in a model of
--blocks layers: for q4_k_m its ffn_down / attn_v bumps follow the cut model's layer count) on the protocol's calibration ids
(128 x 512 tokens of WikiText-2 valid.txt, seed 0). Scored: the relative squared error
||h_q - h||^2 / ||h||^2 of each block's output (hidden_states[i + 1]) against the float model, on the
first 4 x 512 tokens of WikiText-2 test.txt and of the Python reference docs (pydoc_data.topics).
A stand-in for the full-model perplexity when the CPU cannot afford 30 blocks of learned rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    import llmsqueeze
    from llmsqueeze import GGUFScheme
    from llmsqueeze.data import calibration_batches
    from llmsqueeze.evaluate import environment, python_docs_text, tokenize_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()))
    ap.add_argument("--mix", default="q4_0")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--methods", nargs="*", default=["rtn", "gptq", "autoround"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed-scales", action="store_true",
                    help="ablation: autoround learns the rounding offsets V only, the fitted sub-block steps and "
                         "mins held (no multipliers)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.fixed_scales:
        from llmsqueeze.quant import autoround

        autoround._GGMLLayer.trainable = lambda self: [self.v]  # bounds() follows: V's only
    torch.set_num_threads(args.threads)
    shared = HERE.parent.parent / "shared"
    tok = AutoTokenizer.from_pretrained(args.model)
    calib = calibration_batches(tok, str(shared / "data/wikitext-2/valid.txt"), 128, 512, seed=0)
    texts = {"wikitext2": tokenize_text(tok, (shared / "data/wikitext-2/test.txt").read_text())[:2048].view(4, 512),
             "python-docs": tokenize_text(tok, python_docs_text())[:2048].view(4, 512)}

    def cut():
        m = llmsqueeze.load_dense(args.model, dtype=torch.float32).eval()
        n_full = len(m.model.layers)
        m.model.layers = m.model.layers[: args.blocks]
        m.config.num_hidden_layers = args.blocks
        return m, n_full

    ref, _ = cut()
    with torch.no_grad():
        want = {k: ref(x, output_hidden_states=True).hidden_states for k, x in texts.items()}
    scheme = GGUFScheme(mix=args.mix)
    rows = []
    for method in args.methods:
        m, _ = cut()
        kw = {"iters": args.iters} if method == "autoround" else {}
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        llmsqueeze.quantize(m, scheme, data=None if method == "rtn" else calib, method=method, progress=False, **kw)
        got = m.config.quantization_config["scheme"]["layer_types"]
        row = {"method": method, "quantize_s": round(time.perf_counter() - t0, 1), "loadavg_before": load0,
               "loadavg_after": os.getloadavg(), "layer_types": got, "method_args": m.config.quantization_config["method_args"]}
        with torch.no_grad():
            for k, x in texts.items():
                hs = m(x, output_hidden_states=True).hidden_states
                row[k] = [((hs[i] - want[k][i]).square().sum() / want[k][i].square().sum()).item()
                          for i in range(1, args.blocks + 1)]
        if method == "autoround":
            row["block_losses"] = [{q: r[q] for q in ("block", "loss_before", "loss_after", "seconds")}
                                   for r in m._llmsqueeze_report]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("layer_types", "method_args")}), flush=True)
        out = Path(args.out or HERE / "results" / f"gguf_autoround_blocks_{args.mix}{'_fixed_scales' * args.fixed_scales}.json")
        import shlex
        import sys
        out.write_text(json.dumps({"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                                   "model": args.model, "blocks": args.blocks, "mix": args.mix,
                                   "fixed_scales": args.fixed_scales,
                                   "protocol": "calibration 128x512 tokens (seed 0) of WikiText-2 valid.txt; scored on "
                                               "the first 4x512 tokens of WikiText-2 test.txt and of the Python docs: "
                                               "relative squared error of each block's output vs the float model",
                                   "cpu_flags": sorted({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"}
                                                      & set(Path("/proc/cpuinfo").read_text().split())),
                                   "environment": environment(), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Float-format exports on the real model: our checkpoint, exported to compressed-tensors, loaded by
transformers' compressed-tensors integration on the CPU, gives our perplexity.

    python eval/float_export_check.py [--formats fp8 nvfp4-a16 mxfp4 nvfp4] [--windows 8]

(The fp4 rows run in bfloat16, which a CPU without native bf16 (AVX2 only) runs ~35x slower than
float32: there, check fp8 here and leave the fp4 formats to tests/test_float.py's tiny models.)

For each format: quantize SmolLM2-135M (RTN, data-free where the format allows: no smoothing;
nvfp4's activation global scale from 16 x 512 calibration tokens of valid.txt), save our checkpoint,
`llmsqueeze.export(..., "compressed-tensors")`, then perplexity on WikiText-2 test (2048-token
windows, first --windows) of (a) our checkpoint through llmsqueeze.from_pretrained and (b) the export
through AutoModelForCausalLM.from_pretrained. FP8 loads in float32 and must match exactly; the fp4
formats are decompressed by compressed-tensors to bfloat16 weights, so both sides run in bfloat16
there (our FloatLinear dequantizes to the activation dtype). Writes eval/results/float_export_check.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmsqueeze
    from llmsqueeze.data import bos_token_id, calibration_batches
    from llmsqueeze.evaluate import add_protocol_args, load_eval_text, perplexity, tokenize_text, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--formats", nargs="*", default=["fp8", "nvfp4-a16", "mxfp4", "nvfp4"],
                    choices=["fp8", "fp8-weight", "nvfp4-a16", "mxfp4", "nvfp4"])
    ap.add_argument("--out", default="eval/results/float_export_check.json")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    test = tokenize_text(tok, load_eval_text(args.test))
    bos = bos_token_id(tok)  # BOS first in each window where the tokenizer puts it first
    calib = calibration_batches(tok, args.calib, 16, args.seq_len, seed=0)
    rows = []
    for fmt in args.formats:
        t0 = time.perf_counter()
        dtype = torch.float32 if fmt.startswith("fp8") else torch.bfloat16
        with tempfile.TemporaryDirectory() as tmp:
            model = llmsqueeze.load_dense(args.model, dtype=torch.float32)
            scheme = llmsqueeze.FloatScheme(format=fmt, smooth_alpha=None)
            llmsqueeze.quantize(model, scheme, data=calib if scheme.needs_data else None, progress=False)
            src = llmsqueeze.save_quantized(model, f"{tmp}/ours", tokenizer=tok)
            del model
            out = llmsqueeze.export(src, "compressed-tensors", f"{tmp}/ct")
            ours = llmsqueeze.from_pretrained(src, dtype=dtype)
            p_ours = perplexity(ours, test, windows=args.windows, progress=False, bos_token_id=bos)["ppl"]
            del ours
            theirs = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
            p_theirs = perplexity(theirs, test, windows=args.windows, progress=False, bos_token_id=bos)["ppl"]
            del theirs
        row = {"format": fmt, "dtype": str(dtype).removeprefix("torch."), "ppl_llmsqueeze": p_ours,
               "ppl_transformers_compressed_tensors": p_theirs, "rel_diff_pct": 100 * (p_theirs / p_ours - 1),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        write_results(args.out, rows, model=args.model,
                      protocol=f"RTN, no smoothing; perplexity on {args.test}, 2048-token windows, first {args.windows}, CPU")
        print(f"{fmt:10s} {row['dtype']:9s} ours {p_ours:8.4f}  transformers+compressed-tensors {p_theirs:8.4f}  "
              f"({row['rel_diff_pct']:+.3f}%)", flush=True)
    print("\n| format | dtype | llmsqueeze | transformers (compressed-tensors) | difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['dtype']} | {r['ppl_llmsqueeze']:.4f} | {r['ppl_transformers_compressed_tensors']:.4f} "
              f"| {r['rel_diff_pct']:+.3f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

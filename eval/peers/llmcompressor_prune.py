#!/usr/bin/env python3
"""Run llm-compressor's SparseGPTModifier or WandaPruningModifier in its own virtualenv on given
calibration token ids, then measure perplexity on given test token ids with the project's protocol.
Called by eval/compare_pruning.py; prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_prune.py MODEL CALIB.pt TEST.pt --method sparsegpt --sparsity 0.5
    VENV/bin/python eval/peers/llmcompressor_prune.py MODEL CALIB.pt TEST.pt --method wanda --pattern 2:4
"""
import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmcompressor_gptq import perplexity  # noqa: E402  (same protocol code as the GPTQ comparison)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("test")
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (llm-compressor's mask_structure)")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM

    calib = torch.load(args.calib)
    test = torch.load(args.test)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    structure = args.pattern or "0:0"
    sparsity = 1 - int(structure.split(":")[0]) / int(structure.split(":")[1]) if args.pattern else args.sparsity
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"],
                                   dampening_frac=0.01, block_size=128)
    else:
        recipe = WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "method": args.method, "sparsity": sparsity,
              "mask_structure": structure}
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0])
    except Exception as e:
        result.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                      traceback=traceback.format_exc()[-2000:])
        print(json.dumps(result))
        return
    result["prune_s"] = time.perf_counter() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    result["measured_sparsity"] = zeros / sum(m.weight.numel() for m in linears)
    result["ppl"] = perplexity(model, test, windows=args.windows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

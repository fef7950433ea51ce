#!/usr/bin/env python3
"""Run llm-compressor's GPTQ in its own virtualenv (it pins its own transformers) on given
calibration token ids, then measure perplexity on given test token ids with the project's protocol.
Called by eval/compare_llmcompressor.py; prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_gptq.py MODEL CALIB.pt TEST.pt --bits 4 --group-size 64 [--sym]
"""
import json

import torch

from common import load_inputs, oneshot_timed, peer_parser, perplexity  # eval/peers/common.py, beside this script


def main():
    ap = peer_parser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--bypass-divisibility", action="store_true",
                    help="bypass_divisibility_checks=True: quantize widths the group size does not divide")
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor.modifiers.gptq import GPTQModifier

    model, calib, test = load_inputs(args)
    weights = {"num_bits": args.bits, "type": "int", "symmetric": args.sym, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], dampening_frac=0.01,
                          bypass_divisibility_checks=args.bypass_divisibility)
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "bits": args.bits,
              "group_size": args.group_size, "sym": args.sym, "weights": weights,
              "bypass_divisibility_checks": args.bypass_divisibility}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}  # a MoE's
    if not oneshot_timed(result, model, calib, recipe):
        return
    result["quantized_modules"] = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
    if experts:  # did its GPTQ reach the experts? (their weights then hold quantize-dequantized values)
        after = dict(model.named_parameters())
        same = [n for n, p in experts.items() if n in after and torch.equal(after[n].detach(), p)]
        result["expert_tensors"] = len(experts)
        result["expert_tensors_unchanged"] = len(same)
        result["expert_tensors_renamed_or_replaced"] = sum(1 for n in experts if n not in after)
    result["ppl"] = perplexity(model, test, windows=args.windows, bos=args.bos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run llm-compressor's GPTQ in its own virtualenv (it pins its own transformers) on given
calibration token ids, then measure perplexity on given test token ids with the project's protocol.
Called by eval/compare_llmcompressor.py; prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_gptq.py MODEL CALIB.pt TEST.pt --bits 4 --group-size 64 [--sym]
"""
import json

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
    if not oneshot_timed(result, model, calib, recipe):
        return
    result["ppl"] = perplexity(model, test, windows=args.windows, bos=args.bos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

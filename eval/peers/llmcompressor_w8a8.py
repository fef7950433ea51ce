#!/usr/bin/env python3
"""Run llm-compressor's W8A8 (int8 per-channel weights, int8 activations) in its own virtualenv on
given calibration token ids, then measure perplexity on given test token ids with the project's
protocol. Its documented recipe is SmoothQuantModifier(smoothing_strength=0.8) followed by
GPTQModifier(scheme="W8A8") (weights by GPTQ) or QuantizationModifier (round-to-nearest). After
oneshot the model runs with its weights quantized and its Linear inputs fake-quantized on every
forward (compressed-tensors' frozen state), which is what the perplexity measures. Called by
eval/compare_w8a8.py; prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_w8a8.py MODEL CALIB.pt TEST.pt --act dynamic --method gptq
"""
import json

import torch
from common import (  # eval/peers/common.py, beside this script
    load_inputs,
    oneshot_timed,
    peer_parser,
    perplexity,
    print_error,
)


def main():
    ap = peer_parser()
    ap.add_argument("--act", choices=["dynamic", "static"], default="dynamic",
                    help="dynamic: the W8A8 preset (per-token scales at run time); static: one calibrated scale per layer")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    ap.add_argument("--smoothing-strength", type=float, default=0.8, help="SmoothQuant alpha; negative: no smoothing")
    ap.add_argument("--act-observer", help="static: the input observer (llm-compressor's default is 'minmax', a moving "
                                           "average of each batch's range; 'static_minmax' keeps the running max, 'mse')")
    args = ap.parse_args()

    import llmcompressor
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    model, calib, test = load_inputs(args)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    if args.act == "static":
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
        if args.act_observer:
            acts["observer"] = args.act_observer
    groups = {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}
    quant = (GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01) if args.method == "gptq"
             else QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    recipe = [quant]
    if args.smoothing_strength >= 0:
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=args.smoothing_strength))
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "act": args.act, "method": args.method,
              "smoothing_strength": args.smoothing_strength if args.smoothing_strength >= 0 else None,
              "weights": weights, "input_activations": acts}
    if not oneshot_timed(result, model, calib, recipe):
        return
    # what the perplexity runs: every Linear but the head with its activations quantized on each forward
    quantized = [m for n, m in model.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None and n != "lm_head"]
    result["quantized_linears"] = len(quantized)
    result["status"] = sorted({str(getattr(m, "quantization_status", None)) for m in quantized})
    if not quantized or any(getattr(m, "quantization_status", None) != QuantizationStatus.FROZEN for m in quantized):
        print_error(result, RuntimeError(f"expected frozen quantized Linears, got {result['status']}"))
        return
    # and one forward does quantize every one of their inputs (compressed-tensors' forward_quantize)
    import compressed_tensors.quantization.lifecycle.forward as ct_forward

    calls, real = [], ct_forward.forward_quantize
    ct_forward.forward_quantize = lambda module, value, base, qargs: (calls.append(base), real(module, value, base, qargs))[1]
    with torch.no_grad():
        model(test[:16].view(1, -1))
    ct_forward.forward_quantize = real
    result["inputs_quantized_per_forward"] = calls.count("input")
    if calls.count("input") != len(quantized):
        print_error(result, RuntimeError(f"{calls.count('input')} inputs quantized in a forward, {len(quantized)} Linears"))
        return
    result["ppl"] = perplexity(model, test, windows=args.windows, bos=args.bos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run one of llm-compressor's floating-point preset schemes (FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, NVFP4)
in its own virtualenv on given calibration token ids, then measure perplexity on given test token ids
with the project's protocol. Its documented recipe for these presets is
QuantizationModifier(targets="Linear", scheme=PRESET, ignore=["lm_head"]) (round-to-nearest);
--method gptq swaps in GPTQModifier with the same scheme (dampening_frac=0.01). After oneshot the
model runs with its weights fake-quantized and, where the preset quantizes activations, its Linear
inputs quantized on every forward (compressed-tensors' frozen state), which is what the perplexity
measures. Prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_float.py MODEL CALIB.pt TEST.pt --preset NVFP4 --method rtn
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

PRESETS = ["FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "NVFP4"]


def _args_dict(qargs):
    """A QuantizationArgs as a JSON-able dict (dtypes as their names), or None."""
    if qargs is None:
        return None
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in qargs.model_dump(mode="json").items()}


def main():
    ap = peer_parser()
    ap.add_argument("--preset", choices=PRESETS, required=True, help="llm-compressor's preset scheme name")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                    help="rtn: QuantizationModifier (the documented recipe); gptq: GPTQModifier, same scheme")
    ap.add_argument("--test2", help="a second test file (torch-saved 1-D ids): its perplexity as ppl_test2")
    args = ap.parse_args()

    import llmcompressor
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    model, calib, test = load_inputs(args)
    test2 = torch.load(args.test2) if args.test2 else None
    try:
        import compressed_tensors
        ct_version = compressed_tensors.__version__
    except Exception:  # no version attribute
        ct_version = None
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "compressed_tensors": ct_version,
              "preset": args.preset, "method": args.method}
    try:
        quant = (GPTQModifier(targets="Linear", scheme=args.preset, ignore=["lm_head"], dampening_frac=0.01)
                 if args.method == "gptq"
                 else QuantizationModifier(targets="Linear", scheme=args.preset, ignore=["lm_head"]))
    except Exception as e:  # the modifier refuses the preset
        print_error(result, e)
        return
    if not oneshot_timed(result, model, calib, [quant]):
        return
    # what the perplexity runs: every Linear but the head with the preset's scheme, frozen
    quantized = [(n, m) for n, m in model.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None and n != "lm_head"]
    result["quantized_linears"] = len(quantized)
    result["status"] = sorted({str(getattr(m, "quantization_status", None)) for _, m in quantized})
    if quantized:
        scheme = quantized[0][1].quantization_scheme  # the preset as it expanded (every module has the same)
        result["weights"] = _args_dict(scheme.weights)
        result["input_activations"] = _args_dict(scheme.input_activations)
        result["qparams"] = sorted(n for n, _ in quantized[0][1].named_parameters() if n != "weight" and n != "bias")
    if not quantized or any(getattr(m, "quantization_status", None) != QuantizationStatus.FROZEN for _, m in quantized):
        print_error(result, RuntimeError(f"expected frozen quantized Linears, got {result['status']}"))
        return
    # and one forward does quantize every one of their inputs where the preset quantizes activations
    import compressed_tensors.quantization.lifecycle.forward as ct_forward

    calls, real = [], ct_forward.forward_quantize
    ct_forward.forward_quantize = lambda module, value, base, qargs: (calls.append(base), real(module, value, base, qargs))[1]
    try:
        with torch.no_grad():
            model(test[:16].view(1, -1))
    except Exception as e:  # e.g. an activation width its group size does not divide
        print_error(result, e)
        return
    finally:
        ct_forward.forward_quantize = real
    result["inputs_quantized_per_forward"] = calls.count("input")
    result["weights_quantized_per_forward"] = calls.count("weight")
    expected_inputs = len(quantized) if result["input_activations"] is not None else 0
    if calls.count("input") != expected_inputs or calls.count("weight") != len(quantized):
        print_error(result, RuntimeError(f"{calls.count('input')} inputs and {calls.count('weight')} weights "
                                         f"quantized in a forward, {len(quantized)} Linears"))
        return
    try:
        result["ppl"] = perplexity(model, test, windows=args.windows, bos=args.bos)
        if test2 is not None:
            result["ppl_test2"] = perplexity(model, test2, windows=args.windows, bos=args.bos)
    except Exception as e:
        print_error(result, e)
        return
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run Intel's AutoRound in its own virtualenv on given calibration token ids, then measure perplexity
on given test token ids with the project's protocol (the same windows as llmsqueeze.evaluate).
Called by eval/beyond_gptq.py (--autoround-python); prints one JSON line.

    python -m venv /work/venvs/arpeer && /work/venvs/arpeer/bin/pip install torch==2.13.0 auto-round==0.16.1
    /work/venvs/arpeer/bin/python eval/peers/autoround_peer.py MODEL CALIB.pt TEST.pt --bits 3 --group-size 64

The calibration samples go in as a DataLoader of the same [128, 512] token ids every other run uses
(batch 8, AutoRound's default). AutoRound leaves each tuned Linear's weight fake-quantized (its
unwrapper copies the quantize-dequantized weight back), so the model is evaluated as it comes out,
in float32.
"""
import json

import torch
from common import load_inputs, peer_parser, perplexity, timed  # eval/peers/common.py, beside this script


def main():
    ap = peer_parser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    import auto_round
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    model, calib, test = load_inputs(args)
    tok = AutoTokenizer.from_pretrained(args.model)
    loader = torch.utils.data.DataLoader(calib, batch_size=args.batch_size, shuffle=False)
    result = {"tool": f"auto-round {auto_round.__version__}", "bits": args.bits, "group_size": args.group_size,
              "sym": args.sym, "iters": args.iters, "batch_size": args.batch_size, "seed": args.seed}
    ar = None

    def run():
        nonlocal ar
        ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=args.sym, dataset=loader,
                       iters=args.iters, nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=args.batch_size,
                       seed=args.seed)
        ar.quantize()

    if not timed(result, run):
        return
    model = ar.model if getattr(ar, "model", None) is not None else model
    result["ppl"] = perplexity(model.float().eval(), test, windows=args.windows, bos=args.bos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

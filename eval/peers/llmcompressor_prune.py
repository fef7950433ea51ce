#!/usr/bin/env python3
"""Run llm-compressor's SparseGPTModifier or WandaPruningModifier in its own virtualenv on given
calibration token ids, then measure perplexity on given test token ids with the project's protocol.
Called by eval/compare_pruning.py; prints one JSON line.

    VENV/bin/python eval/peers/llmcompressor_prune.py MODEL CALIB.pt TEST.pt --method sparsegpt --sparsity 0.5
    VENV/bin/python eval/peers/llmcompressor_prune.py MODEL CALIB.pt TEST.pt --method wanda --pattern 2:4
    ... --windows 0 --save peer.pt   # no perplexity; save what it saw and did (eval/wanda_masks.py reads it)

--save writes {"ids": the token ids the embedding saw, in llm-compressor's order, "masks": {name: weight == 0},
"row_scalars": {name: Wanda's per-input-channel statistic, as sparsify_weight receives it}}.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_inputs, oneshot_timed, peer_parser, perplexity  # noqa: E402  (the protocol code every peer script shares)


def main():
    ap = peer_parser()
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4 (llm-compressor's mask_structure)")
    ap.add_argument("--save", default=None, help="file for the ids seen, the masks and Wanda's statistics")
    ap.add_argument("--prune-lm-head", action="store_true",
                    help='ignore=["lm_head"] as before 2026-11-26: the head (and the tied embedding) pruned too')
    args = ap.parse_args()

    import llmcompressor
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    model, calib, test = load_inputs(args)
    structure = args.pattern or "0:0"
    sparsity = 1 - int(structure.split(":")[0]) / int(structure.split(":")[1]) if args.pattern else args.sparsity
    # With targets=["Linear"] every Linear is its own target layer and the modifiers match its name as
    # "lm_head." (layer name + "." + ""), which the plain name "lm_head" misses: the head, and with tied
    # embeddings the embedding too, were pruned. The pattern (llm-compressor's own advice) leaves both dense.
    ignore = ["lm_head"] if args.prune_lm_head else ["re:.*lm_head"]
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=ignore,
                                   dampening_frac=0.01, block_size=128)
    else:
        recipe = WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=ignore)
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "method": args.method, "sparsity": sparsity,
              "mask_structure": structure, "ignore": ignore}
    seen, row_scalars = [], {}
    if args.save:
        import llmcompressor.modifiers.pruning.wanda.base as wanda_base

        names = {m: n for n, m in model.named_modules()}
        # (tracing calls it with proxies and meta tensors: only real ones are kept; the propagation
        # pass repeats the ids)
        model.get_input_embeddings().register_forward_pre_hook(
            lambda m, a: seen.append(a[0].detach().clone()) if type(a[0]) is torch.Tensor and not a[0].is_meta else None)
        sparsify = wanda_base.sparsify_weight

        def recording(module, row_scalars_dict, **kw):
            row_scalars[names[module]] = row_scalars_dict[module].detach().clone()
            return sparsify(module=module, row_scalars_dict=row_scalars_dict, **kw)

        wanda_base.sparsify_weight = recording
    if not oneshot_timed(result, model, calib, recipe, key="prune"):
        return
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    result["measured_sparsity"] = zeros / sum(m.weight.numel() for m in linears)
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    result["lm_head_sparsity"] = float((head == 0).float().mean())
    result["embedding_sparsity"] = float((emb == 0).float().mean())
    if args.save:
        masks = {n: (m.weight == 0).cpu() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
        torch.save({"ids": torch.cat(seen) if seen else None, "masks": masks, "row_scalars": row_scalars}, args.save)
    if args.windows:
        result["ppl"] = perplexity(model, test, windows=args.windows, bos=args.bos)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Iterative magnitude pruning and lottery-ticket rewinding on a small LM trained from scratch on
WikiText-2 text, on the CPU in a few minutes.

A character-level Llama (2 layers, hidden 128) is trained on valid.txt, then pruned to --sparsity of
its Linear weights four ways, each given the same number of recovery steps:
  one-shot        magnitude to the final sparsity at once, then fine-tune
  iterative       --rounds rounds of prune + fine-tune (masks fixed while training)
  lottery ticket  iterative, but the kept weights rewound to their values at --rewind-step each round
  snip            one-shot SNIP saliency (|w * dL/dw| on a few batches), then fine-tune
Loss is measured on test.txt (nats per character).

    python examples/iterative_pruning_tiny_lm.py --sparsity 0.8 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from tiny_char_lm import DATA, char_data, make_train_step, tiny_llama

from llmsqueeze.pruning.iterative import MaskGuard, iterative_prune, magnitude_masks, prunable_params
from llmsqueeze.pruning.masks import global_masks
from llmsqueeze.pruning.saliency import gradient_saliency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50, help="recovery steps per round (one-shot gets rounds x steps)")
    ap.add_argument("--rewind-step", type=int, default=50, help="lottery ticket: rewind to the weights at this step")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train, test, vocab = char_data(args.data)
    model = tiny_llama(vocab, args.seq_len)
    g = torch.Generator().manual_seed(0)

    train_step = make_train_step(train, args.seq_len, args.batch, g)

    def make_opt(params):
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)

    @torch.no_grad()
    def test_loss(model):
        model.eval()
        n = test.numel() // args.seq_len
        ids = test[: n * args.seq_len].view(n, args.seq_len)[:256]
        out = sum(model(input_ids=b, labels=b).loss.item() for b in ids.split(64)) / len(ids.split(64))
        model.train()
        return out

    t0 = time.time()
    # dense pretraining, keeping the weights at init and at --rewind-step for the lottery ticket
    init = copy.deepcopy(model.state_dict())
    opt = make_opt(model.parameters())
    early = None
    for step in range(args.pretrain_steps):
        train_step(model, opt, step)
        if step + 1 == args.rewind_step:
            early = copy.deepcopy(model.state_dict())
    dense = copy.deepcopy(model.state_dict())
    rows = [("dense", 0.0, test_loss(model))]
    print(f"dense: test loss {rows[0][2]:.3f} nats/char after {args.pretrain_steps} steps ({time.time() - t0:.0f} s)")
    total = args.rounds * args.steps

    def finetune_with(masks, label):
        params = prunable_params(model)
        opt = make_opt(model.parameters())
        guard = MaskGuard(params)
        guard.set_masks(masks, opt)
        before = test_loss(model)
        for step in range(total):
            train_step(model, opt, step)
        guard.remove()
        rows.append((f"{label}, no fine-tuning", args.sparsity, before))
        rows.append((f"{label} + {total} steps", args.sparsity, test_loss(model)))

    # the dense model given the same extra steps: the reference the pruned models are held to
    model.load_state_dict(dense)
    opt = make_opt(model.parameters())
    for step in range(total):
        train_step(model, opt, step)
    rows.append((f"dense + {total} steps", 0.0, test_loss(model)))

    # one-shot magnitude
    model.load_state_dict(dense)
    finetune_with(magnitude_masks(prunable_params(model), args.sparsity, "global"), "one-shot magnitude")

    # one-shot SNIP
    model.load_state_dict(dense)
    params = prunable_params(model)
    batches = [torch.stack([train[s : s + args.seq_len] for s in torch.randint(0, train.numel() - args.seq_len, (8,),
                                                                             generator=g).tolist()]) for _ in range(4)]
    scores = gradient_saliency(model, batches, params, "snip", lambda m, b: m(input_ids=b, labels=b).loss)
    finetune_with(global_masks(scores, args.sparsity), "one-shot SNIP")

    # iterative magnitude pruning, and with lottery-ticket rewinding (to init, and to an early step)
    for label, rewind_to in (("iterative magnitude", None), ("lottery ticket, rewind to init", init),
                             (f"lottery ticket, rewind to step {args.rewind_step}", early)):
        model.load_state_dict(dense)
        res = iterative_prune(model, train_step, make_opt, args.sparsity, args.rounds, args.steps, rewind=rewind_to)
        rows.append((f"{label} ({args.rounds} rounds x {args.steps} steps)", args.sparsity, test_loss(model)))
        assert all((p[~res.masks[n]] == 0).all() for n, p in prunable_params(model).items())

    print("\n| model | sparsity of Linear weights | test loss (nats/char) |\n|---|---|---|")
    for label, s, loss in rows:
        print(f"| {label} | {s:.0%} | {loss:.3f} |")
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()

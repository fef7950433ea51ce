#!/usr/bin/env python3
"""Post-training quantization vs quantization-aware training on a small LM trained from scratch on
WikiText-2 text, on the CPU in a few minutes.

A character-level Llama (2 layers, hidden 128) is trained on valid.txt, then each of its decoder
Linears is quantized to --bits (group --group-size, asymmetric) two ways, given the same extra steps:
  PTQ  the dense model fine-tuned --qat-steps more steps, then round-to-nearest
  QAT  prepare_qat (fake-quantized weights, straight-through gradients), --qat-steps steps, convert()
Both end as packed QuantLinear models (the QAT one is saved and reloaded with from_pretrained to show
it is a standard checkpoint). Loss is measured on test.txt; perplexity is per character.

    python examples/qat_tiny_lm.py --bits 4 2 --qat-steps 200
    python examples/qat_tiny_lm.py --bits 2 --learn-scale       # LSQ: the group scales are trained too
"""
from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
from tiny_char_lm import DATA, char_data, tiny_llama

import llmsqueeze
from llmsqueeze.quant.qat import convert, prepare_qat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--learn-scale", action="store_true", help="LSQ: train the group scales as well")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the extra steps (pretraining: 3e-3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train, test, vocab = char_data(args.data)
    model = tiny_llama(vocab, args.seq_len)

    def train_steps(model, steps, lr, seed):
        g = torch.Generator().manual_seed(seed)  # the same batches for PTQ's and QAT's extra steps
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, train.numel() - args.seq_len, (args.batch,), generator=g)
            ids = torch.stack([train[s : s + args.seq_len] for s in starts.tolist()])
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()

    @torch.no_grad()
    def test_loss(model):
        model.eval()
        n = test.numel() // args.seq_len
        ids = test[: n * args.seq_len].view(n, args.seq_len)[:256]
        return sum(model(input_ids=b, labels=b).loss.item() for b in ids.split(64)) / len(ids.split(64))

    t0 = time.time()
    train_steps(model, args.pretrain_steps, 3e-3, seed=0)
    dense = copy.deepcopy(model.state_dict())
    rows = [("dense", "-", test_loss(model))]
    print(f"dense: test loss {rows[0][2]:.3f} nats/char after {args.pretrain_steps} steps ({time.time() - t0:.0f} s)",
          flush=True)
    tuned = copy.deepcopy(model)
    train_steps(tuned, args.qat_steps, args.lr, seed=1)
    rows.append((f"dense + {args.qat_steps} steps", "-", test_loss(tuned)))

    for bits in args.bits:
        scheme = llmsqueeze.QuantScheme(bits=bits, group_size=args.group_size)
        for label, start in (("PTQ (RTN) of dense", model), (f"PTQ (RTN) of dense + {args.qat_steps} steps", tuned)):
            q = llmsqueeze.quantize(copy.deepcopy(start), scheme, progress=False)
            rows.append((label, bits, test_loss(q)))
        qat = type(model)(copy.deepcopy(model.config))  # its own config: convert() writes quantization_config
        qat.load_state_dict(dense)
        prepare_qat(qat, scheme, learn_scale=args.learn_scale)
        rows.append(("fake-quant before training (= PTQ of dense)", bits, test_loss(qat)))
        train_steps(qat, args.qat_steps, args.lr, seed=1)
        fake = test_loss(qat)
        convert(qat)
        with tempfile.TemporaryDirectory() as tmp:  # a standard checkpoint: save, reload, measure that
            llmsqueeze.save_quantized(qat, Path(tmp) / "q")
            loaded = llmsqueeze.from_pretrained(Path(tmp) / "q", dtype=torch.float32)
            converted = test_loss(loaded)
        assert abs(converted - fake) < 1e-3, (converted, fake)  # convert keeps the trained fake-quant weights
        lsq = ", learned scales" if args.learn_scale else ""
        rows.append((f"QAT {args.qat_steps} steps{lsq}, converted + reloaded", bits, converted))
        for label, b, loss in rows[-4:]:
            print(f"  {b}-bit  {label:55s} test loss {loss:.3f} nats/char  ({time.time() - t0:.0f} s)", flush=True)

    print(f"\n| model | bits (group {args.group_size}, asym) | test loss (nats/char) | perplexity (per char) |")
    print("|---|---|---|---|")
    for label, bits, loss in rows:
        print(f"| {label} | {bits} | {loss:.3f} | {math.exp(loss):.3f} |")
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Pruning during and after training, measured.

--part llm   the real model (SmolLM2-135M): SparseGPT 2:4 and 50 %, then recovery fine-tuning on
             WikiText-2 valid.txt with the mask held (with and without distilling the dense model's
             logits); gradual pruning to 50 % during the same number of fine-tuning steps; the dense model
             fine-tuned the same way as the control. Perplexity (shared/README.md protocol, 8 windows of
             2048) on WikiText-2 test.txt and on the Python reference docs (another domain, never trained
             on). Rows run one at a time (--rows) and merge into the JSON, so a long run can be resumed.
--part char  the character-level Llama of examples/ (tiny_char_lm.py): uniform vs global vs learned
             per-layer sparsity at 50/70/90 % (gradual, same steps), and random vs SNIP vs gradual vs IMP
             vs lottery ticket vs early bird at --sparsity, test loss and training steps per row.

    python eval/prune_train.py --part llm --rows all
    python eval/prune_train.py --part char
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from llmsqueeze.data import bos_token_id  # noqa: E402
from llmsqueeze.evaluate import environment, load_eval_text, perplexity, tokenize_text  # noqa: E402

MODEL = Path("~/.cache/llmsqueeze/smollm2-135m").expanduser()
DATA = ROOT / ".." / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "eval" / "results"

# row -> (start from, how, pattern/sparsity, steps key, distill)
LLM_ROWS = {
    "dense": ("dense", None, None, None, False),
    "dense + ft": ("dense", "ft", None, "steps50", False),
    "sparsegpt 2:4": ("sparsegpt", None, "2:4", None, False),
    "sparsegpt 2:4 + ft": ("sparsegpt", "ft", "2:4", "steps24", False),
    "sparsegpt 2:4 + ft + distill": ("sparsegpt", "ft", "2:4", "steps24", True),
    "sparsegpt 50%": ("sparsegpt", None, 0.5, None, False),
    "sparsegpt 50% + ft": ("sparsegpt", "ft", 0.5, "steps50", False),
    "sparsegpt 50% + ft + distill": ("sparsegpt", "ft", 0.5, "steps50", True),
    "gradual wanda 50% (during ft)": ("dense", "gradual-wanda", 0.5, "steps50", False),
    "gradual magnitude 50% (during ft)": ("dense", "gradual-magnitude", 0.5, "steps50", False),
    "wanda 50% + ft": ("wanda", "ft", 0.5, "steps50", False),
    "random 50%": ("random", None, 0.5, None, False),
    "random 50% + ft": ("random", "ft", 0.5, "steps50", False),
}


def cpu_flags() -> list[str]:
    flags = set(open("/proc/cpuinfo").read().split())
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile"})


# ----------------------------------------------------------------------------------------- llm
def pruned_dir(work: Path, method: str, target, tok) -> Path:
    """The one-shot checkpoint (pruned once, reused): SparseGPT or Wanda on the protocol's calibration."""
    from llmsqueeze import prune, save_quantized
    from llmsqueeze.api import load_dense
    from llmsqueeze.data import calibration_batches

    name = f"{method}-{str(target).replace(':', 'of')}"
    out = work / name
    if (out / "config.json").exists():
        return out
    model = load_dense(str(MODEL), torch.float32)
    calib = calibration_batches(tok, str(DATA / "valid.txt"), 128, 512, seed=0)
    kw = {"pattern": target} if isinstance(target, str) else {"sparsity": target}
    t0 = time.time()
    torch.manual_seed(0)  # random pruning draws from torch's generator
    prune(model, method, data=calib, progress=False, **kw)
    print(f"{name}: pruned in {time.time() - t0:.0f} s")
    save_quantized(model, out, tokenizer=tok)
    return out


def llm_row(name: str, args, tok, texts: dict) -> dict:
    import llmsqueeze
    from llmsqueeze.api import load_dense, prune_during_finetune
    from llmsqueeze.pruning.finetune import FinetuneOptions, finetune

    start, how, target, steps_key, distill = LLM_ROWS[name]
    steps = getattr(args, steps_key) if steps_key else 0
    train_ids = tokenize_text(tok, (DATA / "valid.txt").read_text())
    bos = bos_token_id(tok)  # BOS first in each training and perplexity window where the tokenizer puts it first
    teacher = load_dense(str(MODEL), torch.float32).eval() if distill else None
    row = {"row": name, "steps": steps, "tokens": steps * args.batch_size * args.seq_len, "lr": args.lr, "windows": args.windows,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "distill": distill}
    common = dict(lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=0, bos_token_id=bos,
                  progress=not args.quiet)
    src = None
    load_before = os.getloadavg()[0]
    if start == "dense":
        model = load_dense(str(MODEL), torch.float32)
        t0, c0 = time.time(), time.process_time()  # train minutes: the training loop only (not the one-shot prune, the loads or the eval)
        if how == "ft":
            hist = finetune(model, train_ids, FinetuneOptions(steps=steps, lr=args.lr, batch_size=args.batch_size,
                                                              seq_len=args.seq_len, bos_token_id=bos),
                            progress=not args.quiet)
        elif how and how.startswith("gradual"):
            hist = prune_during_finetune(model, train_ids, target, None, steps, score=how.split("-")[1],
                                         end=args.prune_end, **common)
    else:
        src = pruned_dir(args.work, start, target, tok)
        model = llmsqueeze.from_pretrained(src, dtype=torch.float32)
        t0, c0 = time.time(), time.process_time()
        if how == "ft":
            hist = llmsqueeze.finetune(model, train_ids, steps, teacher=teacher, **common)
    if how:
        row["train_minutes"] = round((time.time() - t0) / 60, 2)
        row["seconds_per_step"] = round((time.time() - t0) / max(1, steps), 2)
        row["train_cpu_minutes"] = round((time.process_time() - c0) / 60, 2)  # CPU time of this process, all threads
        row["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after training
        row["curve"] = [[r["step"], round(r["loss"], 4), round(r["ce"], 4)] for r in hist]
    if getattr(model.config, "quantization_config", None) is not None:
        out = args.work / ("ckpt-" + "".join(c if c.isalnum() else "_" for c in name))
        llmsqueeze.save_quantized(model, out, tokenizer=tok, overwrite=True)
        model = llmsqueeze.from_pretrained(out, dtype=torch.float32)  # the loaders' pattern check runs here
        row["checkpoint"] = str(out)
        row.update(pattern_check(model, target, src if how else None))
    model.eval()
    for label, ids in texts.items():
        row[f"ppl {label}"] = round(perplexity(model, ids, 2048, args.windows, progress=False, bos_token_id=bos)["ppl"], 3)
    return row


def sparse_weights(model) -> dict[str, torch.Tensor]:
    """{layer name: its dense weight [out, in]} for every pruned (SparseLinear) layer of a loaded checkpoint."""
    from llmsqueeze.nn import SparseLinear

    return {n: m.to_dense(torch.float32) for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def pattern_check(model, target, src: Path | None = None) -> dict:
    """Every pruned layer's sparsity from the saved and reloaded checkpoint: at most n of every m inputs
    nonzero and exactly n/m of the layer kept (2:4), or its share; with `src` (the one-shot checkpoint a
    fine-tune started from) also that no pruned weight came back (the mask was held)."""
    import llmsqueeze
    from llmsqueeze.pruning.masks import is_nm

    dense = sparse_weights(model)
    per_layer = [float((w == 0).float().mean()) for w in dense.values()]
    out = {"sparse_layers": len(dense),
           "sparsity": sum(int((w == 0).sum()) for w in dense.values()) / sum(w.numel() for w in dense.values()),
           "layer_sparsity_min_max": [round(min(per_layer), 5), round(max(per_layer), 5)]}
    if isinstance(target, str):
        n, m = map(int, target.split(":"))
        out["every_layer_nm"] = all(is_nm(w, n, m) for w in dense.values()) and all(
            int((w != 0).sum()) == w.numel() * n // m for w in dense.values())
    if src is not None:
        before = sparse_weights(llmsqueeze.from_pretrained(src, dtype=torch.float32))
        out["mask_held"] = set(before) == set(dense) and all(
            not bool(((before[k] == 0) & (w != 0)).any()) for k, w in dense.items())
    return out


def run_llm(args) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(MODEL)
    texts = {"wikitext2": tokenize_text(tok, load_eval_text(str(DATA / "test.txt"))),
             "python-docs": tokenize_text(tok, load_eval_text("python-docs"))}
    path = args.json
    doc = {"results": []}
    wanted = list(LLM_ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    for name in wanted:
        if name not in LLM_ROWS:
            raise SystemExit(f"row {name!r}: use one of {', '.join(LLM_ROWS)}")
        print(f"--- {name}", flush=True)
        row = llm_row(name, args, tok, texts)
        row.update(cpu_flags=cpu_flags(), threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"),
                   command="python " + " ".join(sys.argv))
        # read the file again just before writing: rows run by another process meanwhile are kept
        rows = {r["row"]: r for r in (json.loads(path.read_text())["results"] if path.exists() else [])}
        rows[name] = row
        print({k: v for k, v in row.items() if k != "curve"}, flush=True)
        doc = {"protocol": f"SmolLM2-135M float32 CPU; perplexity: 2048-token windows, first {args.windows}, of "
                           "WikiText-2 test.txt and of the Python reference docs (pydoc_data.topics, never trained on); "
                           "one-shot pruning calibrated on 128x512 tokens of valid.txt (seed 0); fine-tuning on "
                           "valid.txt, random windows (seed 0)",
               "environment": environment(), "results": [rows[r] for r in LLM_ROWS if r in rows]}
        path.write_text(json.dumps(doc, indent=1) + "\n")
    print_llm(doc)
    plot_llm(doc, path.with_suffix(".png"), f"{args.batch_size} x {args.seq_len}")


def print_llm(doc) -> None:
    print("\n| row | steps | tokens | train minutes (wall / CPU) | WikiText-2 | Python docs | sparsity |\n"
          "|---|---|---|---|---|---|---|")
    for r in doc["results"]:
        sp = f"{r['sparsity']:.3f}" + (" (2:4 in every layer)" if r.get("every_layer_nm") else "") if "sparsity" in r else "0"
        mins = f"{r.get('train_minutes', '-')} / {r.get('train_cpu_minutes', '-')}"
        print(f"| {r['row']} | {r['steps']} | {r['tokens']:,} | {mins} | {r['ppl wikitext2']} | {r['ppl python-docs']} | {sp} |")


def plot_llm(doc, out: Path, batch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in doc["results"]:
        if r.get("curve"):
            steps = [c[0] for c in r["curve"]]
            ce = [c[2] for c in r["curve"]]
            k = 10  # running mean over 10 steps
            smooth = [sum(ce[max(0, i - k + 1): i + 1]) / len(ce[max(0, i - k + 1): i + 1]) for i in range(len(ce))]
            ax.plot(steps, smooth, label=r["row"])
    ax.set_xlabel(f"fine-tuning step ({batch} tokens)")
    ax.set_ylabel("training cross-entropy (running mean of 10)")
    ax.set_title("SmolLM2-135M: recovery fine-tuning on WikiText-2 valid.txt")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


# ---------------------------------------------------------------------------------------- char
def run_char(args) -> None:
    from tiny_char_lm import char_data, make_train_step, tiny_llama

    from llmsqueeze.pruning.early_bird import early_bird_ticket
    from llmsqueeze.pruning.iterative import MaskGuard, iterative_prune, magnitude_masks, prunable_params
    from llmsqueeze.pruning.learned import LearnedSparsity
    from llmsqueeze.pruning.masks import global_masks
    from llmsqueeze.pruning.saliency import gradient_saliency, random_scores
    from llmsqueeze.pruning.schedule import GradualPruner
    from llmsqueeze.pruning.training import sparsity_report

    torch.set_num_threads(args.threads)
    train, test, vocab = char_data(DATA)
    seq, bs = args.char_seq_len, args.char_batch
    g = torch.Generator()

    def reset_data(seed=0):
        g.manual_seed(seed)

    train_step = make_train_step(train, seq, bs, g)

    def make_opt(params):
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)

    n = test.numel() // seq
    test_ids = test[: n * seq].view(n, seq)[:256]

    @torch.no_grad()
    def test_loss(model):
        was = model.training
        model.eval()
        out = sum(model(input_ids=b, labels=b).loss.item() for b in test_ids.split(64)) / len(test_ids.split(64))
        model.train(was)
        return round(out, 4)

    def train_for(model, steps, opt=None, first=0):
        opt = opt or make_opt(model.parameters())
        model.train()
        for s in range(steps):
            train_step(model, opt, first + s)
        return opt

    t_all = time.time()
    D = args.dense_steps
    # the dense model, and the weights at init and at the rewind step (lottery tickets)
    model = tiny_llama(vocab, seq)
    init = copy.deepcopy(model.state_dict())
    reset_data()
    opt = make_opt(model.parameters())
    early = None
    for s in range(D):
        train_step(model, opt, s)
        if s + 1 == args.rewind_step:
            early = copy.deepcopy(model.state_dict())
    dense = copy.deepcopy(model.state_dict())
    rows = [{"table": "criteria", "row": "dense", "sparsity": 0.0, "test_loss": test_loss(model), "steps": D}]
    print(rows[-1], flush=True)
    R = args.recovery_steps

    def with_masks(masks, steps, label, table, sparsity, spent, extra=None):
        params = prunable_params(model)
        o = make_opt(model.parameters())
        guard = MaskGuard(params)
        guard.set_masks(masks, o)
        before = test_loss(model)
        train_for(model, steps, o)
        guard.remove()
        rows.append({"table": table, "row": label, "sparsity": sparsity, "loss_before_ft": before,
                     "test_loss": test_loss(model), "steps": spent + steps, **(extra or {})})
        print(rows[-1], flush=True)

    # ---- allocation: uniform vs global vs learned, gradual over the same steps, at 50/70/90 %
    for s in args.sparsities:
        for alloc in ("uniform", "global", "uniform, regrow zero", "global, regrow zero", "learned"):
            model.load_state_dict(dense)
            reset_data(1)
            o = make_opt(model.parameters())
            end = int(args.prune_end * R)
            if alloc == "learned":
                pruner = LearnedSparsity(model, s, start=0, end=end, lr=args.learned_lr)
            else:
                pruner = GradualPruner(model, s, start=0, end=end, every=max(1, end // 20), allocation=alloc.split(",")[0],
                                       regrow="zero" if "zero" in alloc else "shadow")
            pruner.attach(o)
            t0 = time.time()
            train_for(model, R, o)
            masks = pruner.finish()
            rep = sparsity_report({n: p.detach() != 0 for n, p in prunable_params(model).items()})
            assert rep["sparsity"] >= s - 1e-3 and set(masks) == set(rep["layers"])
            rows.append({"table": "allocation", "row": f"{alloc}", "sparsity": s, "achieved": round(rep["sparsity"], 5),
                         "layers": {k: round(v, 4) for k, v in rep["layers"].items()}, "test_loss": test_loss(model),
                         "steps": D + R, "seconds": round(time.time() - t0, 1),
                         **({"history": pruner.history} if alloc == "learned" else {})})
            print({k: v for k, v in rows[-1].items() if k not in ("layers", "history")}, flush=True)

    # ---- criteria and when to prune, at --sparsity, R recovery steps each (IMP: rounds x R/rounds)
    S = args.sparsity
    model.load_state_dict(dense)
    reset_data(2)
    train_for(model, R)
    rows.append({"table": "criteria", "row": f"dense + {R} steps", "sparsity": 0.0, "test_loss": test_loss(model),
                 "steps": D + R})
    # before training: random and SNIP masks at init, then the whole budget of training
    for label in ("random at init", "SNIP at init"):
        model.load_state_dict(init)
        params = prunable_params(model)
        if label.startswith("random"):
            scores = random_scores({k: tuple(p.shape) for k, p in params.items()}, torch.Generator().manual_seed(0))
        else:
            reset_data(3)
            batches = [torch.stack([train[i : i + seq] for i in torch.randint(0, train.numel() - seq, (bs,),
                                                                               generator=g).tolist()]) for _ in range(4)]
            scores = gradient_saliency(model, batches, params, "snip", lambda m, b: m(input_ids=b, labels=b).loss)
        reset_data(0)
        with_masks(global_masks(scores, S), D + R, label + " (layer-wise ranking: global)", "criteria", S, 0)
    # after dense training: one-shot magnitude / SNIP, then R steps
    model.load_state_dict(dense)
    reset_data(2)
    with_masks(magnitude_masks(prunable_params(model), S, "global"), R, "one-shot magnitude", "criteria", S, D)
    model.load_state_dict(dense)
    params = prunable_params(model)
    reset_data(3)
    batches = [torch.stack([train[i : i + seq] for i in torch.randint(0, train.numel() - seq, (bs,),
                                                                       generator=g).tolist()]) for _ in range(4)]
    scores = gradient_saliency(model, batches, params, "snip", lambda m, b: m(input_ids=b, labels=b).loss)
    reset_data(2)
    with_masks(global_masks(scores, S), R, "one-shot SNIP", "criteria", S, D)
    # during training: gradual magnitude (global ranking), movement
    for score, regrow in (("magnitude", "zero"), ("magnitude", "shadow"), ("movement", "zero")):
        model.load_state_dict(dense)
        reset_data(2)
        o = make_opt(model.parameters())
        end = int(args.prune_end * R)
        pruner = GradualPruner(model, S, start=0, end=end, every=max(1, end // 20), score=score, allocation="global",
                               regrow=regrow)
        pruner.attach(o)
        train_for(model, R, o)
        pruner.finish()
        rows.append({"table": "criteria", "row": f"gradual {score} (global, cubic, regrow {regrow})", "sparsity": S,
                     "test_loss": test_loss(model), "steps": D + R})
        print(rows[-1], flush=True)
    # iterative magnitude pruning and lottery tickets: rounds x (R / rounds)... and the full IMP budget
    per = args.imp_steps
    for label, rewind_to in (("IMP", None), ("lottery ticket (rewind to init)", init),
                             (f"lottery ticket (rewind to step {args.rewind_step})", early)):
        model.load_state_dict(dense)
        reset_data(2)
        iterative_prune(model, train_step, make_opt, S, args.rounds, per, rewind=rewind_to)
        rows.append({"table": "criteria", "row": f"{label}, {args.rounds} rounds x {per} steps", "sparsity": S,
                     "test_loss": test_loss(model), "steps": D + args.rounds * per})
        print(rows[-1], flush=True)
    imp = next(r for r in rows if r["row"].startswith("IMP"))
    # early bird: dense training from init until the mask settles, then the ticket trains
    for threshold in args.eb_thresholds:
        model.load_state_dict(init)
        reset_data(0)
        res = early_bird_ticket(model, train_step, make_opt, S, max_steps=D, ticket_steps=args.ticket_steps,
                                every=args.eb_every, threshold=threshold, window=args.eb_window)
        loss = test_loss(model)
        rows.append({"table": "criteria", "row": f"early-bird ticket (distance < {threshold} x {args.eb_window}: step "
                                                 f"{res.found_at} of {D}) + {args.ticket_steps} steps",
                     "sparsity": S, "test_loss": loss, "steps": res.steps, "found_at": res.found_at,
                     "found_fraction": None if res.found_at is None else res.found_at / D, "threshold": threshold,
                     "distances": [[s, round(d, 5)] for s, d in res.distances],
                     "vs_imp_loss": round(loss / imp["test_loss"] - 1, 5), "vs_imp_steps": round(res.steps / imp["steps"], 4)})
        print({k: v for k, v in rows[-1].items() if k != "distances"}, flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "model": "2-layer char Llama (examples/tiny_char_lm.py)",
           "protocol": f"train on valid.txt, test loss (nats/char) on 256 windows of {seq} chars of test.txt; batch {bs}; "
                       f"AdamW 3e-3; dense {D} steps; recovery / schedule {R} steps",
           "cpu_flags": cpu_flags(), "seconds": round(time.time() - t_all), "environment": environment(),
           "results": rows}
    (RESULTS / "prune_train_char.json").write_text(json.dumps(doc, indent=1) + "\n")
    print_char(doc)
    plot_char(doc)


def print_char(doc) -> None:
    print("\n| allocation | sparsity | test loss | per-layer sparsity (min-max) |\n|---|---|---|---|")
    for r in doc["results"]:
        if r["table"] == "allocation":
            v = list(r["layers"].values())
            print(f"| {r['row']} | {r['sparsity']:.0%} | {r['test_loss']:.4f} | {min(v):.2f}-{max(v):.2f} |")
    print("\n| method | sparsity | test loss | training steps |\n|---|---|---|---|")
    for r in doc["results"]:
        if r["table"] == "criteria":
            print(f"| {r['row']} | {r['sparsity']:.0%} | {r['test_loss']:.4f} | {r['steps']} |")


def plot_char(doc) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for alloc in ("uniform", "global", "uniform, regrow zero", "global, regrow zero", "learned"):
        pts = [(r["sparsity"], r["test_loss"]) for r in doc["results"] if r["table"] == "allocation" and r["row"] == alloc]
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=alloc)
    a.set_xlabel("sparsity of the Linear weights")
    a.set_ylabel("test loss (nats/char)")
    a.set_title("per-layer allocation, gradual pruning")
    a.legend()
    eb = next((r for r in doc["results"] if r["row"].startswith("early-bird")), None)
    if eb:
        b.plot([d[0] for d in eb["distances"]], [d[1] for d in eb["distances"]], marker=".")
        if eb["found_at"] is not None:
            b.axvline(eb["found_at"], color="k", ls="--", label=f"ticket drawn (step {eb['found_at']})")
        b.set_yscale("log")
        b.set_xlabel("dense training step")
        b.set_ylabel("mask distance to the previous draw")
        b.set_title("early-bird: normalised Hamming distance")
        b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "prune_train_char.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("llm", "char"), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--rows", default="all", help="llm: comma-separated rows, or all")
    ap.add_argument("--work", type=Path, default=Path("~/.cache/llmsqueeze/prune-train").expanduser())
    ap.add_argument("--steps24", type=int, default=140, help="llm: fine-tuning steps of the 2:4 rows")
    ap.add_argument("--steps50", type=int, default=100, help="llm: fine-tuning steps of the 50 %% rows")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prune-end", type=float, default=0.6, help="fraction of the steps the gradual schedule spans")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", type=Path, default=RESULTS / "prune_train_llm.json",
                    help="llm: the results JSON rows merge into (a scratch path for smoke runs)")
    # char
    ap.add_argument("--dense-steps", type=int, default=2000)
    ap.add_argument("--recovery-steps", type=int, default=300)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--imp-steps", type=int, default=300, help="IMP: steps per round")
    ap.add_argument("--rewind-step", type=int, default=200)
    ap.add_argument("--ticket-steps", type=int, default=900)
    ap.add_argument("--eb-every", type=int, default=25)
    ap.add_argument("--eb-thresholds", type=float, nargs="+", default=[0.05, 0.03])
    ap.add_argument("--eb-window", type=int, default=3)
    ap.add_argument("--learned-lr", type=float, default=0.005)
    ap.add_argument("--char-seq-len", type=int, default=128)
    ap.add_argument("--char-batch", type=int, default=16)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_llm(args) if args.part == "llm" else run_char(args)


if __name__ == "__main__":
    main()

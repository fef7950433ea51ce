#!/usr/bin/env python3
"""Which weights our Wanda and llm-compressor's WandaPruningModifier zero, Linear by Linear, on the
same calibration token ids; and whether the per-input-channel statistics agree.

    python eval/wanda_masks.py --llmc-python /work/venvs/llmc/bin/python --pattern 2:4
    python eval/wanda_masks.py --peer-file peer.pt --pattern 2:4      # reuse a saved peer run

The peer runs eval/peers/llmcompressor_prune.py --save (no perplexity). Per block it prints the
fraction of positions where the two zero masks agree (lowest Linear and mean), the largest relative
difference between the statistics (ours: sum over tokens of x_j^2; llm-compressor: the same divided
by the number of samples, so multiplied back here), and "same rule": the agreement of llm-compressor's
mask with ours computed from *its* statistics on the dense weight (1.0 = the selection rules agree,
the rest is the statistics). Block 0 sees the same inputs in both, so a disagreement there is the
samples or the statistics; one that starts later is propagation. Writes eval/results/wanda_masks.json.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run_ours(model_dir: str, calib: torch.Tensor, nm, sparsity: float) -> dict:
    """Our Wanda through llmsqueeze.prune -> {"masks", "sq_norms", "dense"} keyed by Linear name."""
    import llmsqueeze
    from llmsqueeze.pruning import wanda

    model = llmsqueeze.load_dense(model_dir, dtype=torch.float32).eval()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    sq_norms = {}
    apply = wanda.Wanda.apply

    def recording(self, name, module):
        sq_norms[name] = self.sq_norms[name].clone()
        return apply(self, name, module)

    wanda.Wanda.apply = recording
    try:
        kw = {"pattern": f"{nm[0]}:{nm[1]}"} if nm else {"sparsity": sparsity}
        llmsqueeze.prune(model, "wanda", data=calib, progress=False, **kw)
    finally:
        wanda.Wanda.apply = apply
    masks = {n: model.get_submodule(n).weight == 0 for n in dense}
    return {"masks": masks, "sq_norms": sq_norms, "dense": dense}


def compare(ours: dict, peer: dict, calib: torch.Tensor, nm, sparsity: float) -> list[dict]:
    from llmsqueeze.pruning.wanda import wanda_mask

    n_samples = calib.shape[0]
    rows = []
    for name, mask in ours["masks"].items():
        pm = peer["masks"][name]
        ps = peer["row_scalars"].get(name)
        row = {"layer": name, "agree": (mask == pm).float().mean().item(), "pruned_ours": mask.float().mean().item(),
               "pruned_peer": pm.float().mean().item()}
        if ps is not None:
            ps = ps.float() * n_samples  # llm-compressor keeps the mean over samples
            s = ours["sq_norms"][name].float()
            row["stats_max_rel_diff"] = ((s - ps).abs() / ps.abs().clamp_min(1e-30)).max().item()
            w = ours["dense"][name]
            same_rule = ~wanda_mask(w, ps, sparsity, nm)  # True = pruned, with the peer's statistics
            same_rule |= w == 0  # weights already zero count as zero in both
            row["same_rule_agree"] = (same_rule == pm).float().mean().item()
        rows.append(row)
    return rows


def main() -> None:
    from llmsqueeze.evaluate import add_protocol_args, protocol_data, write_results
    from llmsqueeze.pruning.masks import parse_nm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--peer-file", default=None, help="a saved peer run (llmcompressor_prune.py --save)")
    ap.add_argument("--out", default="eval/results/wanda_masks.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared; this is about masks, not speed
    nm = parse_nm(args.pattern)
    sparsity = 1 - nm[0] / nm[1] if nm else args.sparsity

    calib, test, protocol = protocol_data(args)
    with tempfile.TemporaryDirectory() as tmp:
        peer_file = args.peer_file
        if peer_file is None:
            torch.save(calib, f"{tmp}/calib.pt")
            torch.save(test[:2048].clone(), f"{tmp}/test.pt")
            peer_file = f"{tmp}/peer.pt"
            cmd = [args.llmc_python, str(HERE / "peers" / "llmcompressor_prune.py"), args.model, f"{tmp}/calib.pt",
                   f"{tmp}/test.pt", "--method", "wanda", "--windows", "0", "--save", peer_file]
            cmd += ["--pattern", args.pattern] if nm else ["--sparsity", str(sparsity)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        peer = torch.load(peer_file)
    ours = run_ours(args.model, calib, nm, sparsity)

    # the peer's embedding saw every sample in its calibration pass (its own order), then again
    seen = peer["ids"][: len(calib)]
    order = [next((j for j in range(len(calib)) if torch.equal(r, calib[j])), None) for r in seen]
    same_samples = None not in order and sorted(order) == list(range(len(calib)))
    print(f"samples: the peer saw {'the same' if same_samples else 'DIFFERENT'} {len(calib)} token-id rows"
          f"{', in another order' if same_samples and order != sorted(order) else ''}")

    rows = compare(ours, peer, calib, nm, sparsity)
    blocks: dict[int, list[dict]] = {}
    for r in rows:
        blocks.setdefault(int(r["layer"].split(".layers.")[1].split(".")[0]), []).append(r)
    print("\n| block | mask agreement (lowest Linear) | mean | stats max rel. diff | same rule on peer stats |")
    print("|---|---|---|---|---|")
    for b, rs in sorted(blocks.items()):
        low = min(rs, key=lambda r: r["agree"])
        print(f"| {b} | {low['agree']:.6f} ({low['layer'].rsplit('.', 1)[1]}) | "
              f"{sum(r['agree'] for r in rs) / len(rs):.6f} | {max(r.get('stats_max_rel_diff', 0) for r in rs):.2e} | "
              f"{min(r.get('same_rule_agree', 1) for r in rs):.6f} |")
    total = sum(r["agree"] * ours["masks"][r["layer"]].numel() for r in rows) / sum(m.numel() for m in ours["masks"].values())
    print(f"\nall Linears: {total:.6f} of positions agree")
    write_results(args.out, rows, model=args.model, protocol=protocol, pattern=args.pattern, sparsity=sparsity,
                  same_samples=same_samples, peer_order=order, overall_agreement=total)


if __name__ == "__main__":
    sys.exit(main())

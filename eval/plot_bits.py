#!/usr/bin/env python3
"""Perplexity vs stored bits per weight on SmolLM2-135M, every method on one plot, read from the
results JSON the other eval/ scripts wrote (nothing is re-run, nothing typed in except AutoRound's
two published-protocol numbers from ../shared/README.md, marked as such).

    python eval/plot_bits.py            # -> eval/results/ppl_vs_bits.{png,json} and a markdown table

Bits per weight are what the packed layers store: codes + fp16 scale (+ zero for asymmetric) per
group, e.g. 3-bit g64 asym = 3 + 19/64 = 3.297; mixed rows report their own figure.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

R = Path("eval/results")
DENSE = 17.04  # shared/README.md, reproduced by perplexity_rtn.json's "dense" row


def bpw(bits: int, group: int, sym: bool = False) -> float:
    return bits + (16 + (0 if sym else bits)) / group


def rows(path: str, pick) -> list[dict]:
    p = R / path
    if not p.exists():
        print(f"(missing {p}: its points are left out)")
        return []
    return [r for r in json.loads(p.read_text())["results"] if "ppl" in r and pick(r)]


def collect() -> dict[str, list[tuple[float, float, str]]]:
    pts: dict[str, list[tuple[float, float, str]]] = {}

    def add(method, x, y, src):
        pts.setdefault(method, []).append((x, y, src))

    for r in rows("perplexity_rtn.json", lambda r: r["config"] in ("rtn w3 g64 asym", "rtn w4 g64 asym")):
        add("RTN (uniform)", bpw(int(r["config"][5]), 64), r["ppl"], "perplexity_rtn.json")
    for r in rows("gptq_clip_defaults.json", lambda r: not r["sym"]):
        add("GPTQ (ours)", bpw(r["bits"], r["group_size"]), r["ppl"], "gptq_clip_defaults.json")
    for f in ("gptq_vs_llmcompressor.json", "gptq_vs_llmcompressor_w3g64_dequantcache.json"):
        for r in rows(f, lambda r: r["run"].startswith("llm-compressor") and not r["sym"]):
            add("llm-compressor GPTQ", bpw(r["bits"], r["group_size"]), r["ppl"], f)
    for f, name in (("awq_rtn.json", "AWQ + RTN"), ("awq_gptq.json", "AWQ + GPTQ")):
        for r in rows(f, lambda r: r["group_size"] == 64):
            add(name, bpw(r["bits"], r["group_size"]), r["ppl"], f)
    # learned rounding, ours and AutoRound's, from the same-session runs (eval/beyond_gptq.py, files
    # autoround_*.json): the best of ours per width; earlier runs (beyond_gptq.json) where none
    ours, peer = {}, {}
    for f in sorted(p.name for p in R.glob("autoround_*.json")) + ["beyond_gptq.json"]:
        for r in rows(f, lambda r: r["group_size"] == 64 and not r["sym"]):
            table = peer if r.get("tool", "").startswith("auto-round") else ours if r.get("method") == "autoround" else None
            if table is None or (f == "beyond_gptq.json" and r["bits"] in table):
                continue
            if r["bits"] not in table or r["ppl"] < table[r["bits"]][0]:
                table[r["bits"]] = (r["ppl"], f)
    for bits, (ppl, f) in ours.items():
        add("autoround (ours)", bpw(bits, 64), ppl, f)
    for bits, (ppl, f) in peer.items():
        add("AutoRound 0.16.1", bpw(bits, 64), ppl, f)
    for r in rows("grids_rtn.json", lambda r: r["grid"] == "nf" and r["group_size"] == 64):
        add("NF4 RTN", r["bits_per_weight"], r["ppl"], "grids_rtn.json")
    for f, name in (("mixed_relative.json", "mixed RTN"), ("mixed_gptq35.json", "mixed GPTQ")):
        for r in rows(f, lambda r: r.get("budget") is not None):
            add(name, r["bits_per_weight"], r["ppl"], f)
    for bits, ppl in ((3, 20.37), (4, 17.84)):  # measured by whoever wrote shared/README.md, where not rerun
        if bits not in peer:
            add("AutoRound 0.16.1", bpw(bits, 64), ppl, "../shared/README.md")
    return pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(R / "ppl_vs_bits.png"))
    args = ap.parse_args()
    pts = collect()
    print("| method | bits/weight | perplexity (8 windows) | source |\n|---|---|---|---|")
    for m, ps in pts.items():
        for x, y, src in sorted(ps):
            print(f"| {m} | {x:.3f} | {y:.2f} | {src} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m, ps in pts.items():
        ps = sorted(ps)
        ax.plot([p[0] for p in ps], [p[1] for p in ps], marker="o", linestyle="--" if "(shared" in m or "llm-" in m else "-",
                label=m)
    ax.axhline(DENSE, color="k", linewidth=0.8, label=f"dense ({DENSE})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (codes + scales + zeros, group 64)")
    ax.set_ylabel("WikiText-2 perplexity (first 8 windows of 2048)")
    ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {m: [{"bits_per_weight": x, "ppl": y, "source": s} for x, y, s in sorted(ps)] for m, ps in pts.items()}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

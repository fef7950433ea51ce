"""The same check as eval/output_hashes.py in seconds, through the Python API on a tiny random Llama
(4 blocks, hidden 96 so group 64 leaves a shorter last group, seed 0) with random calibration ids:
every method's checkpoint hashed, in memory and (rtn, gptq) lazily from disk. It uses only the
public API (llmsqueeze.quantize / prune / quantize_lazy / save_quantized), so the same script runs
against two checkouts:

    PYTHONPATH=OLD_CHECKOUT python eval/output_hashes_tiny.py --out before.json
    PYTHONPATH=NEW_CHECKOUT python eval/output_hashes_tiny.py --out after.json
    python eval/output_hashes.py --compare before.json after.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output_hashes import checkpoint_hash  # noqa: E402


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def data() -> torch.Tensor:
    return torch.randint(3, 64, (8, 32), generator=torch.Generator().manual_seed(0))


def runs():
    import llmsqueeze
    from llmsqueeze import QuantScheme, W8A8Scheme

    q = llmsqueeze.quantize
    s64 = dict(bits=4, group_size=64)
    return {
        "rtn w4 g64": lambda m: q(m, QuantScheme(**s64), progress=False),
        "rtn w3 g32 sym lm-head": lambda m: q(m, QuantScheme(bits=3, group_size=32, sym=True, lm_head=True), progress=False),
        "rtn nf4 g32": lambda m: q(m, QuantScheme(bits=4, group_size=32, grid="nf"), progress=False),
        "gptq w4 g64": lambda m: q(m, QuantScheme(**s64), data(), method="gptq", progress=False),
        "gptq w4 g32 act-order dynamic": lambda m: q(m, QuantScheme(bits=4, group_size=32), data(), method="gptq",
                                                     static_groups=False, progress=False),
        "gptq kmeans3 g32": lambda m: q(m, QuantScheme(bits=3, group_size=32, grid="kmeans"), data(), method="gptq",
                                        progress=False),
        "awq w4 g64": lambda m: q(m, QuantScheme(**s64), data(), method="awq", progress=False),
        "awq-gptq w4 g64 true-sequential": lambda m: q(m, QuantScheme(**s64), data(), method="awq-gptq",
                                                       true_sequential=True, progress=False),
        "autoround w4 g64 iters 5": lambda m: q(m, QuantScheme(**s64), data(), method="autoround", iters=5,
                                                progress=False),
        "mixed gptq avg 3.5": lambda m: q(m, QuantScheme(group_size=32), data(), method="gptq", avg_bits=3.5,
                                          progress=False),
        "mixed rtn avg 3": lambda m: q(m, QuantScheme(group_size=32), data(), avg_bits=3.0, progress=False),
        "w8a8 dynamic rtn, no smoothing": lambda m: q(m, W8A8Scheme(smooth_alpha=None), progress=False),
        "w8a8 dynamic sq auto": lambda m: q(m, W8A8Scheme(), data(), progress=False),
        "w8a8 static gptq": lambda m: q(m, W8A8Scheme(act="static"), data(), method="gptq", progress=False),
        "magnitude 50% global": lambda m: llmsqueeze.prune(m, "magnitude", 0.5, scope="global", progress=False),
        "magnitude 2:4 + w4 g32": lambda m: llmsqueeze.prune(m, "magnitude", pattern="2:4",
                                                             scheme=QuantScheme(bits=4, group_size=32), progress=False),
        "wanda 50%": lambda m: llmsqueeze.prune(m, "wanda", 0.5, data=data(), progress=False),
        "wanda 50% owl refit": lambda m: llmsqueeze.prune(m, "wanda", 0.5, data=data(), owl={"lam": 0.08, "m": 5},
                                                          refit=True, progress=False),
        "sparsegpt 2:4 + w4 g32": lambda m: llmsqueeze.prune(m, "sparsegpt", pattern="2:4", data=data(),
                                                             scheme=QuantScheme(bits=4, group_size=32), progress=False),
        "sparsegpt 50% layer": lambda m: llmsqueeze.prune(m, "sparsegpt", 0.5, data=data(), scope="layer",
                                                          progress=False),
        "snip 50%": lambda m: llmsqueeze.prune(m, "snip", 0.5, data=data(), progress=False),
        "taylor 2:4": lambda m: llmsqueeze.prune(m, "taylor", pattern="2:4", data=data(), progress=False),
    }


LAZY = {
    "lazy rtn w4 g64": dict(scheme=dict(bits=4, group_size=64), method="rtn"),
    "lazy gptq w4 g64": dict(scheme=dict(bits=4, group_size=64), method="gptq"),
}


def main() -> int:
    import llmsqueeze

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in runs().items():
            model = fn(tiny())
            d = llmsqueeze.save_quantized(model, Path(tmp) / name.replace(" ", "_"))
            results[name] = checkpoint_hash(d)
            print(f"{name:34s} {results[name]['sha256']}", flush=True)
        dense = Path(tmp) / "dense"
        tiny().save_pretrained(dense)
        for name, kw in LAZY.items():
            out, _ = llmsqueeze.quantize_lazy(str(dense), Path(tmp) / name.replace(" ", "_"),
                                              llmsqueeze.QuantScheme(**kw["scheme"]),
                                              data() if kw["method"] != "rtn" else None, kw["method"], progress=False)
            results[name] = checkpoint_hash(out)
            print(f"{name:34s} {results[name]['sha256']}", flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "model": "tiny random Llama, seed 0",
                                    "llmsqueeze": llmsqueeze.__file__, "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

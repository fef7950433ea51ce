#!/usr/bin/env python3
"""Our compressed-tensors sparse exports read by the real compressed-tensors decompressors.

    python -m venv /work/venvs/ct010
    /work/venvs/ct010/bin/pip install torch==2.13.0 compressed-tensors==0.10.2   # pulls transformers
    python eval/sparse_export_check.py --ct010-python /work/venvs/ct010/bin/python

compressed-tensors 0.20 (what transformers 5 needs) lists "sparse-bitmask" and "sparse-24-bitmask"
but ships no compressor for them; 0.10.2 still does. For each case below this script prunes a tiny
Llama (random weights, made here), saves it with llmsqueeze, exports it, and runs a child process in
the 0.10.2 virtualenv (this same file, --child: it imports compressed_tensors and transformers, never
llmsqueeze) that loads the export the way transformers 4.x's integration did: the model from the
checkpoint without its quantization_config, then ModelCompressor.from_pretrained(dir).decompress(dir,
model). Every weight of the decompressed model must equal ours bit for bit (the pruned weights, and
every other tensor). Every export is also loaded in this environment by transformers' own
compressed-tensors integration (compressed-tensors 0.20; dequantize=True for the quantized ones) and
compared by weights and logits: the 2:4 + 4-bit exports must match; the sparse-only ones show what
0.20 does with formats it no longer reads. Writes eval/results/sparse_export_check.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def child(export_dir: str, out_file: str) -> None:
    """Runs in the compressed-tensors 0.10.2 virtualenv: decompress with the library, save every weight."""
    import compressed_tensors
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    mc = ModelCompressor.from_pretrained(export_dir)
    cfg = AutoConfig.from_pretrained(export_dir)
    del cfg.quantization_config  # the rest of the checkpoint loads as a plain model; the compressor fills the layers
    model = AutoModelForCausalLM.from_pretrained(export_dir, config=cfg, dtype="auto")
    mc.decompress(export_dir, model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"))}
    save_file(state, out_file)
    print(json.dumps({"compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                      "sparsity_compressor": type(mc.sparsity_compressor).__name__ if mc.sparsity_compressor else None,
                      "quantization_compressor": type(mc.quantization_compressor).__name__
                      if mc.quantization_compressor else None}))


def tiny_llama(hidden: int, intermediate: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4 if hidden % 8 == 0 else 2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval().to(dtype)


# name, model widths (hidden, MLP), dtype, prune kwargs, export kwargs. Widths 100 and 164 are not
# multiples of 8: the last bitmask byte of every row is half used.
CASES = [
    ("2:4 sparsegpt, fp32", (100, 164), torch.float32, dict(method="sparsegpt", pattern="2:4"), {}),
    ("2:4 magnitude, bf16", (96, 160), torch.bfloat16, dict(method="magnitude", pattern="2:4"), {}),
    ("unstructured 60% wanda, fp32", (100, 164), torch.float32, dict(method="wanda", sparsity=0.6), {}),
    ("4:8 sparsegpt, fp16", (96, 160), torch.float16, dict(method="sparsegpt", pattern="4:8"), {}),
    ("2:4 + 4-bit sym per-channel (wanda)", (96, 160), torch.float32,
     dict(method="wanda", pattern="2:4", bits=4, group_size=-1, sym=True), dict(scale_dtype="float32")),
    ("2:4 + 4-bit asym g32 (sparsegpt)", (96, 160), torch.float32,
     dict(method="sparsegpt", pattern="2:4", bits=4, group_size=32), dict(scale_dtype="float32")),
]


def reference_weights(model) -> dict[str, torch.Tensor]:
    """Every tensor of our model, each Linear's as its dense weight: a pruned nn.Linear as is (zeros
    where pruned), a SparseLinear's to_dense(), a QuantLinear's dequantized weight (float32)."""
    from llmsqueeze.nn import QuantLinear, SparseLinear

    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, SparseLinear)):
            for k in [k for k in out if k.startswith(name + ".") and not k.endswith(".bias")]:
                del out[k]
            out[f"{name}.weight"] = mod.dequantize_weight() if isinstance(mod, QuantLinear) else mod.to_dense()
    return out


def compare(ours: dict, theirs: dict) -> dict:
    """Every tensor the two have in common: how many are bit-identical (same dtype, shape and bytes)
    and how many equal in value (torch.equal: -0.0 == 0.0); the names that differ or that one lacks."""
    common = sorted(set(ours) & set(theirs))
    bits, values = [], []
    for k in common:
        a, b = ours[k], theirs[k]
        if a.shape == b.shape and a.dtype == b.dtype:
            values.append(torch.equal(a, b))
            bits.append(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))
        else:
            values.append(False)
            bits.append(False)
    return {"tensors": len(common), "bit_identical": sum(bits), "value_equal": sum(values),
            "differ": [k for k, v in zip(common, values) if not v][:5],
            "only_ours": sorted(set(ours) - set(theirs))[:5], "only_theirs": sorted(set(theirs) - set(ours))[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("EXPORT_DIR", "OUT_FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--ct010-python", default="/work/venvs/ct010/bin/python",
                    help="python of a virtualenv with compressed-tensors 0.10.2")
    ap.add_argument("--out", default="eval/results/sparse_export_check.json")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import compressed_tensors
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import llmsqueeze
    from llmsqueeze.evaluate import write_results

    calib = torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmsqueeze-sparse-ct-") as tmp:
        tmp = Path(tmp)
        for i, (name, (hidden, inter), dtype, prune_kw, export_kw) in enumerate(CASES):
            model = tiny_llama(hidden, inter, dtype)
            kw = dict(prune_kw)
            method = kw.pop("method")
            scheme = None
            if "bits" in kw:
                scheme = llmsqueeze.QuantScheme(bits=kw.pop("bits"), group_size=kw.pop("group_size"),
                                                sym=kw.pop("sym", False))
            llmsqueeze.prune(model, method, data=None if method == "magnitude" else calib, scheme=scheme,
                             progress=False, **kw)
            pruned = reference_weights(model)  # in memory: pruned weights are +-0.0 (w * mask keeps the sign)
            with torch.no_grad():
                logits = model(IDS).logits.float()
            src = llmsqueeze.save_quantized(model, tmp / f"src{i}")
            ours = reference_weights(llmsqueeze.from_pretrained(src))  # our checkpoint, dense: +0.0 where pruned
            out = llmsqueeze.export(src, "compressed-tensors", tmp / f"ct{i}", **export_kw)
            sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
            row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "sparsity_config": sc,
                   "export": {k: v for k, v in export_kw.items()}}
            dense_file = tmp / f"dense{i}.safetensors"
            p = subprocess.run([args.ct010_python, __file__, "--child", str(out), str(dense_file)],
                               capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode or not lines:
                last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
                row["ct_0.10.2"] = {"error": f"exit {p.returncode}: {last}"}
            else:
                dense = load_file(dense_file)
                row["ct_0.10.2"] = {**json.loads(lines[-1]), "vs_our_checkpoint": compare(ours, dense),
                                    "vs_pruned_model": compare(pruned, dense)}
            # this environment's transformers + compressed-tensors: the pack-quantized + dense-sparsity
            # exports decompress (dequantize=True); the sparse-only ones load without error, but with
            # their pruned layers newly initialized (a MISSING warning): it does not read those formats
            kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if scheme is not None else {}
            theirs = AutoModelForCausalLM.from_pretrained(out, dtype="auto", **kw)
            with torch.no_grad():
                diff = (theirs(IDS).logits.float() - logits).abs().max().item()
            row[f"ct_{compressed_tensors.__version__}_transformers"] = {
                "vs_our_checkpoint": compare(ours, theirs.state_dict()), "max_abs_logit_diff": diff}
            rows.append(row)
            print(f"{name:38s} {sc['format']:18s} " + "  ".join(
                f"{lib}: " + (f"{r['vs_our_checkpoint']['bit_identical']}/{r['vs_our_checkpoint']['tensors']} bit-identical"
                              if "error" not in r else r["error"][:60])
                for lib, r in row.items() if lib.startswith("ct_")))
    write_results(args.out, rows, compressed_tensors_here=compressed_tensors.__version__,
                  ct010_python=args.ct010_python,
                  ct010_setup="python -m venv /work/venvs/ct010 && /work/venvs/ct010/bin/pip install torch==2.13.0 "
                              "compressed_tensors-0.10.2-py3-none-any.whl (transformers 5.24.0 came with it)")


if __name__ == "__main__":
    main()

"""`llmsqueeze info`: what a checkpoint holds, how many bits each weight costs, its size vs dense."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import scheme_from_dict
from .formats import LAYER_TENSORS, describe_source
from .formats.files import read_safetensors_header, skeleton, weight_files
from .formats.loader import check_checkpoint


def checkpoint_info(path: str | Path) -> dict:
    from .models import all_linear_names
    from .nn import linear_weight

    path = Path(path).expanduser()
    qc = check_checkpoint(path)
    fmt = (qc.get("source") or {}).get("format", "llmsqueeze")
    scheme = None if qc.get("scheme") is None else scheme_from_dict(qc["scheme"])
    sparse = qc.get("sparsity")
    model, config = skeleton(path)
    keep = set(qc.get("modules_to_not_convert", []))
    tensors: dict[str, dict] = {}
    for f in weight_files(path):
        tensors.update({k: v for k, v in read_safetensors_header(f).items() if k != "__metadata__"})

    from .formats.files import renamed_keys

    tensors.update({name: tensors[key] for name, key in renamed_keys(model, list(tensors)).items()})  # module names

    def nbytes(key: str) -> int:
        t = tensors.get(key)
        return 0 if t is None else t["data_offsets"][1] - t["data_offsets"][0]

    layer_schemes = qc.get("layer_schemes") or {}
    layers, q_weights, q_bytes = [], 0, 0
    for name in all_linear_names(model):
        if name in keep:
            continue
        n, k = linear_weight(model.get_submodule(name)).shape
        if fmt != "llmsqueeze":
            b = sum(nbytes(f"{name}.{s}") for s in LAYER_TENSORS[fmt])
        elif f"{name}.blocks" in tensors:  # a GGML block format: the GGUF bytes
            b = nbytes(f"{name}.blocks") + nbytes(f"{name}.bias")
        elif f"{name}.weight_scale" in tensors:  # w8a8 or a float format: weight + scales
            b = sum(nbytes(f"{name}.{s}") for s in ("weight", "weight_packed", "weight_scale", "weight_global_scale",
                                                      "input_scale", "input_global_scale"))
        else:
            b = sum(nbytes(f"{name}.{s}") for s in ("qweight", "scales", "qzeros", "g_idx", "values", "indices",
                                                      "bitmask", "qvalues.qweight", "qvalues.scales", "qvalues.qzeros", "codebook"))
        layer = {"name": name, "in_features": k, "out_features": n, "bytes": b, "bits_per_weight": 8 * b / (k * n)}
        if layer_schemes:  # mixed precision: each layer's own width
            layer["bits"] = layer_schemes.get(name, {}).get("bits", scheme.bits)
        if getattr(scheme, "type", None) == "gguf":
            layer["ggml_type"] = scheme.layer_types.get(name)
        layers.append(layer)
        q_weights += k * n
        q_bytes += b
    cover = coverage(model, {layer["name"] for layer in layers}, keep)
    experts = _expert_counts(model, {layer["name"]: layer for layer in layers})
    dense_dtype = str(getattr(config, "dtype", None) or "bfloat16").replace("torch.", "")
    dense_elt = torch.empty(0, dtype=getattr(torch, dense_dtype, torch.bfloat16)).element_size()
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights count once
    disk = sum(f.stat().st_size for f in weight_files(path))
    return {
        "path": str(path),
        "model_type": config.model_type,
        "architecture": (config.architectures or ["?"])[0],
        "method": qc.get("method"),
        "format_version": qc.get("format_version"),
        "format": describe_source(qc),
        "scheme": None if scheme is None else scheme.to_dict(),
        "sparsity": sparse,
        "quantized_layers": len(layers),
        "quantized_weights": q_weights,
        "bits_per_quantized_weight": 8 * q_bytes / max(q_weights, 1),
        "modules_to_not_convert": sorted(keep),
        "dense_parameters": sum(params.values()),
        "dense_dtype": dense_dtype,
        "dense_bytes": sum(params.values()) * dense_elt,
        "bytes_on_disk": disk,
        "compression": sum(params.values()) * dense_elt / disk if disk else math.nan,
        "routers_kept_dense": cover["routers"],
        "left_dense": cover["left_dense"],
        "handled_share": q_weights / max(sum(params.values()), 1),
        "layers": layers,
        **({"experts": experts} if experts else {}),
        **({"bits_histogram": _bits_histogram(layers), "avg_bits_target": (qc.get("method_args") or {}).get("avg_bits")}
           if layer_schemes else {}),
    }


def coverage(model: torch.nn.Module, handled: set[str], kept_linear: set[str]) -> dict:
    """Where a model's parameters went, from its skeleton: {"routers": {module: weights} of the routers
    and gates kept dense (models.KEPT_DENSE), "left_dense": {module: weights}}, the latter every
    parameter of two or more dimensions held outside the `handled` (quantized or pruned) layers, the
    Linears kept dense (`kept_linear`: the head, --exclude), the embeddings and the routers: modules
    llmsqueeze does not know how to compress (MoE experts held as fused 3-D parameters, say), which
    would otherwise stay dense without a word. Tied parameters count once; norms are 1-D."""
    from .models import kept_dense

    embeddings = {id(m) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, get, lambda: None)()
        if m is not None:
            embeddings.add(id(m))
    seen, routers, left = set(), {}, {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() < 2 or name in handled or id(module) in embeddings:
                continue
            if kept_dense(name):
                routers[name] = routers.get(name, 0) + p.numel()
            elif name not in kept_linear:
                left[name] = left.get(name, 0) + p.numel()
    return {"routers": routers, "left_dense": left}


def _by_suffix(names, last: int = 2) -> str:
    """'mlp.experts x2, ...': module names by their last `last` components, in model order."""
    counts: dict[str, int] = {}
    for n in names:
        key = ".".join(n.split(".")[-last:])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{c}" if c > 1 else k for k, c in counts.items())


def _verb(info: dict) -> str:
    """'pruned', 'quantized' or 'pruned and quantized': what the checkpoint did to its layers."""
    pruned, quantized = info.get("sparsity") is not None, info.get("scheme") is not None
    return " and ".join(v for v, on in (("pruned", pruned), ("quantized", quantized)) if on) or "quantized"


def coverage_lines(info: dict) -> list[str]:
    """[the share of the parameters compressed, and when there are any the weights left dense in
    modules llmsqueeze does not handle], one line each (`info`'s share / left dense, the CLI's summary)."""
    verb = _verb(info)
    lines = [f"{info['quantized_weights']:,} of the model's {info['dense_parameters']:,} parameters {verb} "
             f"({info['handled_share']:.1%}); the rest dense"]
    left = info.get("left_dense") or {}
    if left:
        what = verb.replace("pruned", "prune").replace("quantized", "quantize").replace(" and ", " or ")
        lines.append(f"{sum(left.values()):,} weights in {len(left)} modules llmsqueeze does not "
                     f"{what}: {_by_suffix(left)} ({', '.join(list(left)[:3])}{', ...' if len(left) > 3 else ''})")
    return lines


def _expert_counts(model, quantized: dict[str, dict]) -> dict | None:
    """MoE: how many expert matrices (and their weights) the checkpoint stores quantized, of all."""
    from .nn import linear_weight
    from .nn_moe import MoEExperts, expert_linear_names

    names = expert_linear_names(model)
    if not names:
        return None
    weights = {n: linear_weight(model.get_submodule(n)).numel() for n in names}
    done = [n for n in names if quantized.get(n, {}).get("bytes", 0) > 0]
    moes = [m for m in model.modules() if isinstance(m, MoEExperts)]
    return {"moe_layers": len(moes), "experts": sum(m.num_experts for m in moes), "matrices": len(names),
            "quantized_matrices": len(done), "weights": sum(weights.values()),
            "quantized_weights": sum(weights[n] for n in done),
            "dense": [n for n in names if n not in set(done)]}


def _bits_histogram(layers: list[dict]) -> dict[str, dict]:
    """{bits: {"layers", "weights"}} over the quantized layers of a mixed-precision checkpoint."""
    hist: dict[str, dict] = {}
    for layer in sorted(layers, key=lambda x: x["bits"]):
        h = hist.setdefault(str(layer["bits"]), {"layers": 0, "weights": 0})
        h["layers"] += 1
        h["weights"] += layer["in_features"] * layer["out_features"]
    return hist


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _experts_line(x: dict, verb: str = "quantized") -> str:
    share = x["quantized_weights"] / max(x["weights"], 1)
    return (f"  experts     {x['quantized_matrices']} of {x['matrices']} expert matrices {verb} "
            f"({x['experts']} experts in {x['moe_layers']} MoE layers; {share:.1%} of "
            f"{x['weights']:,} expert weights)" + (f", dense: {x['dense'][0]}, ..." if x["dense"] else ""))


def _module_summary(layers: list[dict]) -> str:
    """'q_proj x30 (576->576), ...' by the last name component and shape, in model order: layers of one
    name with different shapes (DeepSeek-V3's dense and expert MLPs) get one entry per shape."""
    kinds: dict[tuple, int] = {}
    for layer in layers:
        kind = layer["name"].rsplit(".", 1)[-1]
        parts = layer["name"].split(".")
        if len(parts) > 3 and parts[-3] == "experts" and parts[-2].isdigit():  # a MoE expert's matrix
            kind = f"experts.{kind}"
        key = (kind, layer["in_features"], layer["out_features"])
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{n} ({i}->{o})" for (k, i, o), n in kinds.items())


FLOAT_WEIGHTS = {"fp8": "FP8 E4M3 weights, an fp32 scale per output channel",
                 "fp8-block": "FP8 E4M3 weights, an fp32 scale per 128x128 block",
                 "fp8-weight": "FP8 E4M3 weights, an fp32 scale per output channel",
                 "nvfp4": "FP4 E2M1 weights in groups of 16, FP8 scales under an fp32 global scale",
                 "nvfp4-a16": "FP4 E2M1 weights in groups of 16, FP8 scales under an fp32 global scale",
                 "mxfp4": "FP4 E2M1 weights in groups of 32, E8M0 power-of-two scales"}


def _float_words(s: dict) -> str:
    from .config import FLOAT_ACT

    act = FLOAT_ACT[s["format"]]
    if act is None:
        act = "16-bit activations"
    elif s["format"] == "fp8":
        act = f"FP8 activations {'per token at run time' if s['act'] == 'dynamic' else 'with a calibrated scale per layer'}"
    else:
        act = act.replace("fp8", "FP8").replace("fp4", "FP4") + " activations"
    alpha = s.get("smooth_alpha")
    return f"{FLOAT_WEIGHTS[s['format']]}, {act}" + ("" if alpha is None else f", SmoothQuant alpha {alpha}")


def format_info(info: dict) -> str:
    s, sp = info["scheme"], info.get("sparsity")
    lines = [f"{info['path']}: {info['architecture']} ({info['model_type']}), {info['format']}"]
    if s is not None and s.get("type") == "w8a8":
        alpha = s["smooth_alpha"]
        lines.append(f"  scheme      w8a8: {s['weights']} weights, int8 {s['act']} activations, "
                     f"SmoothQuant {'off' if alpha is None else f'alpha {alpha}'}, method {info['method']}")
    elif s is not None and s.get("type") == "float":
        lines.append(f"  scheme      {s['format']}: {_float_words(s)}, method {info['method']}"
                     f"{', scale search' if s.get('scale_search') else ''}")
    elif s is not None and s.get("type") == "gguf":
        counts: dict[str, int] = {}
        for layer in info["layers"]:
            counts[layer["ggml_type"]] = counts.get(layer["ggml_type"], 0) + 1
        mix = s["mix"].upper() + (" (pure)" if s.get("pure") else "")
        lines.append(f"  scheme      gguf {mix}: GGML block types "
                     + ", ".join(f"{t.upper()} x{n}" for t, n in sorted(counts.items())) + f", method {info['method']}")
    elif s is not None:
        g = "per-channel" if s["group_size"] == -1 else f"group {s['group_size']}"
        grid = s.get("grid", "uniform")
        hist = info.get("bits_histogram")
        width = f"{s['bits']}-bit" if not hist else "mixed-precision"
        if grid == "uniform":
            lines.append(f"  scheme      {width} {g} {'sym' if s['sym'] else 'asym'}, scales {s['scale_dtype']}, "
                         f"method {info['method']}{', clip search' if s['clip_search'] else ''}")
        else:
            levels = (f"grid nf (normal-float levels x group absmax), scales {s['scale_dtype']}" if grid == "nf" else
                      f"grid kmeans ({2 ** s['bits']}-level codebook per group, {s['scale_dtype']})")
            lines.append(f"  scheme      {width} {g}, {levels}, method {info['method']}")
        if hist:
            total = sum(h["weights"] for h in hist.values())
            target = info.get("avg_bits_target")
            lines.append("  bit widths  " + ", ".join(
                f"{b}-bit {h['layers']} layers ({h['weights'] / total:.1%} of weights)" for b, h in hist.items())
                + ("" if target is None else f"; budget {target} bits/weight"))
    if sp is not None:
        what = sp["nm_pattern"] if sp.get("nm_pattern") else f"{sp['sparsity']:.0%} unstructured ({sp.get('scope')})"
        store = {"nm": "values + N:M indices", "bitmask": "bitmask + values"}.get(sp.get("format"), "packed, q == zero")
        if s is not None and sp.get("format") == "nm":
            store = f"{s['bits']}-bit values + N:M indices"
        lines.append(f"  sparsity    {what}, method {info['method']}, stored as {store}")
    routers = info.get("routers_kept_dense") or {}
    linear = [n for n in info["modules_to_not_convert"] if n not in routers]
    w8 = s is not None and s.get("type") in ("w8a8", "float")
    included = "values, indices, scales and zeros" if sp is not None else ("scales" if w8 else "scales and zeros")
    if s is not None and s.get("type") == "gguf":
        included = "block scales and mins"
    elif s is not None and s.get("grid", "uniform") != "uniform":
        included = "scales" if s["grid"] == "nf" else "codebooks"
    lines += [
        f"  {'quantized ' if sp is None else 'compressed'}  {info['quantized_layers']} layers, "
        f"{info['quantized_weights']:,} weights at {info['bits_per_quantized_weight']:.3f} bits/weight "
        f"({included} included)",
        f"  modules     {_module_summary(info['layers'])}",
        *([_experts_line(info["experts"], _verb(info))] if info.get("experts") else []),
        f"  kept dense  {len(linear)} linear modules"
        + (f" ({', '.join(linear[:4])}{', ...' if len(linear) > 4 else ''})" if linear else "")
        + (f", {len(routers)} routers and gates ({_by_suffix(routers)}; {sum(routers.values()):,} weights)"
           if routers else "")
        + ", plus embeddings and norms",
    ]
    share, *left = coverage_lines(info)
    lines += [f"  share       {share}"] + [f"  left dense  {x}" for x in left]
    lines.append(f"  size        {_mib(info['bytes_on_disk'])} on disk vs {_mib(info['dense_bytes'])} dense "
                 f"{info['dense_dtype']} ({info['compression']:.2f}x smaller)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(checkpoint_info(sys.argv[1]), indent=2))

"""GGUF export (llama.cpp, Ollama, LM Studio): a llmsqueeze checkpoint written as one .gguf file with
the `gguf` package (llama.cpp's own Python library), following llama.cpp's converter's conventions.

  what is written          from a GGUFScheme checkpoint: each layer's bytes as they are (GPTQ's codes
                           and the block scales it was optimized under); from a uniform checkpoint, the
                           exact mappings: symmetric 4-bit -> Q4_0, asymmetric 4-bit -> Q4_1 (the min
                           -scale*zero rounded to fp16), symmetric 8-bit -> Q8_0, groups a multiple of 32
                           (each 32-block takes its group's scale; float16 and bfloat16 scales are exact
                           in fp16, float32 ones are rounded); anything else is refused in one line.
  dense tensors            norms F32; the token embeddings (and an untied dense output head) in the
                           type llama-quantize gives them under the mix (quant/ggml.mix_type, fitted
                           by quant/ggml's RTN), or `dense_type` (f16, f32, bf16 or a GGML type).
  layout                   GGUF rows are our weight rows ([N, K] -> ne = [K, N]); llama's q and k
                           rows are permuted for ggml's rotary embedding (convert_hf_to_gguf's
                           permute), which moves whole quantized rows and so is exact.
  metadata                 the family's hyper-parameters under `{arch}.*`, general.file_type, and the
                           tokenizer: BPE vocabularies as "gpt2" (tokens, types, merges, special
                           token ids, chat template) with llama.cpp's pre-tokenizer recognised from
                           tokenizer.json's pre_tokenizer.

Families written: llama (and mistral, as llama), qwen2, qwen3, gemma2, gemma3 (text; norms shifted by
+1 as llama.cpp stores them, its soft-capping and sliding-window keys) and phi3 (fused qkv and gate/up
as attn_qkv and ffn_up; long-context rope factors are refused in one line). Tokenizers: byte-level BPE
(tokenizer.json) as "gpt2", SentencePiece (tokenizer.model) as "llama".
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import LlmsqueezeError, QuantScheme, scheme_from_dict
from ..quant import ggml
from .gguf import ARCHS, gguf_name, permute_rows

TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_CONTROL, TOKEN_USER = 1, 5, 3, 4


# ------------------------------------------------------------------------------- what may be exported
def uniform_type(scheme: QuantScheme, method_args: dict) -> str:
    """The GGML type a uniform checkpoint maps onto exactly, or a one-line refusal naming the field."""
    if scheme.grid != "uniform":
        raise LlmsqueezeError(f"cannot export to gguf: grid={scheme.grid!r} has no GGML type; quantize with "
                              "--scheme gguf:<type> (e.g. gguf:iq4_nl or gguf:q4_k_m)")
    if scheme.bits not in (4, 8) or (scheme.bits == 8 and not scheme.sym):
        raise LlmsqueezeError(f"cannot export to gguf: bits={scheme.bits}{'' if scheme.sym else ' asym'} has no exact GGML "
                              "type (4-bit -> Q4_0/Q4_1, symmetric 8-bit -> Q8_0); quantize with --scheme gguf:<type>, "
                              "e.g. gguf:q3_k_m or gguf:q2_k")
    if scheme.group_size != -1 and scheme.group_size % 32:
        raise LlmsqueezeError(f"cannot export to gguf: group_size={scheme.group_size} is not a multiple of 32, GGML's "
                              "block; re-quantize with --group-size 32, 64 or 128")
    if method_args.get("act_order") and not method_args.get("static_groups"):
        raise LlmsqueezeError("cannot export to gguf: act_order with dynamic groups stores g_idx, which GGML blocks "
                              "cannot; re-quantize with --act-order static")
    return {(4, True): "q4_0", (4, False): "q4_1", (8, True): "q8_0"}[(scheme.bits, scheme.sym)]


def from_uniform(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, t: str) -> ggml.Params:
    """Our codes q [N, K], scale/zero [N, ng] -> (codes, params) of GGML type t (q4_0, q4_1, q8_0):
    the same weights, each 32-block with its group's scale."""
    n, k = q.shape
    per_block = (torch.arange(k // 32) * 32 // group).long()
    s, z = scale.float()[:, per_block], zero.float()[:, per_block]
    if t == "q4_0":
        return q.long(), {"d": ggml.fp16(s)}
    if t == "q4_1":
        return q.long(), {"d": ggml.fp16(s), "m": ggml.fp16(-s * z)}
    return q.long() - 1, {"d": ggml.fp16(s)}  # q8_0: code = int8 + 127, our int8 = q - 128


def check_exact(t: str, scale: torch.Tensor) -> None:
    """Scales beyond fp16's range cannot be stored."""
    if not torch.isfinite(scale.to(torch.float16)).all():
        raise LlmsqueezeError(f"cannot export to gguf: a group scale exceeds fp16's range, which {t} stores")


# ------------------------------------------------------------------------------- metadata
def hparams(config: dict) -> dict:
    text = config.get("text_config") or config
    rope = text.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # gemma3: the global layers' rope
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return {
        "rope_dims": int(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)) * head_dim),
        "context_length": text.get("max_position_embeddings", 2048),
        "embedding_length": text["hidden_size"],
        "block_count": text["num_hidden_layers"],
        "feed_forward_length": text["intermediate_size"],
        "head_count": heads,
        "head_count_kv": text.get("num_key_value_heads") or heads,
        "rope_theta": rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        "rms_eps": text.get("rms_norm_eps", 1e-6),
        "head_dim": head_dim,
        "vocab_size": text["vocab_size"],
        "tied": bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
    }


def write_hparams(w, arch: str, hp: dict, config: dict) -> None:
    """The hyper-parameters llama.cpp reads for `arch` (its converter's keys for each family)."""
    text = config.get("text_config") or config
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_rope_freq_base(float(hp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(hp["rms_eps"]))
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp["rope_dims"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    rope = text.get("rope_parameters") or {}
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(text.get("attn_logit_softcapping") or 0.0))
        w.add_final_logit_softcapping(float(text.get("final_logit_softcapping") or 0.0))
        w.add_sliding_window(int(text.get("sliding_window") or 0))
    elif arch == "gemma3":
        if text.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(text["final_logit_softcapping"]))
        if text.get("sliding_window_pattern") != 1 and text.get("sliding_window"):
            w.add_sliding_window(int(text["sliding_window"]))
    elif arch == "phi3":
        if rope.get("long_factor") or rope.get("rope_type") in ("longrope", "su", "yarn"):
            raise LlmsqueezeError("cannot export to gguf: this phi3 uses long-context rope scaling (rope_parameters "
                                  f"{rope.get('rope_type')!r}), whose factor tensors the exporter does not write yet")
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                            or text.get("original_max_position_embeddings") or hp["context_length"]))
        w.add_sliding_window(int(text.get("sliding_window") or 0))


def pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the BPE pre-tokenizer described by tokenizer.json's pre_tokenizer (its
    converter hashes a tokenization instead; this reads the structure, so a retrained vocabulary with the
    same splitting is recognised too). Unknown: a one-line refusal."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = [((p.get("pattern") or {}).get("Regex") or "") for p in parts if p.get("type") == "Split"]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if patterns and "\\p{N}{1,3}" in patterns[0] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in patterns[0]:
        return "llama-bpe"
    if patterns and "\\p{N}|" in patterns[0] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in patterns[0]:
        return "qwen2"
    raise LlmsqueezeError(f"gguf: the tokenizer's pre-tokenizer ({'+'.join(map(str, kinds)) or 'none'}) is not one "
                          "this exporter recognises (gpt-2, smollm, llama-bpe, qwen2); pass pre_tokenizer= with "
                          "llama.cpp's name for it")


def write_tokenizer(w, src: Path, vocab_size: int, pre: str | None = None, space_prefix: bool = True) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" model: tokens by id (gaps up to
    the model's vocab_size as unused [PAD{i}]), their types (control for special added tokens,
    user-defined for other added ones), merges, special token ids, add_bos/eos and the chat template.
    A SentencePiece model (tokenizer.model beside the weights: Llama 2, Gemma, Phi-3) as llama.cpp's
    "llama" model, read by the gguf package's SentencePieceVocab (pieces, scores, types)."""
    import gguf

    if (src / "tokenizer.model").is_file():
        return _write_sentencepiece(w, src, vocab_size, space_prefix)
    path = src / "tokenizer.json"
    if not path.is_file():
        raise LlmsqueezeError(f"gguf: {src} has no tokenizer.json; save the tokenizer with the checkpoint "
                              "(save_quantized(model, out, tokenizer))")
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LlmsqueezeError(f"gguf: the tokenizer is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}, "
                              f"a SentencePiece one: copy the original model's tokenizer.model into {src} (llama.cpp "
                              "reads its pieces and scores)")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((TOKEN_CONTROL if added[i].get("special") else TOKEN_USER) if i in added else TOKEN_NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or pre_tokenizer(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=n)
    special.add_to_gguf(w, quiet=True)
    if "bos" not in special.add_special_token:  # what the HF tokenizer does: a BOS first, or not
        w.add_add_bos_token(_adds_bos(src, special.special_token_ids.get("bos")))


def _write_sentencepiece(w, src: Path, vocab_size: int, space_prefix: bool) -> None:
    import gguf

    try:
        vocab = gguf.SentencePieceVocab(src)
    except ImportError:
        raise LlmsqueezeError("gguf: reading tokenizer.model needs the sentencepiece package: pip install sentencepiece") from None
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(toktype))
    for i in range(len(tokens), vocab_size):  # the model's rows past the tokenizer's pieces
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TOKEN_UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if not space_prefix:
        w.add_add_space_prefix(False)
    gguf.SpecialVocab(src, load_merges=False, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _adds_bos(src: Path, bos: int | None) -> bool:
    from transformers import AutoTokenizer

    if bos is None:
        return False
    ids = AutoTokenizer.from_pretrained(str(src)).encode("a")
    return bool(ids) and ids[0] == bos


def export(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, dense_type: str | None = None,
           type: str | None = None, pre_tokenizer_name: str | None = None, progress: bool = True) -> Path:
    """Write the llmsqueeze checkpoint `src` as the GGUF file `out` (a temp file renamed at the end).
    `type`: the GGML type or mix the caller expects (refused in one line if the checkpoint holds
    another); `dense_type`: the embeddings' and an untied head's type instead of the mix's."""
    import gguf
    from tqdm import tqdm

    from ..models import GGUF_BLOCK_TENSORS, get_arch
    from .files import linear_shapes, read_config, skeleton, tensor_getter, tensor_index
    from .loader import check_checkpoint

    src = Path(src).expanduser()
    out = Path(out).expanduser().absolute()
    if out.exists() and (out.is_dir() or not overwrite):
        raise LlmsqueezeError(f"--out {out} {'is a directory' if out.is_dir() else 'exists'}; pass a new .gguf file "
                              f"path{'' if out.is_dir() else ' or --overwrite'}")
    if out.suffix != ".gguf":
        raise LlmsqueezeError(f"--out {out}: a GGUF file's name ends in .gguf")
    qc = check_checkpoint(src)
    if qc.get("source"):
        raise LlmsqueezeError(f"{src} is a {qc['source']['format']} checkpoint; export reads llmsqueeze checkpoints")
    if qc.get("sparsity") is not None or qc.get("layer_schemes"):
        raise LlmsqueezeError(f"cannot export {src} to gguf: it is {'pruned' if qc.get('sparsity') else 'mixed precision'}, "
                              "which GGUF's types do not store; quantize with --scheme gguf:<mix> instead")
    config = read_config(src)
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise LlmsqueezeError(f"cannot export {src} to gguf: model_type {model_type!r} is not written yet (written: "
                              f"{', '.join(ARCHS)})")
    ga = ARCHS[model_type]
    arch, permute = ga.name, ga.permute
    scheme = scheme_from_dict(qc["scheme"])
    kind = getattr(scheme, "type", "weight-only")
    if kind == "gguf":
        mix, layer_types = scheme.mix, dict(scheme.layer_types)
        if type is not None and type.lower() not in (scheme.mix, *set(layer_types.values())):
            raise LlmsqueezeError(f"--type {type}: {src} was quantized as {scheme.mix}; drop --type, or quantize "
                                  f"again with --scheme gguf:{type.lower()}")
    elif kind == "weight-only":
        mix = uniform_type(scheme, qc.get("method_args") or {})
        if type is not None and type.lower() != mix:
            raise LlmsqueezeError(f"--type {type}: {src} holds {scheme.bits}-bit {'sym' if scheme.sym else 'asym'} "
                                  f"weights, which are exactly {mix.upper()}; drop --type or quantize with --scheme gguf:{type.lower()}")
        layer_types = {}
    else:
        raise LlmsqueezeError(f"cannot export {src} to gguf: it holds {kind} weights ({scheme.to_dict().get('format', kind)}), "
                              "which GGUF's types do not store; quantize with --scheme gguf:<mix>")
    if dense_type is not None and dense_type not in ggml.TYPES and dense_type not in ggml.DENSE_TYPES:
        raise LlmsqueezeError(f"--dense-type {dense_type!r}: use one of {', '.join([*ggml.DENSE_TYPES, *ggml.TYPES])}")
    hp = hparams(config)
    keys = tensor_index(src)
    model, _ = skeleton(src)
    block_path = get_arch(model).blocks
    shapes = linear_shapes(model)
    n_layers = hp["block_count"]
    n_gqa = hp["head_count"] // hp["head_count_kv"]
    file_type = ggml.MIXES[mix].file_type
    get = tensor_getter(keys)

    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith((".blocks", ".qweight"))})
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
    try:
        w.add_type("model")
        w.add_name(config.get("_name_or_path") or config.get("_model_name_or_path") or src.name)
        write_hparams(w, arch, hp, config)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(w, src, hp["vocab_size"], pre_tokenizer_name, space_prefix=not arch.startswith("gemma"))
        names = [k for k in keys if not k.endswith(_LAYER_SUFFIXES) or k.rsplit(".", 1)[0] not in prefixes]
        for p in prefixes:
            names.append(p + ".weight")  # the quantized layer, written as its GGUF weight
        ordered = sorted(set(names), key=_file_order)
        for hf in tqdm(ordered, desc="gguf tensors", disable=not progress):
            g = gguf_name(hf, block_path, GGUF_BLOCK_TENSORS, ga)
            if g is None:
                if hf.endswith("rotary_emb.inv_freq"):
                    continue
                raise LlmsqueezeError(f"cannot export {src} to gguf: {hf} has no GGUF name in the {arch} layout")
            base = g.split(".")[-2] if g.startswith("blk.") else g.split(".")[0]
            perm = None
            if permute and base in ("attn_q", "attn_k") and g.endswith((".weight", ".bias")):
                heads = hp["head_count"] if base == "attn_q" else hp["head_count_kv"]
                perm = permute_rows(hp["head_dim"] * heads, heads)
            p = hf.rsplit(".", 1)[0]
            if p in prefixes and hf.endswith(".weight"):
                data, t = _quantized_rows(p, get, shapes[p][1], layer_types, scheme if kind == "weight-only" else None,
                                          mix)
                if perm is not None:
                    data = data[perm]
                w.add_tensor(g, data.numpy(), raw_dtype=gguf.GGMLQuantizationType(t.id))
                continue
            x = get(hf).float()
            if perm is not None:
                x = x[perm]
            if ga.norm_shift and hf.endswith("norm.weight"):  # gemma: HF computes (1 + w), llama.cpp w
                x = x + ga.norm_shift
            if x.dim() == 1 or base not in ("token_embd", "output"):
                w.add_tensor(g, x.numpy().astype(np.float32))  # norms, biases: F32 as llama.cpp keeps them
                continue
            role = base
            t_name = dense_type or ggml.mix_type(mix, role, 0, n_layers, x.shape[1], n_gqa, hp["tied"])
            _add_dense(w, g, x, t_name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        if out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


_LAYER_SUFFIXES = (".blocks", ".qweight", ".qzeros", ".scales", ".g_idx")


def _file_order(hf: str) -> tuple:
    """llama.cpp's converter's order: token_embd first, then the blocks in order, then the rest."""
    import re

    m = re.search(r"\.(\d+)\.", hf)
    if "embed_tokens" in hf:
        return (0, 0, hf)
    return (1, int(m.group(1)), hf) if m else (2, 0, hf)


def _quantized_rows(p: str, get, k: int, layer_types: dict, uniform: QuantScheme | None, mix: str):
    """The bytes [N, row_bytes] uint8 and the GGMLType of quantized layer p (K inputs)."""
    if uniform is None:
        t = ggml.get_type(layer_types[p])
        return get(f"{p}.blocks"), t
    from ..nn import QuantLinear

    qweight, scales, qzeros = get(f"{p}.qweight"), get(f"{p}.scales"), get(f"{p}.qzeros")
    n = scales.shape[1]
    if k % 32:
        raise LlmsqueezeError(f"cannot export to gguf: {p} has {k} inputs, not a multiple of GGML's block of 32")
    g = k if uniform.group_size == -1 else uniform.group_size
    layer = QuantLinear(k, n, uniform.bits, g, scale_dtype=scales.dtype, device="cpu")
    layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, scales
    q, scale, zero = layer.unpack()
    t = ggml.get_type(mix)
    check_exact(t.name, scale)
    codes, params = from_uniform(q, scale, zero, g, t.name)
    return ggml.pack(codes, t, params), t


def _add_dense(w, name: str, x: torch.Tensor, t_name: str) -> None:
    import gguf

    if t_name in ggml.DENSE_TYPES:
        dtype = {"f32": np.float32, "f16": np.float16}.get(t_name)
        if dtype is None:  # bf16
            w.add_tensor(name, x.to(torch.bfloat16).view(torch.int16).numpy(), raw_shape=tuple(x.shape),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, x.numpy().astype(dtype))
        return
    t = ggml.get_type(t_name)
    if x.shape[1] % t.block:
        raise LlmsqueezeError(f"gguf: {name} has rows of {x.shape[1]}, which {t.name}'s blocks of {t.block} do not divide; "
                              "pass --dense-type q8_0, f16 or f32")
    q, params = ggml.quantize(x, t)
    data = ggml.pack(q, t, params)
    w.add_tensor(name, data.numpy(), raw_dtype=gguf.GGMLQuantizationType(t.id))



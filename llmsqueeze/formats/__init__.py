"""Checkpoint formats: ours (native.py), and the peers' that we export to and import from.

  export:  llmsqueeze checkpoint ──► compressed-tensors pack-quantized | GPTQ (v1 or v2)
           (pruned checkpoints ──► compressed-tensors' sparse formats: ct_sparse.py)
  import:  GPTQ | AWQ (GEMM) | compressed-tensors pack-quantized ──► our QuantLinear, through our
           HfQuantizer: config.json's quantization_config is translated to ours (with a `source`
           entry), and transformers' loader converts each tensor on the way in (`weight_conversions`).

Modules: files.py reads a model dir (config, shard headers, tensor index, its Linears); writer.py
is the one way any checkpoint dir is written (temp dir renamed at the end, shards, index, side
files); native.py is our format (its config, writer and checks); loader.py verifies any checkpoint and
loads it through transformers (our HfQuantizer); peers.py is the table of peer formats and what
importing them shares; export.py writes ours as a peer's; one module per peer format (gptq.py, awq.py,
compressed_tensors.py; ct_sparse.py writes pruned checkpoints as compressed-tensors).

Adding a format: a module with the names below, and an entry in peers.FORMATS (and EXPORT_FORMATS if
written).
  import:  MARKER (the tensor that marks a quantized Linear), LAYER_TENSORS (every tensor such a
           Linear may have), REQUIRED (those it must have), IMPORTED_METHOD (our `method` for it),
           check_import(path, qc) (refuse before reading tensors), import_scheme(path, qc, keys,
           prefixes) -> (scheme dict, method_args, source entries, unsupported fields),
           finish_import(method_args, keys, prefixes, shapes, scheme) (what the tensors say),
           expected_shapes(scheme, n, k), ignored_on_import(source, method_args),
           weight_conversions(source, op), describe(source)
  export:  export_check(job), export_layer(name, QuantLinear, job) -> tensors, export_config(job),
           with job a writer.ExportJob
"""
from __future__ import annotations

from .export import export
from .loader import check_checkpoint, from_pretrained, register_with_transformers
from .peers import (
    EXPORT_FORMATS,
    FORMATS,
    IMPORT_METHODS,
    LAYER_TENSORS,
    describe_source,
    ignored_on_import,
    imported_config,
    weight_conversions,
)

__all__ = ["EXPORT_FORMATS", "FORMATS", "IMPORT_METHODS", "LAYER_TENSORS", "check_checkpoint", "describe_source",
           "export", "from_pretrained", "ignored_on_import", "imported_config", "register_with_transformers",
           "weight_conversions"]

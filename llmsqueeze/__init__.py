"""llmsqueeze: make Hugging Face causal LMs small and fast.

    import llmsqueeze
    model = llmsqueeze.quantize(model, llmsqueeze.QuantScheme(bits=4, group_size=128))
    llmsqueeze.save_quantized(model, "q4", tokenizer=tok)
    llmsqueeze.quantize_lazy("org/model-70b", "q4", scheme)   # one block in memory; resume=True after a stop
    model = llmsqueeze.from_pretrained("q4")   # or transformers.AutoModelForCausalLM.from_pretrained("q4")
    llmsqueeze.export("q4", "compressed-tensors", "q4-ct")   # for vLLM; also "gptq"; GPTQ/AWQ/CT dirs load too
    llmsqueeze.finetune(llmsqueeze.from_pretrained("s24"), ids, steps=140)   # a pruned model, its mask held
"""
from .api import finetune, load_dense, prune, prune_during_finetune, quantize
from .config import CheckpointError, FloatScheme, GGUFScheme, LlmsqueezeError, QuantScheme, W8A8Scheme
from .formats import check_checkpoint, export, from_pretrained, register_with_transformers
from .formats.native import save_quantized
from .nn import LUTLinear, QuantLinear
from .nn_float import FloatLinear
from .nn_gguf import GGUFLinear
from .nn_int8 import Int8Linear
from .pipeline import quantize_lazy

__version__ = "0.1.0"

register_with_transformers()

__all__ = [
    "QuantScheme",
    "QuantLinear",
    "LUTLinear",
    "W8A8Scheme",
    "Int8Linear",
    "FloatScheme",
    "GGUFScheme",
    "FloatLinear",
    "GGUFLinear",
    "LlmsqueezeError",
    "CheckpointError",
    "quantize",
    "prune",
    "finetune",
    "prune_during_finetune",
    "quantize_lazy",
    "load_dense",
    "save_quantized",
    "from_pretrained",
    "check_checkpoint",
    "export",
    "register_with_transformers",
]

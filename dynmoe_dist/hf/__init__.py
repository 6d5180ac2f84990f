"""Hugging Face transformers models on ``MoELayer``: make an MoE model dynamic, upcycle a dense one, export either.

    from dynmoe_dist.hf import convert, upcycle, export
    model = convert(AutoModelForCausalLM.from_pretrained(path), router="top_any")   # Mixtral, Qwen-MoE, OLMoE, ...
    model = upcycle(AutoModelForCausalLM.from_pretrained(path), num_experts=8)      # Llama, Mistral, Qwen2, Qwen3
    export(model, "out")   # AutoModelForCausalLM.from_pretrained("out") loads it

Needs the ``[hf]`` extra (transformers, tokenizers); the core library never imports this package. Importing it
registers our own ``dynmoe_<family>`` model types with transformers' Auto classes (modeling.py). docs/HF.md has
the workflows.
"""

from __future__ import annotations

from ..extras import require_extra

require_extra("hf", "dynmoe_dist.hf")

from .block import BlockSpec, MoEBlock, moe_aux_loss, moe_blocks, shard  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .convert import convert  # noqa: E402
from .export import export  # noqa: E402
from .families import DENSE_FAMILIES, MOE_FAMILIES  # noqa: E402
from .modeling import register  # noqa: E402
from .upcycle import upcycle  # noqa: E402

register()

__all__ = [
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "BlockSpec",
    "MoEBlock",
    "calibrate",
    "convert",
    "export",
    "moe_aux_loss",
    "moe_blocks",
    "shard",
    "upcycle",
]

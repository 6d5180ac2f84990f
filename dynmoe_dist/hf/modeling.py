"""Our own ``model_type``s, registered with transformers' Auto classes when ``dynmoe_dist.hf`` is imported.

A model whose routing no family format can hold (Top-Any, top-p, DA-MoE, ReLU, null experts, or per-layer expert
counts) is exported as ``dynmoe_<family>``: the family's config and causal-LM class, subclassed, with a ``dynmoe``
entry in the config listing each ``MoEBlock``'s spec by layer. Building the class builds the family's model, then
puts an ``MoEBlock`` in each listed layer, so ``from_pretrained`` loads the exported weights by their own names and
``generate()`` runs as for the family.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from .block import BlockSpec, MoEBlock
from .families import FAMILIES, decoder_layers

PREFIX = "dynmoe_"
CONFIGS: dict[str, type] = {}
MODELS: dict[str, type] = {}


def base_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a family, as transformers' Auto classes name them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_cls = CONFIG_MAPPING[model_type]
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return config_cls, model_cls


def install_blocks(model, config) -> None:
    """Put an ``MoEBlock`` (single process, as exported) in every layer the config's ``dynmoe`` entry lists."""
    layers = decoder_layers(model)
    for index, spec in sorted(config.dynmoe["layers"].items(), key=lambda kv: int(kv[0])):
        i = int(index)
        # on the CPU even where transformers builds the model on the meta device (from_pretrained): the layer's
        # construction reads its own expert ids; the loaded weights replace these
        with torch.device("cpu"):
            layers[i].mlp = MoEBlock(BlockSpec.from_dict(spec), None, seed=i, name=f"layers.{i}.mlp")


def make_classes(model_type: str) -> tuple[type, type]:
    base_config, base_model = base_classes(model_type)
    name = "DynMoE" + base_model.__name__.removesuffix("ForCausalLM")

    def model_init(self, config) -> None:
        base_model.__init__(self, config)
        install_blocks(self, config)

    config_cls = type(name + "Config", (base_config,), {"model_type": PREFIX + model_type})
    model_cls = type(name + "ForCausalLM", (base_model,), {"config_class": config_cls, "__init__": model_init})
    config_cls.__module__ = model_cls.__module__ = __name__
    return config_cls, model_cls


def register() -> None:
    """Register ``dynmoe_<family>`` for every supported family (idempotent)."""
    for model_type in FAMILIES:
        if model_type in MODELS:
            continue
        config_cls, model_cls = make_classes(model_type)
        AutoConfig.register(PREFIX + model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        CONFIGS[model_type], MODELS[model_type] = config_cls, model_cls
        globals()[config_cls.__name__], globals()[model_cls.__name__] = config_cls, model_cls

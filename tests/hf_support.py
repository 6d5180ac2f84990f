"""Tiny random transformers models for the dynmoe_dist.hf oracles, built from configs and saved to a folder.

Nothing comes from a hub: each model is built from its config with a fixed seed, its routing made decisive (router
rows with a larger spread, a random DeepSeek-V3 selection bias, a random Qwen2-MoE shared-expert gate) so that a
wrong rule changes which experts a token takes, then ``save_pretrained`` into a folder and loaded back with
``local_files_only=True`` and transformers' eager experts, the reference every comparison is made against.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, D, HEADS = 128, 32, 4
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": D,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def config(family: str):
    """A tiny config of ``family``: d=32, 2 layers, 4 to 8 experts, vocabulary 128."""
    import transformers as tf

    moe = {"intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2}
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, **moe, shared_expert_intermediate_size=40, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, **moe, norm_topk_prob=True, head_dim=8)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": HEADS},
            intermediate_size=64,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        )
    dense = {"intermediate_size": 48}
    if family == "llama":
        return tf.LlamaConfig(**COMMON, **dense)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, **dense)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, **dense)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, **dense, head_dim=8)
    raise ValueError(family)


@torch.no_grad()
def decisive_routing(model) -> None:
    """Router rows spread wider than the 0.02 init, a random selection bias, a random shared-expert gate."""
    g = torch.Generator().manual_seed(7)
    for layer in model.model.layers:
        mlp = layer.mlp
        gate = getattr(mlp, "gate", None)
        if gate is not None and hasattr(gate, "weight"):
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.1)
        if getattr(mlp, "shared_expert_gate", None) is not None:
            mlp.shared_expert_gate.weight.copy_(torch.randn(mlp.shared_expert_gate.weight.shape, generator=g))


def save_tiny(family: str, folder: Path) -> Path:
    """Build, randomise (seed 0) and ``save_pretrained`` a tiny ``family`` model into ``folder``."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config(family))
    decisive_routing(model)
    model.save_pretrained(folder)
    return folder


def load(folder: Path, train: bool = False):
    """The saved model, fp32, with transformers' eager experts (the exact reference)."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, experts_implementation="eager", dtype=torch.float32
    )
    return model.train(train)


def tokens(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_and_embedding_grad(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d loss / d input embeddings) for a fixed random projection of the logits as the loss."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * weights).sum().backward()
    return logits.detach(), embeds.grad


def save_tokenizer(folder: Path, lines: list[str], vocab: int = VOCAB) -> int:
    """A BPE tokenizer of ``vocab`` tokens (characters it never saw are ``<unk>``) trained on ``lines``, saved into
    ``folder`` as ``PreTrainedTokenizerFast`` (what ``AutoTokenizer`` loads back); returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, limit_alphabet=40, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return len(fast)

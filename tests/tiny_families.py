"""Tiny random-init models of many transformers families, and the plain forward to check them by.

The tests that compare lora-dpo's scoring with each family's own forward build these in-process
(hidden 64, 2 layers, float32), so nothing touches the network.
"""

from __future__ import annotations

import torch

VOCAB = 832  # the demo tokenizer's 785 ids, rounded up to a multiple of 64
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
DROP = object()
"""An override that leaves a COMMON setting to the family's default (Gemma 4 sets head_dim per layer)."""
WINDOW = 8
MIXED = ["sliding_attention", "full_attention"]

# Sliding-window families of the installed transformers, each with a window shorter than the test
# sequences; where full and sliding layers can mix, one of each (the dict-of-masks path).
WINDOW_FAMILIES = {
    "mistral": dict(sliding_window=WINDOW),  # one mask for all layers
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "phi3": dict(sliding_window=WINDOW),
    "starcoder2": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # layer 0 full, 1 sliding
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(sliding_window=WINDOW, layer_types=MIXED, attn="eager"),  # no sdpa in Gemma 2
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=MIXED),
    "cohere2": dict(sliding_window=WINDOW, layer_types=MIXED),
    "olmo3": dict(sliding_window=WINDOW, layer_types=MIXED),
    "gpt_oss": dict(sliding_window=WINDOW, layer_types=MIXED, num_local_experts=4, num_experts_per_tok=2, attn="eager"),
    "gemma3n_text": dict(sliding_window=WINDOW, layer_types=MIXED, activation_sparsity_pattern=[0.0, 0.0],
                         num_kv_shared_layers=0, laurel_rank=8, altup_num_inputs=2, vocab_size_per_layer_input=VOCAB,
                         hidden_size_per_layer_input=16),
    "gemma4_text": dict(sliding_window=WINDOW, layer_types=MIXED, hidden_size_per_layer_input=0, head_dim=DROP),
    "exaone4": dict(sliding_window=WINDOW, layer_types=MIXED),
    "ministral": dict(sliding_window=WINDOW, layer_types=MIXED),
    # A window in the config that the family's sdpa/eager forward never applies (Moshi does this:
    # its window is for flash attention only): the masks must not apply it either.
    "llama": dict(sliding_window=WINDOW),
}


# The families hobbyists train (docs/training.md), as the architecture matrix of test_layouts.py
# builds them: label -> (model_type, overrides). Sliding windows shorter than the test sequences
# where the family has them, and logit transforms far from 1 where it scales or caps its logits.
ARCHITECTURES = {
    # Llama 3.2 and SmolLM: Llama with tied embeddings; Llama 3's rope scaling.
    "llama3/smollm": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2.5": ("qwen2", WINDOW_FAMILIES["qwen2"]),
    "qwen3": ("qwen3", WINDOW_FAMILIES["qwen3"]),
    "mistral": ("mistral", WINDOW_FAMILIES["mistral"]),
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, layer_types=MIXED, final_logit_softcapping=0.5)),
    "gemma3": ("gemma3_text", dict(WINDOW_FAMILIES["gemma3_text"], final_logit_softcapping=0.5)),
    "phi3/phi4": ("phi3", WINDOW_FAMILIES["phi3"]),
    "olmo2": ("olmo2", {}),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),  # learned absolute positions
    "granite": ("granite", dict(logits_scaling=8.0)),
    "cohere": ("cohere", dict(logit_scale=4.0)),
}


def tiny_model(model_type: str, seed: int = 0, attn: str | None = "sdpa", **overrides):
    """``attn`` None leaves the family's default kernel (recurrent models have no sdpa)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {key: value for key, value in {**COMMON, **overrides}.items() if value is not DROP}
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    kernel = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kernel).eval()


def plain_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The model's own forward on one unpadded sequence, full-vocabulary logits: sum log p(response)."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits.float()[0]
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[len(prompt) + i - 1, token] for i, token in enumerate(response))

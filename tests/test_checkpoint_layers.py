"""Partial gradient checkpointing (model.checkpoint_layers): which layers recompute, same gradients."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.batching import collate, pair_logps
from lora_dpo.data import DataReport, PreferenceExample, tokenize_examples
from lora_dpo.errors import ConfigError
from lora_dpo.modeling import checkpoint_first_layers, load_model

LAYERS = 4


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory):
    from lora_dpo.demo import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("llama4"), arch="llama", hidden_size=64, layers=LAYERS, seed=0)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, demo_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demo_rows)


@pytest.fixture(scope="module")
def batch(tokenizer, demo_rows):
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"t:{i}") for i, r in enumerate(demo_rows[:4])]
    return collate(tokenize_examples(examples, tokenizer, 128, 48, DataReport("t")), tokenizer.pad_token_id)


def train_step(model_dir, train_file, tmp_path, batch, *overrides):
    """One training-mode forward + backward through load_model's real 4-bit peft model.

    Returns how often each decoder layer's attention started and the LoRA gradients. A hook on the
    layer itself runs once even when the layer is recomputed (transformers checkpoints its forward,
    inside __call__), and one on a later submodule may miss the recompute (torch stops it as soon
    as the tensors backward needs are rebuilt), so the count is a pre-hook on the attention, early in the layer."""
    torch.manual_seed(0)
    model = load_model(make_config(model_dir, train_file, tmp_path / "out", "model.device=cpu", *overrides),
                       torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    with torch.no_grad():  # pair_logps' one-time check of the model, before the layers are counted
        pair_logps(model, batch)
    layers = model.get_base_model().get_decoder().layers
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    model.train()
    out = pair_logps(model, batch)
    (out.chosen.sum() - 2.0 * out.rejected.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return calls, grads


@pytest.mark.parametrize("overrides,expected", [
    ((), [2, 2, 2, 2]),
    (("model.checkpoint_layers=2",), [2, 2, 1, 1]),
    (("model.checkpoint_layers=0",), [1, 1, 1, 1]),
    (("model.checkpoint_layers=4",), [2, 2, 2, 2]),
    (("model.gradient_checkpointing=false",), [1, 1, 1, 1]),
])
def test_only_the_first_checkpoint_layers_are_recomputed(deep_llama_dir, train_file, tmp_path, batch, caplog,
                                                         overrides, expected):
    with caplog.at_level(logging.INFO, logger="lora_dpo.modeling"):
        calls, _ = train_step(deep_llama_dir, train_file, tmp_path, batch, *overrides)
    assert calls == expected
    if any(o.startswith("model.checkpoint_layers") for o in overrides):
        assert f"gradient checkpointing on {expected.count(2)} of {LAYERS} decoder layers" in caplog.text


def test_partial_checkpointing_gives_the_same_gradients(deep_llama_dir, train_file, tmp_path, batch):
    _, want = train_step(deep_llama_dir, train_file, tmp_path, batch)
    assert want and all("lora_" in name for name in want)
    assert len(want) == 2 * 7 * LAYERS  # A and B of every linear layer: all of them got a gradient
    assert any(grad.abs().max() > 1e-3 for grad in want.values())
    for overrides in (["model.checkpoint_layers=2"], ["model.gradient_checkpointing=false"]):
        _, grads = train_step(deep_llama_dir, train_file, tmp_path, batch, *overrides)
        assert grads.keys() == want.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, want[name], atol=1e-6, rtol=0), (overrides, name)


def test_more_checkpoint_layers_than_the_model_has(deep_llama_dir, train_file, tmp_path):
    config = make_config(deep_llama_dir, train_file, tmp_path / "out", "model.checkpoint_layers=5")
    with pytest.raises(ConfigError, match=rf"model.checkpoint_layers=5 but .* has {LAYERS} decoder layers. "
                                          rf"Fix: set it to at most {LAYERS}") as info:
        load_model(config, torch.device("cpu"))
    assert info.value.key == "model.checkpoint_layers"


@pytest.mark.parametrize("overrides,message", [
    (["model.checkpoint_layers=-1"], r"model.checkpoint_layers must be >= 0 or null \(got -1\)"),
    (["model.checkpoint_layers=2", "model.gradient_checkpointing=false"],
     "model.checkpoint_layers is set but model.gradient_checkpointing is false, .* "
     "Fix: set model.gradient_checkpointing=true, or remove model.checkpoint_layers"),
])
def test_bad_checkpoint_layers_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_config(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out", *overrides)
    assert info.value.key == "model.checkpoint_layers"


def test_models_without_checkpointing_layers_are_refused():
    class RemoteCode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def get_decoder(self):
            return self

    with pytest.raises(ConfigError, match="model.checkpoint_layers: not supported for remote"):
        checkpoint_first_layers(RemoteCode(), 1, "remote")


@pytest.mark.parametrize("overrides", [(), ("model.load_in_4bit=false",), ("model.gradient_checkpointing=false",)])
def test_backward_stops_at_the_first_layers_lora_weights(deep_llama_dir, train_file, tmp_path, batch, overrides):
    """transformers and peft hook the embeddings so their output requires grad (only reentrant
    checkpointing needs that); load_model removes the hook, so backward computes no gradient for the
    embeddings' output, while every LoRA weight, the first layer's included, still gets its gradient."""
    model = load_model(make_config(deep_llama_dir, train_file, tmp_path / "out", "model.device=cpu", *overrides),
                       torch.device("cpu"))
    with torch.no_grad():  # pair_logps' one-time check of the model, before the embeddings are watched
        pair_logps(model, batch)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
    model.train()
    out = pair_logps(model, batch)
    out.chosen.sum().backward()
    assert seen == [False]
    first = [p for name, p in model.named_parameters() if ".layers.0." in name and "lora_B" in name]
    assert first and all(p.grad is not None and p.grad.abs().max() > 0 for p in first)

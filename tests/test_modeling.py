"""The real QLoRA path on CPU: 4-bit base, LoRA via peft, reference by disabled adapters."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, write_jsonl

import lora_dpo.train as train_module
from lora_dpo.batching import collate, pair_logps
from lora_dpo.data import DataReport, PreferenceExample, tokenize_examples
from lora_dpo.losses import sigmoid_dpo_loss
from lora_dpo.modeling import load_model, reference_model


def pairs_for(tokenizer, rows):
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"t:{i}") for i, r in enumerate(rows)]
    return tokenize_examples(examples, tokenizer, 128, 48, DataReport("t"))


def load_plain_4bit(model_dir):
    """The base alone, quantized the same way, without peft."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_dpo.modeling import keep_cpu_4bit_trainable

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    keep_cpu_4bit_trainable(base)
    return base


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, demo_rows):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demo_rows)


@pytest.mark.parametrize("model_fixture", ["llama_dir", "qwen_dir"])
def test_model_is_4bit_with_only_lora_trainable(request, model_fixture, train_file, tmp_path):
    import bitsandbytes as bnb

    model_dir = request.getfixturevalue(model_fixture)
    model = load_model(make_config(model_dir, train_file, tmp_path / "out"), torch.device("cpu"))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * 2  # q k v o gate up down in each of the 2 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * len(four_bit)  # default target: every linear layer but the head


def test_reference_equals_the_base_model_and_init_loss_is_ln2(llama_dir, train_file, tokenizer, demo_rows, tmp_path):
    model = load_model(make_config(llama_dir, train_file, tmp_path / "out"), torch.device("cpu"))
    batch = collate(pairs_for(tokenizer, demo_rows[:4]), tokenizer.pad_token_id)
    # Give the adapter weights so "disabled" is distinguishable from "enabled".
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
        with reference_model(model):
            reference = pair_logps(model, batch)
        policy = pair_logps(model, batch)
        base = pair_logps(load_plain_4bit(llama_dir), batch)
    assert torch.allclose(reference.chosen, base.chosen, atol=1e-5)
    assert torch.allclose(reference.rejected, base.rejected, atol=1e-5)
    assert not torch.allclose(policy.chosen, base.chosen, atol=1e-3)

    fresh = load_model(make_config(llama_dir, train_file, tmp_path / "out"), torch.device("cpu"))
    with torch.no_grad(), reference_model(fresh):
        reference = pair_logps(fresh, batch)
    policy = pair_logps(fresh, batch)  # with grad, as in training: LoRA B = 0 so policy == reference
    result = sigmoid_dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=0.1)
    assert torch.allclose(result.losses, torch.full((4,), math.log(2.0)), atol=1e-6)
    assert torch.equal(result.chosen_rewards, torch.zeros(4)) and torch.equal(result.rejected_rewards, torch.zeros(4))


def test_training_changes_only_lora_weights_and_the_adapter_round_trips(llama_dir, train_file, tokenizer, demo_rows,
                                                                        tmp_path, monkeypatch):
    loaded = {}

    def recording_load_model(config, device):
        loaded["model"] = load_model(config, device)
        loaded["before"] = {k: v.clone() for k, v in loaded["model"].state_dict().items()}
        return loaded["model"]

    monkeypatch.setattr(train_module, "load_model", recording_load_model)
    out = tmp_path / "run"
    summary = train_module.train(make_config(llama_dir, train_file, out, "train.max_steps=3"), progress=False)
    assert summary.steps == 3
    model, before = loaded["model"], loaded["before"]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    # the quantized base (packed 4-bit data and its quantization state) is bit-for-bit unchanged
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)

    # Reload with plain peft onto a fresh 4-bit base: same log-probs as the trained model.
    from peft import PeftModel

    batch = collate(pairs_for(tokenizer, demo_rows[:4]), tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(load_plain_4bit(llama_dir), str(out))
    with torch.no_grad():
        expected = pair_logps(model, batch)
        got = pair_logps(reloaded, batch)
    assert torch.allclose(expected.chosen, got.chosen, atol=1e-5)
    assert torch.allclose(expected.rejected, got.rejected, atol=1e-5)


def test_init_adapter_is_start_and_reference(llama_dir, train_file, tokenizer, demo_rows, tmp_path):
    """Starting from an SFT adapter: the reference must be that adapter, not the bare base."""
    from peft import LoraConfig, get_peft_model

    sft_dir = tmp_path / "sft"
    sft = get_peft_model(load_plain_4bit(llama_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    sft.save_pretrained(sft_dir)

    model = load_model(make_config(llama_dir, train_file, tmp_path / "out", f"model.init_adapter={sft_dir}"),
                       torch.device("cpu"))
    batch = collate(pairs_for(tokenizer, demo_rows[:4]), tokenizer.pad_token_id)
    with torch.no_grad():
        with reference_model(model):
            reference = pair_logps(model, batch)
        start = pair_logps(model, batch)
        base = pair_logps(load_plain_4bit(llama_dir), batch)
    assert torch.allclose(reference.chosen, start.chosen, atol=1e-5)
    assert not torch.allclose(reference.chosen, base.chosen, atol=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    # after a reference pass the trained adapter is trainable again, the reference frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)

    with pytest.raises(Exception, match="holds no adapter_config.json"):
        load_model(make_config(llama_dir, train_file, tmp_path / "o", f"model.init_adapter={tmp_path}"),
                   torch.device("cpu"))


def test_sixteen_bit_base_also_trains(llama_dir, train_file, tmp_path):
    out = tmp_path / "run"
    summary = train_module.train(make_config(llama_dir, train_file, out, "model.load_in_4bit=false",
                                             "model.gradient_checkpointing=false"), progress=False)
    assert summary.steps == 3 and (out / "adapter_model.safetensors").is_file()


def test_model_loading_mistakes_are_config_errors(llama_dir, qwen_dir, train_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lora_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.target_modules=\['wq'\]: .*Fix: use all-linear"):
        load_model(make_config(llama_dir, train_file, tmp_path / "o", "lora.target_modules=[wq]"), torch.device("cpu"))
    wide = tmp_path / "wide"  # an adapter for a model of another width
    from lora_dpo.demo import build_demo_base

    other = build_demo_base(tmp_path / "other", hidden_size=128, layers=2)
    get_peft_model(load_plain_4bit(other), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(wide)
    with pytest.raises(ConfigError, match="model.init_adapter: .* does not fit"):
        load_model(make_config(llama_dir, train_file, tmp_path / "o", f"model.init_adapter={wide}"),
                   torch.device("cpu"))


def test_lora_settings_are_rejected_beside_init_adapter(llama_dir, train_file, tmp_path):
    from lora_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match="lora.r cannot be set with model.init_adapter"):
        make_config(llama_dir, train_file, tmp_path / "o", "lora.r=8", "model.init_adapter=x")

"""The real QLoRA path on CPU: 4-bit base, LoRA via peft, reference by disabled adapters; the one base
loader training, merging and inference share; the one no-grad scoring loop (score_pairs)."""

from __future__ import annotations

import math
import shutil

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

    def recording_load_model(config, device, **options):
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


# ---------------------------------------------------------------------------------------------
# score_pairs: the one no-grad scoring loop


@pytest.fixture(scope="module")
def scored_model(llama_dir, train_file):
    """The 4-bit training model with a non-zero adapter, so that switching it off changes the numbers."""
    model = load_model(make_config(llama_dir, train_file, llama_dir.parent / "unused"), torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def test_score_pairs_equals_pair_logps_in_the_order_of_the_pairs(scored_model, tokenizer, demo_rows):
    from lora_dpo.batching import score_pairs

    model = scored_model
    pairs = pairs_for(tokenizer, demo_rows[:10])
    pad = tokenizer.pad_token_id
    model.train()
    model.get_base_model().lm_head.eval()  # a module whose own mode differs from its parent's
    before = {name: module.training for name, module in model.named_modules()}
    score_pairs(model, pairs[:1], pad, micro_batch_size=1)  # the one-time head check runs its own forward first
    seen, progress = [], []
    hook = model.get_base_model().get_decoder().register_forward_hook(
        lambda module, *args: seen.append((module.training, torch.is_grad_enabled())))
    try:
        got = score_pairs(model, pairs, pad, micro_batch_size=3, chunk_size=16, progress=progress.append)
        reference = score_pairs(model, pairs, pad, micro_batch_size=4, reference=True)
    finally:
        hook.remove()
    assert seen == [(False, False)] * (4 + 3)  # eval mode, no grad, ceil(10 / 3) + ceil(10 / 4) passes
    assert progress == [3, 3, 3, 1]
    assert {name: module.training for name, module in model.named_modules()} == before

    model.eval()
    with torch.no_grad():
        want = [pair_logps(model, collate([pair], pad)) for pair in pairs]  # each pair alone, in order
        with model.disable_adapter():
            want_reference = pair_logps(model, collate(pairs, pad))  # all pairs in one batch
    model.train()
    assert got.chosen.dtype == torch.float32 and got.chosen_tokens.dtype == torch.long
    assert torch.allclose(got.chosen, torch.cat([w.chosen for w in want]), atol=1e-4, rtol=0)
    assert torch.allclose(got.rejected, torch.cat([w.rejected for w in want]), atol=1e-4, rtol=0)
    assert got.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]
    assert got.rejected_tokens.tolist() == [len(p.rejected_ids) for p in pairs]
    assert len({len(p.prompt_ids) + len(p.chosen_ids) for p in pairs}) > 3  # lengths differ, so order was at stake
    assert torch.allclose(reference.chosen, want_reference.chosen, atol=1e-4, rtol=0)
    assert torch.allclose(reference.rejected, want_reference.rejected, atol=1e-4, rtol=0)
    assert not torch.allclose(reference.chosen, got.chosen, atol=1e-2)  # the adapter really was off


def test_score_pairs_edge_cases(scored_model, llama_dir, tokenizer, demo_rows):
    from transformers import AutoModelForCausalLM

    from lora_dpo.batching import score_pairs

    empty = score_pairs(scored_model, [], tokenizer.pad_token_id, micro_batch_size=2)
    assert empty.chosen.shape == (0,) and empty.rejected_tokens.shape == (0,)
    with pytest.raises(ValueError, match="micro_batch_size"):
        score_pairs(scored_model, [], tokenizer.pad_token_id, micro_batch_size=0)
    plain = AutoModelForCausalLM.from_pretrained(llama_dir)
    pairs = pairs_for(tokenizer, demo_rows[:2])
    with pytest.raises(ValueError, match="reference=True needs a peft model"):
        score_pairs(plain, pairs, tokenizer.pad_token_id, micro_batch_size=2, reference=True)
    bf16 = score_pairs(plain, pairs, tokenizer.pad_token_id, micro_batch_size=2, compute_dtype=torch.bfloat16)
    fp32 = score_pairs(plain, pairs, tokenizer.pad_token_id, micro_batch_size=2)
    assert bf16.chosen.dtype == torch.float32 and not torch.equal(bf16.chosen, fp32.chosen)  # autocast ran
    assert torch.allclose(bf16.chosen, fp32.chosen, rtol=0.02)


# ---------------------------------------------------------------------------------------------
# One loader for training, merging and inference


@pytest.fixture(scope="module")
def adapter_run(llama_dir, train_file, tokenizer, tmp_path_factory):
    """A run directory as 4-bit training leaves it (random adapter, tokenizer, config.yaml)."""
    from peft import LoraConfig, get_peft_model

    from lora_dpo.config import save_config

    run = tmp_path_factory.mktemp("adapter-run") / "run"
    torch.manual_seed(0)
    model = get_peft_model(load_plain_4bit(llama_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                  init_lora_weights=False))
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    save_config(make_config(llama_dir, train_file, run, "model.load_in_4bit=true"), run / "config.yaml")
    return run


def test_training_loads_its_base_through_load_base_with_the_runs_kernel(llama_dir, train_file, tmp_path,
                                                                         monkeypatch):
    from lora_dpo import modeling
    from lora_dpo.errors import ConfigError

    calls = []
    real = modeling.load_base

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_base", recording)
    load_model(make_config(llama_dir, train_file, tmp_path / "o", "model.attn_implementation=eager"),
               torch.device("cpu"))
    assert calls[0]["attn_implementation"] == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation=flash_attention_2: .*Fix: install what it names"):
        load_model(make_config(llama_dir, train_file, tmp_path / "o", "model.attn_implementation=flash_attention_2"),
                   torch.device("cpu"))


def test_load_inference_model_loads_the_adapter_as_trained(adapter_run, llama_dir, tokenizer, demo_rows):
    import bitsandbytes as bnb

    from lora_dpo.batching import score_pairs
    from lora_dpo.modeling import load_inference_model

    loaded = load_inference_model(str(adapter_run), device="cpu")
    assert loaded.has_adapter and loaded.description == f"4-bit {llama_dir} + adapter {adapter_run}"
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()) == 7 * 2  # the run was 4-bit
    assert not loaded.model.training and loaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    explicit = load_inference_model(str(llama_dir), str(adapter_run), device="cpu")  # base named explicitly
    assert explicit.description == loaded.description

    pairs = pairs_for(tokenizer, demo_rows[:3])
    pad = tokenizer.pad_token_id
    with_adapter = score_pairs(loaded.model, pairs, pad, micro_batch_size=3)
    reference = score_pairs(loaded.model, pairs, pad, micro_batch_size=3, reference=True)
    base = score_pairs(load_plain_4bit(llama_dir), pairs, pad, micro_batch_size=3)
    assert torch.allclose(reference.chosen, base.chosen, atol=1e-5)  # adapter off = the 4-bit base
    assert torch.allclose(score_pairs(explicit.model, pairs, pad, micro_batch_size=3).chosen, with_adapter.chosen)
    assert not torch.allclose(with_adapter.chosen, base.chosen, atol=1e-2)

    plain = load_inference_model(str(llama_dir), device="cpu", dtype="bfloat16")  # a base or merged model
    assert not plain.has_adapter and plain.description == str(llama_dir)
    assert next(plain.model.parameters()).dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.model.modules())


def test_merge_ignores_the_runs_attention_kernel(adapter_run, tmp_path):
    """A run trained with flash-attention merges on a CPU without flash-attn."""
    import yaml

    from lora_dpo.merge import merge_adapter

    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["attn_implementation"] = "flash_attention_2"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = merge_adapter(run, tmp_path / "merged", verify=False)
    assert (tmp_path / "merged" / "model.safetensors").is_file() and result.trained_in_4bit

"""TR-DPO with LoRA: the reference is a second adapter on the 4-bit base, moved towards the trained
one every dpo.ref_sync_every steps by mixing the products B @ A, re-factorised at its rank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.batching import collate, pair_logps
from lora_dpo.checkpoint import checkpoint_step
from lora_dpo.config import load_config
from lora_dpo.errors import ConfigError
from lora_dpo.modeling import REFERENCE_ADAPTER, TRAINED_ADAPTER, load_model, reference_model
from lora_dpo.reference_sync import REFERENCE_FILE, _lora_layers, sync_reference
from lora_dpo.train import train


@pytest.fixture(scope="module")
def model(llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync")
    config = make_config(llama_dir, folder / "unused.jsonl", folder / "out", "model.device=cpu", "dpo.ref_sync_every=1")
    torch.manual_seed(0)
    model = load_model(config, torch.device("cpu"))
    return model.eval()


def _perturb(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{TRAINED_ADAPTER}." in name or f"lora_A.{TRAINED_ADAPTER}." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _delta(layer, adapter):
    return layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight


def _logps(model, batch, reference):
    with torch.no_grad(), (reference_model(model) if reference else torch.enable_grad()):
        out = pair_logps(model, batch)
    return torch.cat([out.chosen, out.rejected])


def test_the_reference_becomes_the_adapter_it_was_set_to(model, tokenizer, demo_rows):
    from lora_dpo.data import DataReport, PreferenceExample, tokenize_examples

    examples = [PreferenceExample(row["prompt"], row["chosen"], row["rejected"], f"row {i}")
                for i, row in enumerate(demo_rows[:3])]
    batch = collate(tokenize_examples(examples, tokenizer, 96, 48, DataReport("t")), tokenizer.pad_token_id)
    layers = _lora_layers(model)
    assert layers and all(REFERENCE_ADAPTER in layer.lora_A for layer in layers)
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
    start = _logps(model, batch, reference=False)
    assert torch.allclose(_logps(model, batch, reference=True), start, atol=1e-5)  # B = 0: both are the base

    # A soft update from B_ref = 0 is exact at the same rank: the reference is the adapter at half strength.
    _perturb(model, 1)
    policy = _logps(model, batch, reference=False)
    assert not torch.allclose(policy, start, atol=1e-2)
    assert sync_reference(model, 0.5) < 1e-6
    for layer in layers:
        assert torch.allclose(_delta(layer, REFERENCE_ADAPTER), 0.5 * _delta(layer, TRAINED_ADAPTER), atol=1e-6)
    with torch.no_grad():
        for layer in layers:  # the adapter it was set to: the trained one with B halved
            layer.lora_B[TRAINED_ADAPTER].weight.mul_(0.5)
        halved = _logps(model, batch, reference=False)
        for layer in layers:
            layer.lora_B[TRAINED_ADAPTER].weight.mul_(2.0)
    assert torch.allclose(_logps(model, batch, reference=True), halved, atol=1e-4)

    # A second soft update mixes rank r with rank r: the truncation is the best rank-r one (Eckart-Young).
    _perturb(model, 2)
    wanted = {id(layer): 0.5 * _delta(layer, TRAINED_ADAPTER) + 0.5 * _delta(layer, REFERENCE_ADAPTER)
              for layer in layers}
    error = sync_reference(model, 0.5)
    assert 0 < error < 1
    rank = layers[0].lora_A[REFERENCE_ADAPTER].weight.shape[0]
    worst = 0.0
    for layer in layers:
        mixed = wanted[id(layer)].double()
        singular = torch.linalg.svdvals(mixed)
        gap = torch.linalg.matrix_norm(_delta(layer, REFERENCE_ADAPTER).double() - mixed)
        assert gap.item() == pytest.approx(singular[rank:].square().sum().sqrt().item(), rel=1e-3, abs=1e-6)
        worst = max(worst, (gap / torch.linalg.matrix_norm(mixed)).item())
    assert error == pytest.approx(worst, rel=1e-3)

    # The hard update (alpha = 1) copies the matrices: the reference scores exactly as the policy.
    sync_reference(model, 1.0)
    assert torch.equal(_logps(model, batch, reference=True), _logps(model, batch, reference=False))


REQUIRED = ["model.name_or_path=m", "data.train_file=t.jsonl"]


@pytest.mark.parametrize("overrides,key,message", [
    (["dpo.ref_sync_every=8", "dpo.precompute_reference=true"], "dpo.ref_sync_every",
     "^command-line override: dpo.ref_sync_every and dpo.precompute_reference are incompatible: TR-DPO moves the reference"),
    (["dpo.ref_sync_every=8", "dpo.loss=simpo", "dpo.beta=2"], "dpo.ref_sync_every", "reads no reference"),
    (["dpo.ref_sync_alpha=0.5"], "dpo.ref_sync_alpha", "only read when dpo.ref_sync_every is above 0"),
    (["dpo.ref_sync_every=8", "dpo.ref_sync_alpha=0"], "dpo.ref_sync_alpha", r"must be in \(0, 1\]"),
    (["dpo.ref_sync_every=-1"], "dpo.ref_sync_every", "must be >= 0"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, REQUIRED + overrides)
    assert info.value.key == key and "\n" not in str(info.value)


def test_checkpoints_carry_the_moving_reference_and_a_resume_is_bit_exact(llama_dir, demo_rows, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", demo_rows[:8])
    settings = ["dpo.ref_sync_every=1", "dpo.ref_sync_alpha=0.5", "train.max_steps=4", "train.save_every=2",
                "train.micro_batch_size=2", "train.learning_rate=1e-2", "data.eval_fraction=0", "lora.dropout=0.1"]
    full = tmp_path / "full"
    train(make_config(llama_dir, train_file, full, *settings), progress=False)
    from safetensors.torch import load_file

    reference = load_file(str(full / "checkpoint-2" / REFERENCE_FILE))
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in reference.items())

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "summary.json").unlink()
    for path in resumed.iterdir():
        if (checkpoint_step(path) or 0) > 2:
            shutil.rmtree(path)
    train(make_config(llama_dir, train_file, resumed, *settings, "train.resume=always"), progress=False)

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "seconds", "peak_memory_gib")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(resumed) == rows(full)
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(REFERENCE_ADAPTER in key for key in a)  # the saved adapter is the trained one alone

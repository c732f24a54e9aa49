"""Precomputed reference log-probs: equal to the on-demand pass, reused from disk, keyed by what matters."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config
from lora_dpo.batching import collate, pair_logps
from lora_dpo.data import DataReport, PreferenceExample, TokenizedPair, tokenize_examples
from lora_dpo.modeling import load_model, reference_model, save_adapter
from lora_dpo.reference_cache import cache_path, reference_cache_key, reference_logps_for


@pytest.fixture(scope="module")
def pairs(tokenizer, demo_rows):
    examples = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(demo_rows[:10])]
    return tokenize_examples(examples, tokenizer, max_length=128, max_prompt_length=48, report=DataReport("demo"))


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    """A real 4-bit model with LoRA, as training loads it, and its config."""
    tmp = tmp_path_factory.mktemp("refcache")
    config = make_config(llama_dir, tmp / "train.jsonl", tmp / "out", "model.device=cpu")
    torch.manual_seed(0)
    model = load_model(config, torch.device("cpu"))
    with torch.no_grad():  # a non-zero adapter, so "adapter off" is a real difference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.train()
    return model, config


def _count_forwards(model, pairs):
    """Decoder calls from here on; pair_logps' one-time checks of the model are done first."""
    with torch.no_grad():
        pair_logps(model, collate(pairs[:2], 0, layout="prefix_shared"))
    calls = []
    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_cached_values_equal_on_demand_pass_and_are_reused(setup, pairs, tokenizer, tmp_path):
    model, config = setup
    pad = tokenizer.pad_token_id
    calls, handle = _count_forwards(model, pairs)
    try:
        table = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, micro_batch_size=3,
                                    layout="prefix_shared")
        assert len(calls) == 4  # 10 pairs in micro-batches of 3: one no-grad pass
        assert not table.from_cache and len(table) == len(pairs)
        assert model.training  # the pass restores train mode

        # The training loop's on-demand reference for a micro-batch, in its own order.
        indices = [7, 0, 4]
        batch = collate([pairs[i] for i in indices], pad)
        with torch.no_grad(), reference_model(model):
            want = pair_logps(model, batch)
        got = table.lookup(indices)
        assert torch.allclose(got.chosen, want.chosen, atol=1e-4, rtol=0)
        assert torch.allclose(got.rejected, want.rejected, atol=1e-4, rtol=0)
        assert got.chosen_tokens.tolist() == [len(pairs[i].chosen_ids) for i in indices]
        assert got.rejected_tokens.tolist() == want.rejected_tokens.tolist()
        with torch.no_grad():
            policy = pair_logps(model, batch)
        assert not torch.allclose(policy.chosen, want.chosen, atol=1e-3)  # it really is the adapter-off model

        # A second run with the same inputs reads the file and never calls the model.
        calls.clear()
        again = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, layout="prefix_shared")
        assert calls == [] and again.from_cache
        assert torch.equal(again.chosen, table.chosen) and torch.equal(again.rejected_tokens, table.rejected_tokens)
    finally:
        handle.remove()

    files = list(tmp_path.glob("reference-logps-*.safetensors"))
    assert files == [cache_path(tmp_path, table.key)]
    stored = load_file(str(files[0]))
    assert sorted(stored) == ["chosen", "chosen_tokens", "rejected", "rejected_tokens"]
    assert stored["chosen"].dtype == torch.float32 and stored["chosen"].shape == (len(pairs),)


def test_unreadable_or_mismatched_cache_is_recomputed(setup, pairs, tokenizer, tmp_path, caplog):
    model, config = setup
    pad = tokenizer.pad_token_id
    table = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, micro_batch_size=5)
    path = cache_path(tmp_path, table.key)
    path.write_bytes(path.read_bytes()[:40])  # a run killed mid-write by something other than us
    calls, handle = _count_forwards(model, pairs)
    try:
        with caplog.at_level(logging.WARNING, logger="lora_dpo.reference_cache"):
            again = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, micro_batch_size=5)
    finally:
        handle.remove()
    assert len(calls) == 2 and not again.from_cache
    assert "unreadable reference cache" in caplog.text
    assert torch.allclose(again.chosen, table.chosen, atol=1e-5)
    assert reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path).from_cache


def test_key_changes_with_data_and_settings(setup, llama_dir, pairs, tmp_path):
    model, config = setup
    base = reference_cache_key(config.model, torch.float32, pairs)
    assert base == reference_cache_key(config.model, torch.float32, [TokenizedPair(list(p.prompt_ids), list(p.chosen_ids),
                                                                                   list(p.rejected_ids)) for p in pairs])
    edited = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    edited[3] = TokenizedPair(pairs[3].prompt_ids[1:], pairs[3].chosen_ids, pairs[3].rejected_ids)  # e.g. shorter max_prompt_length
    moved = [TokenizedPair(p.prompt_ids + p.chosen_ids[:1], p.chosen_ids[1:], p.rejected_ids) for p in pairs]  # same tokens, other boundary
    keys = {
        "data": reference_cache_key(config.model, torch.float32, edited),
        "boundary": reference_cache_key(config.model, torch.float32, moved),
        "fewer pairs": reference_cache_key(config.model, torch.float32, pairs[:-1]),
        "dtype": reference_cache_key(config.model, torch.bfloat16, pairs),
    }
    keys["layout"] = reference_cache_key(config.model, torch.float32, pairs, layout="prefix_shared")
    keys["packed"] = reference_cache_key(config.model, torch.float32, pairs, layout="packed")
    keys["pack length"] = reference_cache_key(config.model, torch.float32, pairs, layout="packed", pack_length=256)
    keys["kernel"] = reference_cache_key(config.model, torch.float32, pairs, attn_implementation="eager")
    eager = make_config(llama_dir, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu", "model.attn_implementation=eager")
    assert reference_cache_key(eager.model, torch.float32, pairs) == keys["kernel"]  # configured or as loaded
    # The pack length only shapes packed rows; the padded layout ignores it, and so does the key.
    assert reference_cache_key(config.model, torch.float32, pairs, pack_length=256) == base
    for override in ("model.load_in_4bit=false", "model.double_quant=false", "model.revision=v2"):
        other = make_config(llama_dir, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu", override)
        keys[override] = reference_cache_key(other.model, torch.float32, pairs)

    # Another base directory, then the same one with a changed config and re-written weights.
    copy = shutil.copytree(llama_dir, tmp_path / "base-copy")
    for name in ("config.json", "model.safetensors"):
        os.utime(copy / name, ns=(os.stat(llama_dir / name).st_atime_ns, os.stat(llama_dir / name).st_mtime_ns))
    copied = make_config(copy, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu")
    keys["base path"] = copy_key = reference_cache_key(copied.model, torch.float32, pairs)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    keys["base config"] = reference_cache_key(copied.model, torch.float32, pairs)
    stat = os.stat(copy / "model.safetensors")
    os.utime(copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    keys["base weights"] = reference_cache_key(copied.model, torch.float32, pairs)

    # An init adapter, then the same adapter with different weights.
    adapter = tmp_path / "sft-adapter"
    save_adapter(model, adapter)
    with_adapter = make_config(llama_dir, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu",
                               f"model.init_adapter={adapter}")
    keys["init adapter"] = reference_cache_key(with_adapter.model, torch.float32, pairs)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    save_adapter(model, adapter)
    keys["adapter weights"] = reference_cache_key(with_adapter.model, torch.float32, pairs)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).sub_(1.0)

    assert '"rms_norm_eps": 1e-06' in (llama_dir / "config.json").read_text()
    assert all(len(key) == 64 for key in keys.values())
    assert len(set(keys.values()) | {base}) == len(keys) + 1, keys
    assert reference_cache_key(copied.model, torch.float32, pairs) != copy_key


def test_key_covers_the_model_directorys_code_with_trust_remote_code(llama_dir, pairs, tmp_path):
    """Remote modelling code runs from the model directory: editing it must not reuse a table."""
    copy = shutil.copytree(llama_dir, tmp_path / "remote-code-base")
    code = copy / "modeling_custom.py"
    code.write_text("SCALE = 1.0\n", encoding="utf-8")
    trusted = make_config(copy, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu", "model.trust_remote_code=true")
    untrusted = make_config(copy, tmp_path / "t.jsonl", tmp_path / "o", "model.device=cpu")
    def keys():
        return tuple(reference_cache_key(c.model, torch.float32, pairs) for c in (trusted, untrusted))

    before = keys()
    stat = os.stat(code)
    code.write_text("SCALE = 2.0\n", encoding="utf-8")  # same size and modification time: only the contents tell
    os.utime(code, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = keys()
    assert after[0] != before[0]
    assert after[1] == before[1]  # without trust_remote_code the directory's code never runs


def test_a_table_from_one_layout_is_not_reused_by_another(setup, pairs, tokenizer, tmp_path):
    model, config = setup
    pad = tokenizer.pad_token_id
    shared = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, micro_batch_size=5,
                                 layout="prefix_shared")
    padded = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, micro_batch_size=5)
    assert not padded.from_cache and padded.key != shared.key
    assert sorted(tmp_path.glob("reference-logps-*.safetensors")) == sorted([cache_path(tmp_path, shared.key),
                                                                             cache_path(tmp_path, padded.key)])
    assert torch.allclose(padded.chosen, shared.chosen, atol=1e-4)  # on this full-attention model they agree
    again = reference_logps_for(model, pairs, config.model, torch.float32, pad, tmp_path, layout="prefix_shared")
    assert again.from_cache and torch.equal(again.chosen, shared.chosen)

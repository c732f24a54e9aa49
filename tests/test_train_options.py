"""Training-loop options that must not change the result: precomputed reference, layouts,
length grouping — and the eval-mode reference pass."""

from __future__ import annotations

import json

import pytest
from conftest import make_config, write_jsonl

from lora_dpo.train import train

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm")


def train_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").open() if '"train"' in line]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, demo_rows):
    return write_jsonl(tmp_path_factory.mktemp("options") / "t.jsonl", demo_rows)


@pytest.fixture(scope="module")
def plain_run(llama_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    train(make_config(llama_dir, train_file, out, "train.max_steps=4", "train.gradient_accumulation_steps=2",
                      "data.eval_fraction=0"), progress=False)
    return train_rows(out)


@pytest.mark.parametrize("options", [
    ["dpo.precompute_reference=true"],
    ["data.layout=prefix_shared"],
    ["data.layout=packed_prefix_shared", "data.pack_length=256"],
    ["data.layout=packed", "dpo.precompute_reference=true"],
    ["model.compile=true", "data.layout=prefix_shared"],  # compiled decoder layers: the same numbers
], ids=lambda o: "+".join(o))
def test_options_give_the_plain_run(options, plain_run, llama_dir, train_file, tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "run"
    extra = [f"dpo.reference_cache_dir={tmp_path / 'cache'}"]
    config = make_config(llama_dir, train_file, out, "train.max_steps=4", "train.gradient_accumulation_steps=2",
                         "data.eval_fraction=0", *extra, *options)
    if "model.compile=true" in options:
        import torch
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
    train(config, progress=False)
    if "model.compile=true" in options:
        # The layers really ran compiled, within the raised recompile limit (no silent eager fallback).
        assert counters["stats"]["unique_graphs"] >= 1
        assert counters["frames"]["ok"] == counters["frames"]["total"]
    for got, want in zip(train_rows(out), plain_run, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)
    if "dpo.precompute_reference=true" in options:
        assert any("computed" in r.getMessage() and "saved to" in r.getMessage() for r in caplog.records)
        assert list((tmp_path / "cache").glob("reference-logps-*.safetensors"))
        caplog.clear()
        train(config, overwrite=True, progress=False)  # a second run (say, another beta) reuses the cache
        assert any("read from" in r.getMessage() for r in caplog.records)


def test_ld_dpo_with_a_precomputed_reference_gives_the_every_step_run(llama_dir, train_file, tmp_path):
    """LD-DPO's length-weighted reference sums depend on the pair alone, so they are precomputed and
    cached like the plain ones, under a key of their own."""
    common = ["train.max_steps=3", "data.eval_fraction=0", "dpo.ld_alpha=0.5"]
    cache = f"dpo.reference_cache_dir={tmp_path / 'cache'}"
    train(make_config(llama_dir, train_file, tmp_path / "every", *common), progress=False)
    train(make_config(llama_dir, train_file, tmp_path / "pre", *common, "dpo.precompute_reference=true", cache),
          progress=False)
    for got, want in zip(train_rows(tmp_path / "pre"), train_rows(tmp_path / "every"), strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)
    train(make_config(llama_dir, train_file, tmp_path / "plain", "train.max_steps=3", "data.eval_fraction=0",
                      "dpo.precompute_reference=true", cache), progress=False)
    assert len(list((tmp_path / "cache").glob("reference-logps-*.safetensors"))) == 2  # not the LD-DPO table
    # The weighted sums differ from the whole ones on these pairs (the responses differ in length).
    assert train_rows(tmp_path / "plain")[0]["logps/chosen"] != pytest.approx(train_rows(tmp_path / "pre")[0]["logps/chosen"])


def test_a_failing_compile_is_one_line_naming_the_setting(llama_dir, train_file, tmp_path, monkeypatch):
    """torch.compile fails at the first forward pass (no C++ compiler, no triton); the run says which
    setting to change instead of printing dynamo's page of traceback."""
    import torch

    from lora_dpo import modeling
    from lora_dpo.errors import LoraDpoError

    def no_compiler(graph, example_inputs):
        raise RuntimeError("C++ compiler not found")

    def compile_with_failing_backend(base, name):
        for layer in modeling.decoder_layers(base, name, "model.compile"):
            layer.compile(backend=no_compiler)

    monkeypatch.setattr(modeling, "compile_layers", compile_with_failing_backend)
    torch._dynamo.reset()
    config = make_config(llama_dir, train_file, tmp_path / "run", "model.compile=true", "data.eval_fraction=0")
    with pytest.raises(LoraDpoError) as info:
        train(config, progress=False)
    message = str(info.value)
    assert message.startswith("model.compile: torch.compile failed (BackendCompilerFailed: ")
    assert "C++ compiler not found" in message and message.endswith("Fix: set model.compile=false, or install what the "
                                                                      "message names (a C++ compiler for the CPU, "
                                                                      "triton for a GPU)")
    assert "\n" not in message


def test_length_grouping_reduces_padding_and_still_trains(llama_dir, train_file, tmp_path):
    grouped = tmp_path / "grouped"
    summary = train(make_config(llama_dir, train_file, grouped, "train.max_steps=4", "data.group_by_length=true",
                                "data.eval_fraction=0"), progress=False)
    rows = train_rows(grouped)
    assert summary.steps == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]

"""The phases of a run (setup_run, run_loop, finish_run) and training again with pieces already built."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.data import load_preference_data
from lora_dpo.errors import LoraDpoError
from lora_dpo.modeling import load_model, load_tokenizer
from lora_dpo.train import finish_run, run_loop, setup_run, train


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "seconds", "peak_memory_gib")}
            for line in (out / "metrics.jsonl").open()]


def test_the_phases_run_one_after_another(llama_dir, demo_rows, tmp_path):
    config = make_config(llama_dir, write_jsonl(tmp_path / "t.jsonl", demo_rows), tmp_path / "run", "train.max_steps=2")
    run = setup_run(config)
    assert (run.start_step, run.total_steps) == (0, 2) and not (tmp_path / "run" / "summary.json").exists()
    run_loop(run, progress=False)
    assert run.state["step"] == 2 and run.last_train["step"] == 2
    summary = finish_run(run)
    assert summary.steps == 2 and (tmp_path / "run" / "summary.json").is_file()


def test_a_loaded_model_and_tokenized_data_train_again_with_fresh_adapter_weights(llama_dir, demo_rows, tmp_path):
    """What a sweep does: one loaded 4-bit base and one tokenized data set for several trials. Each
    trial starts from fresh adapter weights, so the same settings give the same run twice."""
    train_file = write_jsonl(tmp_path / "t.jsonl", demo_rows)
    first = make_config(llama_dir, train_file, tmp_path / "a", "train.max_steps=3", "data.eval_fraction=0.125")
    tokenizer = load_tokenizer(first.model)
    data = load_preference_data(first.data, tokenizer, first.train.seed)
    model = load_model(first, torch.device("cpu"))
    train_file.unlink()  # the trials must not read the data again
    summaries = [train(make_config(llama_dir, train_file, tmp_path / name, "train.max_steps=3",
                                   "data.eval_fraction=0.125"),
                       progress=False, model=model, tokenizer=tokenizer, data=data) for name in ("a", "b")]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert rows(tmp_path / "a")[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # B is zero again: policy == reference
    assert all(s.steps == 3 and s.eval_pairs == len(data.eval) for s in summaries)

    with pytest.raises(LoraDpoError, match="the config asks for"):
        setup_run(make_config(llama_dir, train_file, tmp_path / "c", "lora.r=4"), model=model, tokenizer=tokenizer,
                  data=data)

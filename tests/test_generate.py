"""`lora-dpo generate`: base + adapter answers like the merged model, --compare shows the base's and
the adapter's answers, prompts are rendered as training rendered them, and sampling is seeded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_config, write_jsonl

from lora_dpo.cli import main

PROMPTS = ["Can you tell me about bread?", "Give me a tip about chess."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, llama_dir, tokenizer):
    """A run directory as training leaves it (adapter, tokenizer, config.yaml), with a random adapter
    (peft's init_lora_weights=False) so that it changes the model a lot."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_dpo.config import save_config

    run = tmp_path_factory.mktemp("gen") / "run"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    save_config(make_config(llama_dir, run / "unused.jsonl", run, "model.load_in_4bit=false"), run / "config.yaml")
    return run


@pytest.fixture(scope="module")
def merged_dir(adapter_dir):
    from lora_dpo.merge import merge_adapter

    out = adapter_dir.parent / "merged"
    merge_adapter(adapter_dir, out, verify=False)
    return out


def answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_adapter_compare_and_merged_model_agree(adapter_dir, merged_dir, llama_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    # Sampled, not greedy: the base answers of --compare repeat the base model's only if both use
    # the same random streams.
    sampled = ["--temperature", "1.0", "--max-new-tokens", "8", "--device", "cpu", "--seed", "3"]
    for name, model in (("adapter", adapter_dir), ("merged", merged_dir), ("base", llama_dir)):
        assert main(["generate", str(model), "--prompts", str(prompts), "--output", str(tmp_path / f"{name}.jsonl"), *sampled]) == 0
    assert main(["generate", str(adapter_dir), "--prompts", str(prompts), "--compare",
                 "--output", str(tmp_path / "compare.jsonl"), *sampled]) == 0
    printed = capsys.readouterr().out

    adapter = [row["response"] for row in answers(tmp_path / "adapter.jsonl")]
    merged = [row["response"] for row in answers(tmp_path / "merged.jsonl")]
    base = [row["response"] for row in answers(tmp_path / "base.jsonl")]
    compare = answers(tmp_path / "compare.jsonl")
    assert [row["prompt"] for row in compare] == PROMPTS
    assert adapter == merged
    assert [row["base"] for row in compare] == base  # --compare's base is the adapter switched off
    assert [row["adapter"] for row in compare] == adapter
    assert adapter != base
    assert "### prompt 2/2" in printed and "--- base" in printed and "--- adapter" in printed
    assert f"# 16-bit {llama_dir} + adapter {adapter_dir}" in printed


def test_prompts_render_as_in_training(tokenizer):
    from lora_dpo.data import encode_prompt
    from lora_dpo.errors import DataError

    chat = tokenizer.decode(encode_prompt(tokenizer, "Hi there", chat_template=True))
    assert chat == "<|bos|><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.decode(encode_prompt(tokenizer, messages, chat_template=True)) == (
        "<|bos|><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "Hi there", chat_template=False)) == "<|bos|>Hi there"
    with pytest.raises(DataError, match="chat templates are switched off"):
        encode_prompt(tokenizer, messages, chat_template=False)


def test_sampling_is_seeded_and_independent_of_the_batch(merged_dir, tmp_path):
    """Same --seed, same answers, whatever --batch-size. Several samples per prompt come back as
    lists, the first being the single-sample answer."""
    sampled = ["--temperature", "1.0", "--top-p", "1.0", "--top-k", "0", "--max-new-tokens", "12", "--device", "cpu"]
    prompts = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", "Why do people like owls?"]
    runs = {}
    for name, extra in (("b1", ["--batch-size", "1"]), ("b5", ["--batch-size", "5"]),
                        ("n3", ["--num-samples", "3", "--batch-size", "4"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(merged_dir), *prompts, *sampled, *extra, "--output", str(out)]) == 0
        runs[name] = [row["response"] for row in answers(out)]
    assert runs["b1"] == runs["b5"]
    assert all(isinstance(row, list) and len(row) == 3 for row in runs["n3"])
    assert [row[0] for row in runs["n3"]] == runs["b1"]  # sample 0 of each prompt is the single-sample answer
    assert all(len(set(row)) > 1 for row in runs["n3"])


def test_prompts_from_a_preference_file(merged_dir, demo_rows, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "pairs.jsonl", demo_rows[:2])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(merged_dir), "--prompts", str(rows), "--prompt", "Hello?", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    got = answers(out)
    assert [row["prompt"] for row in got] == ["Hello?"] + [row["prompt"] for row in demo_rows[:2]]
    assert all(isinstance(row["response"], str) for row in got)

    assert main(["generate", str(merged_dir), "--prompts", str(rows), "--prompt-column", "question"]) == 2
    assert ("pairs.jsonl:1: field 'question': missing (the row has prompt, chosen, rejected). Fix: add it, or set "
            "--prompt-column to the prompt's column (or pass --on-bad-row skip)") in capsys.readouterr().err
    assert main(["generate", str(merged_dir), "--prompts", str(rows), "--no-chat-template"]) == 2
    assert ("pairs.jsonl:1: the prompt is a list of chat messages but --no-chat-template was given"
            in capsys.readouterr().err)


def test_side_by_side_layout():
    from lora_dpo.generate import format_answers

    answers_ = {"base": "short", "adapter": "a much longer answer " * 6}
    wide = format_answers(answers_, width=100).splitlines()
    assert wide[0].split("|")[0].strip() == "base" and wide[0].split("|")[1].strip() == "adapter"
    assert all(len(line) <= 100 for line in wide) and len(wide) > 3
    assert all(line.index("|") == 49 for line in wide)
    assert format_answers(answers_, width=60) == f"--- base\nshort\n--- adapter\n{answers_['adapter']}"


def test_user_mistakes(merged_dir, llama_dir, tmp_path, capsys):
    cases = [
        (["--prompt", "Hi", "--compare"], "--compare needs an adapter directory"),
        ([], "no prompts. Fix: pass --prompt TEXT or --prompts FILE"),
        (["--prompt", "Hi", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--prompt", "Hi", "--num-samples", "2", "--temperature", "0"], "--num-samples 2: needs --temperature above 0"),
        (["--prompt", "Hi", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--prompt", "Hi", "--stop", ""], "--stop '': a stop string must be non-empty text"),
        (["--prompt", "Hi", "--base", str(llama_dir)], "--base applies to adapter directories"),
        (["--prompts", str(tmp_path / "nope.txt")], "nope.txt: file not found"),
        (["--prompt", "Hi", "--output", str(tmp_path / "no" / "out.jsonl")], "does not exist. Fix: create it"),
    ]
    for extra, message in cases:
        assert main(["generate", str(merged_dir), *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_output_that_is_a_directory_is_refused_before_loading(merged_dir, tmp_path, monkeypatch, capsys):
    from lora_dpo import generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(generate, "load_generator", no_loading)
    assert main(["generate", str(merged_dir), "--prompt", "Hi", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"lora-dpo: error: --output {tmp_path} is a directory. "
                                               f"Fix: give a file path, e.g. {tmp_path / 'answers.jsonl'}")


def test_errors_are_one_line_and_name_generates_fix(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["generate", str(empty), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1  # transformers' own error here spans five lines
    assert f"{empty}: cannot load the tokenizer from this directory (Couldn't instantiate" in err
    assert err.endswith("Fix: point at a model directory, a merged model, or an adapter directory")

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")  # Latin-1
    assert main(["generate", str(empty), "--prompts", str(prompts)]) == 2
    assert f"{prompts}: not UTF-8 text (byte 3). Fix: re-save the file as UTF-8" in capsys.readouterr().err


def test_interrupted_run_names_its_checkpoint(adapter_dir, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    shutil.copy(adapter_dir / "config.yaml", run / "config.yaml")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text('{"step": 5}')
    assert main(["generate", str(run), "--prompt", "Hi"]) == 2
    assert f"{run}: the run did not finish" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert f"+ adapter {checkpoint}" in capsys.readouterr().out


def test_model_directory_with_trainer_checkpoints_is_a_model(merged_dir, adapter_dir, tmp_path, capsys):
    """transformers' Trainer leaves checkpoint-STEP/trainer_state.json next to a finished model too."""
    model = tmp_path / "model"
    shutil.copytree(merged_dir, model)
    shutil.copy(adapter_dir / "config.yaml", model / "config.yaml")
    (model / "checkpoint-5").mkdir()
    (model / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert main(["generate", str(model), "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert f"# {model}" in capsys.readouterr().out


def test_compare_several_samples_and_skipped_rows(adapter_dir, llama_dir, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": ""}, {"prompt": PROMPTS[1]}])
    common = ["--prompts", str(rows), "--on-bad-row", "skip", "--num-samples", "2", "--temperature", "1.0",
              "--max-new-tokens", "6", "--device", "cpu", "--stop", "."]
    assert main(["generate", str(adapter_dir), "--compare", "--output", str(tmp_path / "compare.jsonl"), *common]) == 0
    captured = capsys.readouterr()
    assert f"{rows}: 2 prompts, 1 bad rows skipped (1 field 'prompt': is empty or whitespace only)" in captured.err
    assert "--- base 2/2" in captured.out and "--- adapter 2/2" in captured.out and "### prompt 2/2" in captured.out
    assert main(["generate", str(llama_dir), "--output", str(tmp_path / "base.jsonl"), *common]) == 0
    compare, base = answers(tmp_path / "compare.jsonl"), answers(tmp_path / "base.jsonl")
    assert [row["prompt"] for row in compare] == PROMPTS
    assert [row["base"] for row in compare] == [row["response"] for row in base]
    assert all(len(row["adapter"]) == 2 and not any("." in answer for answer in row["adapter"]) for row in compare)

"""End to end through the command line: the demo, the output layout, and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, write_jsonl

from lora_dpo.cli import main

DEMO = str(REPO / "configs" / "demo.yaml")


def demo_args(tmp_path, *extra):
    return [DEMO, f"model.name_or_path={tmp_path / 'base'}", f"output.dir={tmp_path / 'out'}",
            f"data.train_file={REPO / 'data/demo/train.jsonl'}", f"data.eval_file={REPO / 'data/demo/eval.jsonl'}", *extra]


def test_demo_reaches_its_held_out_accuracy(demo_run):
    """The shipped demo, as the README runs it (the ``demo_run`` fixture runs the README's block):
    the preference must generalise to unseen topics, and the tuned model's sampled answers must be
    kind ones."""
    from lora_dpo.demo import RUDE_BODIES, RUDE_CLOSERS, RUDE_OPENERS

    work, printed = demo_run
    out = work / "runs" / "demo" / "adapter"
    assert "held-out (64 pairs): preference accuracy" in printed
    evals = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"eval"' in line]
    assert evals[-1]["step"] == 60 and evals[-1]["rewards/accuracy"] >= 0.9
    assert evals[-1]["rewards/margins"] > 1.0
    tuned = [block.split("\n", 1)[1].split("\n\n")[0].strip() for block in printed.split("--- adapter")[1:]]
    assert len(tuned) == 3
    rude = [phrase.split("{")[0].strip() for phrase in RUDE_OPENERS + RUDE_BODIES + RUDE_CLOSERS]
    for answer in tuned:
        assert answer and not any(phrase and phrase in answer for phrase in rude), answer
    # The evaluation after training (eval: in configs/demo.yaml), judged by lora_dpo.demo:kindness.
    result = json.loads((out / "eval" / "eval.json").read_text())
    accuracy = result["metrics"]["held-out accuracy"]
    assert accuracy["policy"] > accuracy["reference"] and result["pairs"] == 64
    assert result["judge"] == "lora_dpo.demo:kindness" and result["win_rate"]["win_rate"] > 0.5
    assert "win rate of the tuned demo model over its base on 16 unseen prompts" in printed


def test_train_writes_the_documented_output_layout(tmp_path, capsys, demo_run):
    (tmp_path / "base").symlink_to(demo_run[0] / "runs" / "demo" / "base-model")  # pre-trained once per session
    assert main(["demo", *demo_args(tmp_path, "train.max_steps=4", "train.eval_every=2", "train.save_every=2",
                                    "train.micro_batch_size=2", "dpo.loss=sigmoid", "dpo.rpo_alpha=null",
                                    "eval.after_training=false"),
                 "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "config.yaml", "metrics.jsonl", "summary.json", "checkpoint-2/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 4 and resolved["dpo"]["beta"] == 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
                "logps/rejected", "grad_norm", "lr", "tokens_per_s", "peak_memory_gib"):
        assert all(isinstance(r[key], float) for r in train_rows), key
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA B starts at zero: policy == reference
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_eval"]["step"] == 4
    assert summary["rewards"].startswith("beta * log-ratio of policy to reference")

    # a finished run is never silently overwritten
    assert main(["train", *demo_args(tmp_path)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["train", *demo_args(tmp_path, "train.max_steps=1", "eval.after_training=false"), "--overwrite",
                 "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert not (out / "checkpoint-2").exists()


@pytest.mark.parametrize("extra,message", [
    (["train.lerning_rate=1"], "unknown key train.lerning_rate (did you mean train.learning_rate?)"),
    (["dpo.beta=-0.1"], "dpo.beta must be positive"),
    (["data.train_file=missing.jsonl"], "missing.jsonl: file not found"),
])
def test_user_errors_are_one_line_and_leave_no_output(tmp_path, capsys, extra, message):
    assert main(["train", *demo_args(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-dpo: error: ") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_row_error_names_file_line_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}])
    assert main(["train", *demo_args(tmp_path, f"data.train_file={data}")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: field 'rejected': missing" in err
    assert not (tmp_path / "out").exists()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *demo_args(tmp_path), f"model.name_or_path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the tokenizer" in err and "Fix:" in err


def test_gated_model_says_to_log_in(tmp_path, capsys, monkeypatch):
    """transformers raises a gated repository as a plain OSError; its text is all there is to go on
    (stand-in: the hub cannot be reached in tests)."""
    import transformers

    def gated(*args, **kwargs):
        raise OSError("You are trying to access a gated repo. Make sure to have access to it at "
                      "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct. 401 Client Error.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", gated)
    assert main(["train", *demo_args(tmp_path), "model.name_or_path=meta-llama/Meta-Llama-3-8B-Instruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "gated hub repository" in err and "hf auth login" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    assert main(["train", *demo_args(tmp_path)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_python_dash_m_and_config_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "config", DEMO, "train.max_steps=5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["max_steps"] == 5
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "config", DEMO, "train.max_stepz=5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "did you mean train.max_steps?" in result.stderr


def test_commands_ask_for_expandable_cuda_segments_unless_the_user_chose(monkeypatch, capsys):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # recorded, so the teardown restores the real value
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert main(["config", DEMO]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert main(["config", DEMO]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_train_without_arguments_asks_only_for_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("the following arguments are required: config"), last


@pytest.mark.parametrize("command, shown", [
    ("merge", ["where to merge and verify (default: cpu)", "(default: 5GB)", "(default: 16)"]),
    ("generate", ["where to run the model (default: auto)", "(default: 256)"]),
    ("train", ["YAML config file"]),
])
def test_every_command_help_shows_its_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for words in shown:
        assert words in text, words
    assert "(default: None)" not in text and "(default: False)" not in text

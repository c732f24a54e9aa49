"""`lora-dpo eval` and eval.after_training: every metric on hand-worked numbers, and the whole
evaluation of a tiny trained run with a module:function judge and with a tiny reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, make_config, write_jsonl

from lora_dpo.batching import PairLogps
from lora_dpo.cli import main
from lora_dpo.config import DPOSettings, EvalConfig
from lora_dpo.evaluation import (kl_per_answer, length_controlled_win_rate, preference_metrics, verdicts,
                                 wilson_interval, win_rate)

# ---------------------------------------------------------------------------------------------
# The numbers, by hand


def logps(chosen, rejected, chosen_tokens, rejected_tokens):
    return PairLogps(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(chosen_tokens),
                     torch.tensor(rejected_tokens))


def test_preference_metrics_by_hand():
    reference = logps([-10.0, -20.0, -30.0], [-12.0, -15.0, -30.0], [5, 10, 10], [4, 5, 20])
    policy = logps([-9.0, -21.0, -28.0], [-14.0, -16.0, -33.0], [5, 10, 10], [4, 5, 20])
    rows = preference_metrics(DPOSettings(beta=0.1), policy, reference)
    assert list(rows) == ["held-out accuracy", "margin", "logps/chosen", "logps/rejected", "change of logps/chosen",
                          "change of logps/rejected", "ranking accuracy (summed)", "ranking accuracy (per token)"]
    # DPO rewards 0.1 * (policy - reference): chosen 0.1, -0.1, 0.2; rejected -0.2, -0.1, -0.3.
    # Margins 0.3, 0.0, 0.5: the tie counts as wrong.
    assert rows["held-out accuracy"] == {"reference": 0.0, "policy": pytest.approx(2 / 3)}
    assert rows["margin"]["policy"] == pytest.approx(0.8 / 3)
    assert rows["margin"]["reference"] == 0.0
    assert rows["logps/chosen"] == {"reference": pytest.approx(-20.0), "policy": pytest.approx(-58 / 3)}
    assert rows["logps/rejected"] == {"reference": pytest.approx(-19.0), "policy": pytest.approx(-21.0)}
    assert rows["change of logps/chosen"] == {"reference": None, "policy": pytest.approx(2 / 3)}
    assert rows["change of logps/rejected"] == {"reference": None, "policy": pytest.approx(-2.0)}
    # summed: reference -10 > -12 yes, -20 > -15 no, -30 > -30 no (tie); policy yes, no, yes.
    assert rows["ranking accuracy (summed)"] == {"reference": pytest.approx(1 / 3), "policy": pytest.approx(2 / 3)}
    # per token: reference -2 > -3 yes, -2 > -3 yes, -3 > -1.5 no; policy -1.8 > -3.5 yes, -2.1 > -3.2 yes,
    # -2.8 > -1.65 no.
    assert rows["ranking accuracy (per token)"] == {"reference": pytest.approx(2 / 3), "policy": pytest.approx(2 / 3)}


def test_kl_verdicts_and_the_wilson_interval_by_hand():
    assert kl_per_answer(torch.tensor([-5.0, -8.0]), torch.tensor([-7.0, -7.0])) == pytest.approx(0.5)
    assert verdicts([3.0, 1.0, 2.0], [1.0, 1.0, 5.0]) == [1.0, 0.5, 0.0]
    # p = 0.75, n = 8, z = 1.96: centre (0.75 + 0.2401) / 1.4802 = 0.66890;
    # half 1.96 * sqrt(0.0234375 + 0.0150063) / 1.4802 = 0.25963.
    low, high = wilson_interval(0.75, 8, z=1.96)
    assert (low, high) == (pytest.approx(0.40927, abs=1e-4), pytest.approx(0.92852, abs=1e-4))
    # All wins on 8 prompts still leaves room: the lower end is n / (n + z^2) = 8 / 11.8416.
    assert wilson_interval(1.0, 8, z=1.96) == (pytest.approx(8 / 11.8416), 1.0)
    result = win_rate([2.0, 2.0, 0.0, 1.0], [1.0, 2.0, 1.0, 0.0], [0, 0, 1, 1], [10, 10, 10, 10], [10, 10, 10, 10])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["ci95"] == pytest.approx(list(wilson_interval(0.625, 2)))  # n counts prompts, not answers
    assert result["lc_win_rate"] == pytest.approx(0.625, abs=1e-6)  # no length difference: nothing to control


def test_length_controlled_win_rate_by_hand():
    # Two groups with opposite length differences, x = +-tanh(1): the fit is saturated,
    # sigmoid(a + b t) = 0.8 and sigmoid(a - b t) = 0.4, so a = (logit 0.8 + logit 0.4) / 2.
    verdict = [1, 1, 1, 1, 0] + [1, 1, 0, 0, 0]
    policy_lengths = [20] * 5 + [10] * 5
    reference_lengths = [10] * 5 + [20] * 5
    a = (math.log(0.8 / 0.2) + math.log(0.4 / 0.6)) / 2
    assert length_controlled_win_rate(verdict, policy_lengths, reference_lengths, ridge=0.0) == pytest.approx(
        1 / (1 + math.exp(-a)), abs=1e-6)
    # The default ridge on the length coefficient moves it by under 1e-3.
    assert length_controlled_win_rate(verdict, policy_lengths, reference_lengths) == pytest.approx(0.62020, abs=1e-3)
    # Longer answers winning more: the raw rate of 0.6 is above the length-controlled one.
    assert sum(verdict) / len(verdict) == 0.6
    # Perfect separation by length stays finite; a constant verdict is its own answer.
    assert 0 < length_controlled_win_rate([1, 1, 0, 0], [20, 20, 10, 10], [10, 10, 20, 20]) < 1
    assert length_controlled_win_rate([1, 1], [30, 5], [10, 10]) == 1.0


# ---------------------------------------------------------------------------------------------
# A tiny trained run, evaluated at the end of training and again from the command line

EVAL_SETTINGS = ["eval.prompts=3", "eval.samples=2", "eval.max_new_tokens=4", "eval.batch_size=6"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_dir, demo_rows):
    from lora_dpo.demo import EVAL_TOPICS, demo_pairs
    from lora_dpo.train import train

    root = tmp_path_factory.mktemp("evalrun")
    train_file = write_jsonl(root / "train.jsonl", demo_rows[:8])
    eval_file = write_jsonl(root / "eval.jsonl", demo_pairs(EVAL_TOPICS, 4, seed=4))
    config = make_config(llama_dir, train_file, root / "run", f"data.eval_file={eval_file}", "train.max_steps=1",
                         "model.load_in_4bit=false", "eval.after_training=true", "eval.judge=lora_dpo.demo:kindness", *EVAL_SETTINGS)
    train(config, progress=False)
    return root / "run"


def test_training_ends_with_the_evaluation(finished_run):
    from lora_dpo.demo import kindness
    from lora_dpo.generation import answer_seed

    result = json.loads((finished_run / "eval" / "eval.json").read_text())
    assert result["format"] == 1 and result["pairs"] == 4 and result["prompts"] == 3
    assert result["samples_per_prompt"] == 2 and result["judge"] == "lora_dpo.demo:kindness"
    names = list(result["metrics"])
    assert names[:3] == ["held-out accuracy", "margin", "logps/chosen"]
    assert names[-3:] == ["answer length (tokens)", "KL to reference (nats/answer)", "judge score (mean)"]
    lengths = result["metrics"]["answer length (tokens)"]
    assert 1 <= lengths["reference"] <= 4 and result["length_ratio"] == pytest.approx(lengths["policy"] / lengths["reference"])
    assert result["metrics"]["KL to reference (nats/answer)"] == {"reference": None, "policy": result["kl"]}
    rows = [json.loads(line) for line in (finished_run / "eval" / "samples.jsonl").open()]
    assert [(row["prompt_index"], row["sample"]) for row in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert [row["seed"] for row in rows] == [answer_seed(0, row["prompt_index"], row["sample"]) for row in rows]
    for row in rows:  # the judge scored each answer with its own prompt
        assert row["policy_score"] == kindness(row["prompt"], row["policy"])
        assert row["reference_score"] == kindness(row["prompt"], row["reference"])
    wins = result["win_rate"]
    assert wins["wins"] + wins["ties"] + wins["losses"] == 6
    assert wins["wins"] == sum(row["policy_score"] > row["reference_score"] for row in rows)
    assert wins["ci95"][0] <= wins["win_rate"] <= wins["ci95"][1]
    assert any("max_new_tokens" in warning for warning in result["warnings"])  # 4 tokens cut most answers
    # --overwrite clears the evaluation with the rest of the run.
    assert "eval" in json.loads((finished_run / ".lora-dpo-run").read_text())["files"]


def test_eval_command_with_a_reward_model_judge(finished_run, llama_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from lora_dpo.rewards import load_reward

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    config = AutoConfig.from_pretrained(llama_dir, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    out = tmp_path / "out"
    assert main(["eval", str(finished_run), "--judge", str(tmp_path / "judge"), "--prompts", "2", "--samples", "1",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and f"judged by {tmp_path / 'judge'}" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 2 and result["samples_per_prompt"] == 1  # flags over the run's eval section
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    judge = load_reward(str(tmp_path / "judge"), device="cpu")
    expected = judge.score([row["prompt"] for row in rows], [row["policy"] for row in rows])
    assert [row["policy_score"] for row in rows] == pytest.approx(expected, abs=1e-5)
    assert result["metrics"]["judge score (mean)"]["policy"] == pytest.approx(sum(expected) / 2, abs=1e-5)
    # The same settings and seeds: the reference's answers are those of the run evaluated at the end of training.
    first = [json.loads(line) for line in (finished_run / "eval" / "samples.jsonl").open()]
    assert rows[0]["reference"] == first[0]["reference"] and rows[0]["seed"] == first[0]["seed"]


# ---------------------------------------------------------------------------------------------
# Resuming: a killed evaluation continues to the outputs of an uninterrupted one


def resume_words(run_dir, out, *extra):
    """Three chunks of one prompt each (with CHUNK_BATCHES patched to 1: batch 2 // 2 samples)."""
    return ["eval", str(run_dir), "--judge", "lora_dpo.demo:kindness", "--prompts", "3", "--samples", "2",
            "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), "--no-progress", "--device", "cpu", *extra]


@pytest.fixture
def counted(monkeypatch):
    """Counts what the evaluation generates (the prompt indices of each ``sample`` call) and judges
    (each ``_judge`` call); ``kill["sample"]`` / ``kill["judge"]``: the call number to raise
    KeyboardInterrupt at (a Ctrl-C), counted from 1 since the last reset."""
    from lora_dpo import evaluation

    calls = {"sample": [], "judge": 0}
    kill = {"sample": None, "judge": None}
    real_sample, real_judge = evaluation.sample, evaluation._judge

    def sample(*args, **kwargs):
        calls["sample"].append(list(kwargs["prompt_indices"]))
        if len(calls["sample"]) == kill["sample"]:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    def judge(*args, **kwargs):
        calls["judge"] += 1
        if calls["judge"] == kill["judge"]:
            raise KeyboardInterrupt
        return real_judge(*args, **kwargs)

    monkeypatch.setattr(evaluation, "CHUNK_BATCHES", 1)
    monkeypatch.setattr(evaluation, "sample", sample)
    monkeypatch.setattr(evaluation, "_judge", judge)

    def reset(**at):
        calls.update(sample=[], judge=0)
        kill.update({"sample": None, "judge": None, **at})
        return calls

    return reset


@pytest.fixture(scope="module")
def uninterrupted(finished_run, tmp_path_factory):
    """The outputs of the resume tests' command run in one go (its own CHUNK_BATCHES patch)."""
    from lora_dpo import evaluation

    out = tmp_path_factory.mktemp("uninterrupted") / "eval"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "CHUNK_BATCHES", 1)
        assert main(resume_words(finished_run, out)) == 0
    return out


def outputs(out):
    return {name: (out / name).read_bytes() for name in ("eval.json", "samples.jsonl")}


def test_a_killed_evaluation_continues_to_the_outputs_of_an_uninterrupted_one(finished_run, uninterrupted, counted,
                                                                             tmp_path, capsys, caplog):
    out = tmp_path / "eval"
    # Killed in the second chunk's generation: the first prompt's answers are saved, nothing else.
    calls = counted(sample=3)
    assert main(resume_words(finished_run, out)) == 130
    assert calls["sample"] == [[0], [0], [1]] and calls["judge"] == 0
    assert not (out / "eval.json").exists() and not (out / "samples.jsonl").exists()
    saved = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(row["prompt_index"], row["sample"]) for row in saved] == [(0, 0), (0, 1)]
    # Killed again in the judging of the second chunk: all answers saved, the first prompt's scores.
    calls = counted(judge=3)
    with caplog.at_level("INFO"):
        assert main(resume_words(finished_run, out)) == 130
    assert "resuming" in caplog.text and "1 prompts done" in caplog.text
    assert calls["sample"] == [[1], [1], [2], [2]] and calls["judge"] == 3  # prompt 0 not answered again
    assert [json.loads(line)["prompt_index"] for line in (out / "scores.jsonl").read_text().splitlines()] == [0, 0]
    # The third run judges what is left, generates nothing, and writes what one run writes.
    calls = counted()
    capsys.readouterr()
    assert main(resume_words(finished_run, out)) == 0
    assert calls["sample"] == [] and calls["judge"] == 4  # prompts 1 and 2, reference and policy
    assert "held-out accuracy" in capsys.readouterr().out
    assert outputs(out) == outputs(uninterrupted)
    assert sorted(path.name for path in out.iterdir()) == ["eval.json", "samples.jsonl"]  # no stage files left


def test_other_settings_against_a_killed_evaluation_are_refused_until_overwrite(finished_run, uninterrupted, counted,
                                                                               tmp_path, capsys):
    out = tmp_path / "eval"
    counted(sample=3)
    assert main(resume_words(finished_run, out, "--seed", "1")) == 130
    before = (out / "answers.jsonl").read_bytes()
    capsys.readouterr()
    for flags, named in ((["--seed", "0"], "seed: 1 before, 0 now"), (["--seed", "1", "--top-k", "5"], "top_k: 0 before, 5 now"),
                         (["--seed", "1", "--judge", f"{tmp_path / 'no_judge.py'}:score"], None)):
        code = main(resume_words(finished_run, out, *flags))
        err = capsys.readouterr().err
        if named is None:  # a judge that does not import fails before the stage files are looked at
            assert code == 2 and "no_judge" in err
            continue
        assert code == 2 and err.count("\n") == 1 and named in err and "--overwrite" in err
        assert "answers.jsonl was started with other settings" in err
    assert (out / "answers.jsonl").read_bytes() == before  # refused: nothing touched
    # Another judge keeps the answers but not the scores: the judge stage names it.
    counted(judge=1)
    assert main(resume_words(finished_run, out, "--seed", "1")) == 130
    capsys.readouterr()
    (tmp_path / "other_judge.py").write_text("def score(prompt, answer):\n    return float(len(answer))\n")
    assert main(resume_words(finished_run, out, "--seed", "1", "--judge", f"{tmp_path / 'other_judge.py'}:score")) == 2
    err = capsys.readouterr().err
    assert "scores.jsonl was started with other settings (judge:" in err and err.count("\n") == 1
    # --overwrite starts again from the first prompt, and ends as an uninterrupted run does.
    calls = counted()
    assert main(resume_words(finished_run, out, "--overwrite")) == 0
    assert [indices[0] for indices in calls["sample"]] == [0, 0, 1, 1, 2, 2]
    assert outputs(out) == outputs(uninterrupted)


def test_a_chunk_left_half_written_is_worked_again_whole():
    """A chunk goes through the models whole (the same batches, so the same bits), its finished prompts
    not written twice: a kill between two prompts' writes of a chunk costs the whole chunk."""
    from lora_dpo.evaluation import _pending

    class Stage:
        def is_done(self, prompt):
            return prompt in {0, 1, 2, 4}

    assert _pending(Stage(), 7, 3) == [3, 4, 5, 6]


def test_eval_mistakes_are_one_line_and_write_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(finished_run), "--judge", "no_such_module:judge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-dpo: error: --judge no_such_module:judge: no module named") and err.count("\n") == 1
    assert not out.exists()
    assert main(["eval", str(finished_run), "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "none.jsonl" in capsys.readouterr().err and not out.exists()
    assert main(["eval", str(finished_run), "--judge", str(tmp_path / "no-judge"), "--out", str(out)]) == 2
    assert "no-judge: no such directory" in capsys.readouterr().err and not out.exists()
    assert main(["eval", str(tmp_path), "--out", str(out)]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_eval_settings_are_checked_by_name():
    from lora_dpo.config import load_config
    from lora_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.samples"):
        load_config(None, ["model.name_or_path=m", "data.train_file=f", "eval.temperature=0", "eval.samples=2"])
    with pytest.raises(ConfigError, match="unknown key eval.judges"):
        load_config(None, ["model.name_or_path=m", "data.train_file=f", "eval.judges=x"])
    assert EvalConfig().judge is None and not EvalConfig().after_training


# ---------------------------------------------------------------------------------------------
# The demo: from any directory, data checked first, a second run replaces the first


def test_demo_runs_from_any_directory_and_replaces_its_own_run(tmp_path, monkeypatch, capsys, caplog):
    from lora_dpo.demo import build_demo_base

    build_demo_base(tmp_path / "runs" / "demo" / "base-model", hidden_size=64, layers=2)  # skip the pre-training
    monkeypatch.chdir(tmp_path)  # not the repository: the demo finds its data from the package
    # No held-out pairs: the demo's evaluation after training is skipped, with a warning.
    quick = ["train.max_steps=1", "model.load_in_4bit=false", "train.micro_batch_size=1", "data.eval_file=null",
             "data.eval_fraction=0", "--no-progress"]
    assert main(["demo", *quick]) == 0
    run = tmp_path / "runs" / "demo" / "adapter"
    assert (run / "summary.json").is_file()
    assert json.loads((run / "summary.json").read_text())["data_files"]["train_file"]
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    with caplog.at_level("INFO"):
        assert main(["demo", *quick]) == 0
    assert "replacing the demo's earlier run in runs/demo/adapter" in caplog.text
    assert "the run held out no pairs" in caplog.text and not (run / "eval").exists()
    assert (run / "notes.txt").read_text() == "mine"  # nothing else is touched
    # A missing data file fails before the model is built (no pre-training, nothing left behind).
    assert main(["demo", f"data.train_file={tmp_path / 'missing.jsonl'}", "model.name_or_path=elsewhere"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert (REPO / "data" / "demo" / "train.jsonl").is_file()

"""lora-dpo sweep: the grid, one reference pass and one base for all trials, trials equal to lone
runs, a stopped sweep continuing to the same table, eval.json's win rate, Optuna, bad values."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import yaml
from conftest import write_jsonl

from lora_dpo import reference_cache, sweep as sweep_module, train as train_module
from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.errors import ConfigError, Interrupted, LoraDpoError
from lora_dpo.sweep import SharedPieces, grid_settings, plan_sweep, run_sweep

BETAS = "dpo.beta=0.05,0.1,0.3"
TIMING = ("tokens_per_s", "seconds", "peak_memory_gib")


@pytest.fixture(scope="module")
def setup(llama_dir, demo_rows, tmp_path_factory):
    """A config file of tiny settings (dropout on, so the trials' random streams count too)."""
    root = tmp_path_factory.mktemp("sweep")
    train_file = write_jsonl(root / "pairs.jsonl", demo_rows[:12])
    config = {"model": {"name_or_path": str(llama_dir), "load_in_4bit": False, "gradient_checkpointing": False},
              "lora": {"r": 4, "dropout": 0.1},
              "data": {"train_file": str(train_file), "eval_fraction": 0.25, "max_length": 64, "max_prompt_length": 24},
              "dpo": {"reference_cache_dir": str(root / "cache")},
              "train": {"micro_batch_size": 3, "gradient_accumulation_steps": 1, "max_steps": 2, "optim": "adamw",
                        "learning_rate": 1e-3, "eval_every": 0},
              "output": {"dir": str(root / "sweep")}}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return root, str(path)


def table(out):
    with (out / "sweep.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def metric_rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def finished(setup):
    """A 3-trial beta sweep, run once for the module, with the reference passes counted."""
    root, config_path = setup
    calls = []
    real = reference_cache.compute_reference_logps
    reference_cache.compute_reference_logps = lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    try:
        pieces = SharedPieces()
        sweep = plan_sweep(config_path, [BETAS], command=f"lora-dpo sweep {config_path} {BETAS}")
        rows = run_sweep(sweep, progress=False, pieces=pieces)
    finally:
        reference_cache.compute_reference_logps = real
    return sweep, rows, pieces, calls


def test_the_grid_is_every_combination_first_key_slowest(setup):
    _, config_path = setup
    sweep = plan_sweep(config_path, [BETAS, "train.learning_rate=5e-6,2e-5", "lora.target_modules=[q_proj,v_proj],all-linear",
                                     "dpo.loss=sigmoid,ipo", "train.max_steps=2"])
    settings = grid_settings(sweep.axes)
    assert len(settings) == 3 * 2 * 2 * 2
    assert settings[:3] == [
        {"dpo.beta": "0.05", "train.learning_rate": "5e-6", "lora.target_modules": "[q_proj,v_proj]", "dpo.loss": "sigmoid"},
        {"dpo.beta": "0.05", "train.learning_rate": "5e-6", "lora.target_modules": "[q_proj,v_proj]", "dpo.loss": "ipo"},
        {"dpo.beta": "0.05", "train.learning_rate": "5e-6", "lora.target_modules": "all-linear", "dpo.loss": "sigmoid"}]
    assert settings[-1]["dpo.beta"] == "0.3" and settings[-1]["train.learning_rate"] == "2e-5"
    config = sweep.trial_config("trial-005", settings[5])
    assert (config.dpo.beta, config.train.learning_rate, config.lora.target_modules) == (0.05, 2e-5, ["q_proj", "v_proj"])
    assert config.train.max_steps == 2 and config.train.resume == "auto" and config.dpo.precompute_reference
    assert config.output.dir.endswith("sweep/trial-005")
    # The config's own setting of precompute_reference wins over the sweep's default.
    assert not plan_sweep(config_path, [BETAS, "dpo.precompute_reference=false"]).trial_config(
        "trial-000", settings[0]).dpo.precompute_reference


def test_bad_values_fail_before_anything_loads_naming_key_and_value(setup, monkeypatch, capsys):
    _, config_path = setup
    monkeypatch.setattr("lora_dpo.modeling.load_model", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"sweep value dpo\.beta=-1: command-line override: dpo\.beta must be positive"):
        plan_sweep(config_path, ["dpo.beta=0.1,-1"])
    with pytest.raises(ConfigError, match=r"sweep value dpo\.loss=dpo: .*must be one of sigmoid"):
        plan_sweep(config_path, ["dpo.loss=sigmoid,dpo"])
    # Each value is fine alone; one combination is not.
    with pytest.raises(ConfigError, match=r"sweep trial dpo\.loss=ipo dpo\.label_smoothing=0\.1: .*dpo\.label_smoothing "
                       "belongs to the sigmoid"):
        plan_sweep(config_path, ["dpo.loss=sigmoid,ipo", "dpo.label_smoothing=0,0.1"])
    with pytest.raises(ConfigError, match="a range needs --search optuna"):
        plan_sweep(config_path, ["train.learning_rate=1e-6:1e-4:log"])
    assert main(["sweep", config_path, "dpo.beta=0.1,-1", "train.learning_rate=1e-4,oops"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lora-dpo: error: sweep value dpo.beta=-1: command-line override: dpo.beta must be positive (got -1.0)"


def test_three_trials_share_one_reference_pass_one_base_and_one_data_read(finished):
    sweep, rows, pieces, calls = finished
    eval_pairs = json.loads((sweep.out / "trial-000" / "summary.json").read_text())["eval_pairs"]
    assert sorted(calls) == sorted([12 - eval_pairs, eval_pairs])  # one pass per split, for all three trials
    assert (pieces.loads, pieces.data_reads) == (1, 1)
    assert [row["trial"] for row in rows] == ["trial-000", "trial-001", "trial-002"]
    assert [row["dpo.beta"] for row in table(sweep.out)] == ["0.05", "0.1", "0.3"]
    for row in rows:
        trial = sweep.out / row["trial"]
        assert {"config.yaml", "metrics.jsonl", "adapter_model.safetensors", "summary.json"} <= {p.name for p in trial.iterdir()}
        assert load_config(trial / "config.yaml").dpo.beta == float(row["dpo.beta"])
        assert row["metric"] == row["eval_loss"] == json.loads((trial / "summary.json").read_text())["final_eval"]["loss"]
    best = min(rows, key=lambda row: row["metric"])
    markdown = (sweep.out / "sweep.md").read_text()
    assert f"Best: **{best['trial']}** (dpo.beta={best['dpo.beta']})" in markdown
    assert f"lora-dpo generate {sweep.out / best['trial']}" in markdown and "![loss against each swept key](sweep.png)" in markdown
    assert (sweep.out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_trial_equals_a_lone_train_run_with_the_same_overrides(setup, finished, tmp_path):
    _, config_path = setup
    sweep = finished[0]
    alone = load_config(config_path, ["dpo.beta=0.3", "dpo.precompute_reference=true", f"output.dir={tmp_path / 'alone'}"])
    train_module.train(alone, progress=False)
    assert metric_rows(tmp_path / "alone") == metric_rows(sweep.out / "trial-002")


def test_a_sweep_stopped_mid_trial_continues_to_the_same_table(setup, finished, monkeypatch):
    root, config_path = setup
    real_step = train_module.train_step

    def stop_in_second_trial(run, step):
        row = real_step(run, step)
        if run.out.name == "trial-001" and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster's preemption sends
        return row

    monkeypatch.setattr(train_module, "train_step", stop_in_second_trial)
    overrides = ["dpo.beta=0.05,0.1", f"output.dir={root / 'stopped'}"]
    with pytest.raises(Interrupted, match="Continue the sweep with the same command"):
        run_sweep(plan_sweep(config_path, overrides), progress=False)
    out = root / "stopped"
    assert (out / "trial-000" / "summary.json").is_file() and (out / "trial-001" / "checkpoint-1").is_dir()
    assert not (out / "trial-001" / "summary.json").exists()
    monkeypatch.setattr(train_module, "train_step", real_step)
    run_sweep(plan_sweep(config_path, overrides), progress=False)
    assert json.loads((out / "trial-001" / "summary.json").read_text())["resumed_from_step"] == 1
    assert table(out) == table(finished[0].out)[:2]
    # Once finished, the same command trains nothing and loads nothing.
    pieces = SharedPieces()
    run_sweep(plan_sweep(config_path, overrides), progress=False, pieces=pieces)
    assert (pieces.loads, pieces.data_reads) == (0, 0)


def test_the_win_rate_of_eval_json_ranks_the_trials(setup, finished, monkeypatch, capsys):
    _, config_path = setup
    out = finished[0].out
    judged = {"trial-000": 0.41, "trial-002": 0.58}
    for name, win_rate in judged.items():
        (out / name / "eval").mkdir(exist_ok=True)
        (out / name / "eval" / "eval.json").write_text(json.dumps(
            {"win_rate": {"win_rate": win_rate, "ci_low": 0.3, "ci_high": 0.7, "n": 64}, "kl": 0.12,
             "length_ratio": 1.08}))
    # The trials are finished: the command only reads them again.
    monkeypatch.setattr("lora_dpo.modeling.load_model", lambda *a: pytest.fail("loaded a model"))
    assert main(["sweep", config_path, BETAS, "--metric", "win_rate", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"best: trial-002 (dpo.beta=0.3), win_rate 0.58; adapter in {out / 'trial-002'}")
    rows_csv = table(out)
    assert [row["win_rate"] for row in rows_csv] == ["0.41", "", "0.58"]
    assert rows_csv[0]["metric (win_rate)"] == "0.41" and rows_csv[0]["kl"] == "0.12"
    assert rows_csv[0]["length_ratio"] == "1.08" and rows_csv[1]["win_rate"] == ""
    assert "Best: **trial-002** (dpo.beta=0.3), win_rate 0.58" in (out / "sweep.md").read_text()


def test_optuna_searches_ranges_and_continues(setup, monkeypatch):
    pytest.importorskip("optuna")
    root, config_path = setup
    overrides = ["train.learning_rate=1e-4:1e-2:log", "dpo.beta=0.1,0.3", "train.max_steps=1",
                 f"output.dir={root / 'optuna'}"]
    sweep = plan_sweep(config_path, overrides, search="optuna", trials=2)
    rows = run_sweep(sweep, progress=False)
    assert [row["trial"] for row in rows] == ["trial-000", "trial-001"]
    for row in rows:
        assert 1e-4 <= float(row["train.learning_rate"]) <= 1e-2 and row["dpo.beta"] in ("0.1", "0.3")
        assert load_config(root / "optuna" / row["trial"] / "config.yaml").train.learning_rate == float(
            row["train.learning_rate"])
        assert row["status"] in ("finished", "pruned")
    pieces = SharedPieces()
    assert len(run_sweep(plan_sweep(config_path, overrides, search="optuna", trials=2), progress=False,
                         pieces=pieces)) == 2
    assert pieces.loads == 0
    with pytest.raises(Exception, match="holds another sweep"):
        run_sweep(plan_sweep(config_path, overrides[1:], search="optuna", trials=2), progress=False)


def test_the_sweep_modules_load_no_optional_dependency():
    assert "optuna" not in sweep_module.__dict__ and "matplotlib" not in sweep_module.__dict__


def test_a_failed_trial_is_the_trials_result_and_the_sweep_goes_on(setup, monkeypatch):
    root, config_path = setup

    def diverge(config, *args, **kwargs):
        raise LoraDpoError(f"stopped at step 1: 5 steps in a row had a non-finite loss ({config.dpo.beta})")

    monkeypatch.setattr(train_module, "train", diverge)
    rows = run_sweep(plan_sweep(config_path, ["dpo.beta=0.05,0.1", f"output.dir={root / 'failing'}"]), progress=False)
    assert [(row["status"], row["error"]) for row in rows] == [
        ("failed", "stopped at step 1: 5 steps in a row had a non-finite loss (0.05)"),
        ("failed", "stopped at step 1: 5 steps in a row had a non-finite loss (0.1)")]
    markdown = (root / "failing" / "sweep.md").read_text()
    assert "trial-001 failed: stopped at step 1" in markdown and "No finished trial has a loss yet." in markdown


def test_an_optuna_trial_stopped_mid_way_resumes_with_its_parameters(setup, monkeypatch):
    pytest.importorskip("optuna")
    root, config_path = setup
    real_step = train_module.train_step

    def stop_at_first_step(run, step):
        row = real_step(run, step)
        if step == 1 and not (run.out / "checkpoint-1").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(train_module, "train_step", stop_at_first_step)
    overrides = ["train.learning_rate=1e-4:1e-2:log", f"output.dir={root / 'optuna-stopped'}"]
    with pytest.raises(Interrupted):
        run_sweep(plan_sweep(config_path, overrides, search="optuna", trials=1), progress=False)
    trial = root / "optuna-stopped" / "trial-000"
    asked = load_config(trial / "config.yaml").train.learning_rate
    (row,) = run_sweep(plan_sweep(config_path, overrides, search="optuna", trials=1), progress=False)
    assert (row["trial"], row["status"], float(row["train.learning_rate"])) == ("trial-000", "finished", asked)
    assert json.loads((trial / "summary.json").read_text())["resumed_from_step"] == 1

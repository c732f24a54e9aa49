"""The end-of-run report (plots, report.md, report.html), its warnings, the data audit, periodic
samples (train.sample_every) and experiment tracking (output.report_to)."""

from __future__ import annotations

import base64
import json
import re
import struct

import pytest
from conftest import make_config, write_jsonl

from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.data import data_audit, length_histogram, read_preference_examples, tokenize_preference_data
from lora_dpo.errors import ConfigError, LoraDpoError
from lora_dpo.report import read_run, run_warnings, write_report
from lora_dpo.run_samples import keep_until
from lora_dpo.tracking import check_trackers, scalars
from lora_dpo.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run_dir(llama_dir, demo_rows, tmp_path_factory):
    """One real run: 3 steps, evaluations at 2 and 3, samples at 0, 2 and 3, TensorBoard on."""
    tmp = tmp_path_factory.mktemp("report")
    config = make_config(llama_dir, write_jsonl(tmp / "t.jsonl", demo_rows), tmp / "run", "train.max_steps=3",
                         "train.eval_every=2", "data.eval_fraction=0.125", "train.sample_every=2",
                         "train.sample_prompts=2", "train.sample_max_new_tokens=4", "output.report_to=[tensorboard]",
                         "output.report=true")
    train(config, progress=False)
    return tmp / "run"


def test_a_run_writes_its_report_with_valid_plots_embedded_in_the_html(run_dir):
    plots = sorted(path.name for path in (run_dir / "plots").glob("*.png"))
    assert plots == sorted(f"{name}.png" for name in ("loss", "accuracy", "margins", "rewards", "logps", "lr",
                                                        "grad_norm", "tokens_per_s", "memory", "lengths"))
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for name in plots:
        path = run_dir / "plots" / name
        width, height = png_size(path)
        assert width >= 400 and height >= 200 and path.stat().st_size > 5000, name
        assert base64.b64encode(path.read_bytes()).decode() in page, f"{name} is not embedded"
    # Offline: nothing is fetched from anywhere (no external src/href at all).
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "![loss](plots/loss.png)" in markdown and "## Data audit" in markdown
    metrics = lines(run_dir / "metrics.jsonl")
    last_eval = [row for row in metrics if row["split"] == "eval"][-1]
    assert "| metric | train, step 3 | held-out, step 2 | held-out, step 3 |" in markdown
    assert re.search(rf"\n\| loss \| [^\n]* \| {last_eval['loss']:.4g} \|\n", markdown)  # the final held-out loss
    assert "model:\n  name_or_path:" in markdown  # the resolved config
    assert "Finished: 3 steps on 12 pairs" in markdown


def test_the_data_audit_and_the_periodic_samples_are_written_and_reported(run_dir):
    audit = json.loads((run_dir / "data_audit.json").read_text())
    train_split, held_out = audit["splits"]
    assert (train_split["rows"], held_out["rows"], train_split["pairs"], held_out["pairs"]) == (28, 4, 28, 4)
    assert sum(train_split["lengths"]["chosen"]["counts"]) == 28
    samples = lines(run_dir / "samples.jsonl")
    assert [(row["step"], row["prompt_index"]) for row in samples] == [(s, i) for s in (0, 2, 3) for i in (0, 1)]
    assert all(set(row) == {"step", "prompt_index", "prompt", "answer", "tokens"} for row in samples)
    assert all(1 <= row["tokens"] <= 4 for row in samples)
    assert "Give me a tip" in samples[0]["prompt"] or "?" in samples[0]["prompt"]  # decoded prompt text
    assert samples[0]["prompt"] == samples[2]["prompt"]  # the same prompts every time
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "How answers changed during training" in page
    assert "28" in page and "rows read" in page


def test_sampling_during_training_leaves_the_training_unchanged(run_dir, llama_dir, tmp_path):
    """The samples draw from their own generators: the same run without them logs the same numbers."""
    config = make_config(llama_dir, run_dir.parent / "t.jsonl", tmp_path / "plain", "train.max_steps=3",
                         "train.eval_every=2", "data.eval_fraction=0.125")
    train(config, progress=False)
    numbers = ("loss", "rewards/margins", "logps/chosen", "logps/rejected")
    logged = [[(row["step"], [row[key] for key in numbers]) for row in lines(out / "metrics.jsonl")]
              for out in (run_dir, tmp_path / "plain")]
    assert logged[0] == logged[1]
    assert not (tmp_path / "plain" / "samples.jsonl").exists() and not (tmp_path / "plain" / "report.html").exists()


def test_tensorboard_event_files_hold_every_metrics_row(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics = lines(run_dir / "metrics.jsonl")
    train_loss = [(row["step"], row["loss"]) for row in metrics if row["split"] == "train"]
    eval_accuracy = [(row["step"], row["rewards/accuracy"]) for row in metrics if row["split"] == "eval"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == train_loss
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/rewards/accuracy")] == eval_accuracy
    assert "train/lr" in events.Tags()["scalars"] and "eval/lr" not in events.Tags()["scalars"]


def test_report_command_rebuilds_an_interrupted_run(run_dir, tmp_path, capsys):
    """A run without summary.json (killed): the report shows what there is and says it did not finish."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("metrics.jsonl", "config.yaml", "data_audit.json", "samples.jsonl"):
        (partial / name).write_bytes((run_dir / name).read_bytes())
    with (partial / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "split": "tra')  # torn by the kill
    assert main(["report", str(partial)]) == 0
    printed = capsys.readouterr().out
    assert "has not finished" in printed and "report.html" in printed
    markdown = (partial / "report.md").read_text(encoding="utf-8")
    assert "Not finished: 3 steps logged so far" in markdown and "1 unreadable JSONL lines" in markdown
    assert png_size(partial / "plots" / "loss.png")[0] >= 400

    assert main(["report", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a training run's output" in error


def crafted_run(tmp_path, rows, summary=None, evaluation=None, samples=()):
    run = tmp_path / "crafted"
    (run / "eval").mkdir(parents=True)
    write_jsonl(run / "metrics.jsonl", rows)
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny\ntrain:\n  max_steps: 100\n")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if evaluation is not None:
        (run / "eval" / "eval.json").write_text(json.dumps(evaluation))
    if samples:
        write_jsonl(run / "samples.jsonl", list(samples))
    return run


SUMMARY = {"steps": 100, "train_pairs": 400, "eval_pairs": 40, "seconds": 12.0, "pairs_trained": 400, "epochs": 1.0,
           "skipped_steps": 0, "final_train": {}, "final_eval": None}


def train_row(step, chosen=-50.0, skipped=False):
    return {"step": step, "split": "train", "loss": 0.5, "rewards/accuracy": 0.75, "rewards/margins": 0.4,
            "rewards/chosen": 0.1, "rewards/rejected": -0.3, "logps/chosen": chosen, "logps/rejected": -60.0,
            "grad_norm": 1.0, "lr": 1e-5, "tokens_per_s": 100.0, "skipped": skipped, "peak_memory_gib": 1.0}


def eval_row(step, accuracy, chosen=-50.0):
    return {"step": step, "split": "eval", "loss": 0.4, "rewards/accuracy": accuracy, "rewards/margins": 0.5,
            "rewards/chosen": 0.2, "rewards/rejected": -0.3, "logps/chosen": chosen, "logps/rejected": -60.0}


def test_warnings_fire_on_what_users_get_wrong_and_only_then(tmp_path):
    healthy = [train_row(step) for step in range(1, 101)] + [eval_row(50, 0.8), eval_row(100, 0.85)]
    assert run_warnings(read_run(crafted_run(tmp_path, healthy, SUMMARY))) == []

    rows = ([train_row(step, chosen=-50.0 - step / 5, skipped=step in (7, 8)) for step in range(1, 101)]
            + [eval_row(10, 1.0, -51.0), eval_row(100, 1.0, -70.0)])
    evaluation = {"format": 1, "kl": 180.0, "length_ratio": 2.1, "warnings": ["the judge tied every pair"],
                  "metrics": {}, "win_rate": None}
    found = run_warnings(read_run(crafted_run(tmp_path / "bad", rows, {**SUMMARY, "skipped_steps": 2}, evaluation)))
    text = "\n".join(found)
    assert "reached 1.0 at step 10 of 100, within the first tenth" in text
    assert "fell from -51.0 to -70.0 nats (held-out pairs, first vs last evaluation)" in text
    assert "2.10x as long as the reference's" in text
    assert "180 nats per answer" in text
    assert "2 steps had their update skipped" in text
    assert found[-1] == "the judge tied every pair" and len(found) == 6

    # Accuracy 1.0 only after the first tenth, a small dip in log-prob, answers 1.4x: no warning.
    mild = [train_row(s) for s in range(1, 101)] + [eval_row(11, 1.0, -50.0), eval_row(100, 1.0, -50.5)]
    quiet = run_warnings(read_run(crafted_run(tmp_path / "mild", mild, SUMMARY, {"length_ratio": 1.4, "kl": 20.0})))
    assert quiet == []


def test_the_length_warning_also_reads_the_periodic_samples(tmp_path):
    samples = [{"step": step, "prompt_index": i, "prompt": "p", "answer": "a", "tokens": tokens}
               for step, tokens in ((0, 10), (50, 14), (100, 16)) for i in (0, 1)]
    found = run_warnings(read_run(crafted_run(tmp_path, [train_row(1)], SUMMARY, samples=samples)))
    assert any("1.60x as long" in w and "step 100 vs step 0" in w for w in found)


def test_the_evaluation_renders_its_table_win_rate_and_samples_side_by_side(tmp_path):
    evaluation = {
        "format": 1, "data": "data/eval.jsonl", "pairs": 64, "prompts": 2, "samples_per_prompt": 1,
        "judge": "demo:kindness",
        "metrics": {"rewards/accuracy": {"reference": 0.5, "policy": 0.9},
                    "logps/chosen": {"reference": -40.0, "policy": -38.5},
                    "ranking accuracy (per token)": {"reference": 0.61, "policy": None}},
        "length_ratio": 1.1, "kl": 12.5,
        "win_rate": {"wins": 7, "ties": 2, "losses": 1, "win_rate": 0.8, "ci95": [0.55, 0.93], "lc_win_rate": 0.78},
        "warnings": []}
    samples = [{"prompt_index": i, "prompt": f"Question <{i}>?", "sample": 0, "seed": 0, "reference": f"rude {i}",
                "policy": f"kind & helpful {i}", "reference_score": -1.0, "policy_score": 2.0} for i in range(2)]
    run = crafted_run(tmp_path, [train_row(s) for s in range(1, 5)], SUMMARY, evaluation)
    write_jsonl(run / "eval" / "samples.jsonl", samples)
    report = write_report(run)
    markdown = report.markdown.read_text(encoding="utf-8")
    assert "| rewards/accuracy | 0.5 | 0.9 | 0.4 |" in markdown
    assert "| ranking accuracy (per token) | 0.61 | – |  |" in markdown
    assert "win rate of the policy over the reference: 0.8 (95% CI 0.55 to 0.93; 7 wins, 2 ties, 1 losses" in markdown
    assert "length-controlled 0.78" in markdown and "KL to the reference" in markdown and "judge: demo:kindness" in markdown
    assert "| Question <0>? | rude 0 | kind & helpful 0 | -1 / 2 |" in markdown
    page = report.html.read_text(encoding="utf-8")
    assert "<td>Question &lt;1&gt;?</td><td>rude 1</td><td>kind &amp; helpful 1</td>" in page
    assert report.warnings == []


def test_data_audit_counts_skips_by_reason_identical_pairs_and_truncation(tokenizer, tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": "A long kind answer " * (1 + i), "rejected": "No."} for i in range(6)]
    rows += [{"prompt": "Same?", "chosen": "x", "rejected": "x"}, {"prompt": "Gone?", "chosen": "y"},
             {"prompt": "Same again?", "chosen": "z", "rejected": "z"}]
    config = load_config(None, ["model.name_or_path=unused", f"data.train_file={write_jsonl(tmp_path / 'd.jsonl', rows)}",
                                "data.on_bad_row=skip", "data.eval_fraction=0", "data.max_length=24",
                                "data.max_prompt_length=8"])
    data = tokenize_preference_data(read_preference_examples(config.data, 0), config.data, tokenizer)
    (split,) = data_audit(data)["splits"]
    assert (split["rows"], split["skipped"], split["pairs"]) == (9, 3, len(data.train))
    assert split["skipped_by_reason"] == {"field 'rejected': is identical to chosen": 2,
                                          "field 'rejected': missing (the row has prompt, chosen)": 1}
    assert split["chosen_equals_rejected"]["rows_skipped"] == 2
    assert split["truncated_responses"] > 0
    lengths = [len(pair.chosen_ids) for pair in data.train]
    assert split["lengths"]["chosen"]["max"] == max(lengths) and sum(split["lengths"]["chosen"]["counts"]) == len(lengths)


def test_length_histogram_bins():
    histogram = length_histogram([0, 1, 2, 39, 40, 20])
    assert histogram["edges"][:3] == [0, 2, 4] and histogram["edges"][-1] == 40 and len(histogram["counts"]) == 20
    assert histogram["counts"][0] == 2 and histogram["counts"][1] == 1 and histogram["counts"][10] == 1
    assert histogram["counts"][-1] == 2 and (histogram["mean"], histogram["max"]) == (17.0, 40)


def test_resuming_keeps_the_samples_up_to_the_checkpoint(tmp_path):
    write_jsonl(tmp_path / "samples.jsonl", [{"step": s, "prompt_index": 0, "answer": "a"} for s in (0, 2, 4, 6)])
    with (tmp_path / "samples.jsonl").open("a") as handle:
        handle.write('{"step": 8, "prom')
    keep_until(tmp_path, 4)
    assert [row["step"] for row in lines(tmp_path / "samples.jsonl")] == [0, 2, 4]


def test_tracker_settings_and_missing_packages(monkeypatch):
    with pytest.raises(ConfigError, match="output.report_to: must be one of tensorboard, wandb, trackio"):
        load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", "output.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match="output.report_to lists a tracker twice"):
        load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", "output.report_to=[wandb, wandb]"])
    config = load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", "output.report_to=[wandb]"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(LoraDpoError, match=r"output.report_to lists wandb, but the wandb package is not installed\. "
                                           r"Fix: pip install 'lora-dpo\[wandb\]'"):
        check_trackers(config)
    assert scalars({"step": 3, "split": "eval", "loss": 0.5, "skipped": True, "note": "x"}) == {
        "eval/loss": 0.5, "eval/skipped": 1.0}


def test_sample_every_without_prompts_is_refused_before_the_run_writes(llama_dir, demo_rows, tmp_path):
    config = make_config(llama_dir, write_jsonl(tmp_path / "t.jsonl", demo_rows), tmp_path / "run",
                         "data.eval_fraction=0", "train.sample_every=2")
    with pytest.raises(LoraDpoError, match="train.sample_every answers the held-out pairs' prompts, and there are none"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_wandb_and_trackio_log_offline(tmp_path, monkeypatch):
    """Where the extras are installed: both back-ends log a row without any network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from lora_dpo.tracking import open_trackers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", f"output.dir={tmp_path / 'run'}",
                                "output.report_to=[wandb, trackio]"])
    (tmp_path / "run").mkdir()
    tracker = open_trackers(config, tmp_path / "run")
    tracker.log({"step": 1, "split": "train", "loss": 0.69})
    tracker.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    from trackio.utils import TRACKIO_DIR

    assert (TRACKIO_DIR / "lora-dpo.db").is_file() or (TRACKIO_DIR / "lora-dpo.lock").exists()

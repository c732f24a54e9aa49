"""Resuming with changed settings or data (the rules of docs/reliability.md), epoch accounting, and
a finished run started again."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_config, write_jsonl

import lora_dpo.train as train_module
from lora_dpo.checkpoint import checkpoint_step
from lora_dpo.cli import main
from lora_dpo.config import Config
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import LoraDpoError
from lora_dpo.train import PairStream, _flatten, resume_rule, train

TIMING_KEYS = {"tokens_per_s", "seconds", "peak_memory_gib", "peak_reserved_gib"}
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm")


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def train_rows(out: Path) -> list[dict]:
    return [row for row in metrics(out) if row["split"] == "train"]


def interrupted_at(finished: Path, step: int, copy: Path) -> Path:
    """A copy of a finished run as a kill right after checkpoint-STEP left it."""
    shutil.copytree(finished, copy)
    (copy / "summary.json").unlink()
    for path in copy.iterdir():
        if (checkpoint_step(path) or 0) > step:
            shutil.rmtree(path)
    return copy


@pytest.fixture
def steps_seen(monkeypatch):
    """The pair indices of every optimizer step the loop runs, in order."""
    seen: list[list[int]] = []
    real_call = train_module.DpoStep.__call__

    def spy(self, pairs, micro_batches, table):
        seen.append([index for batch in micro_batches for index in batch])
        return real_call(self, pairs, micro_batches, table)

    monkeypatch.setattr(train_module.DpoStep, "__call__", spy)
    return seen


@pytest.fixture(scope="module")
def forty_pairs(tmp_path_factory):
    from lora_dpo.demo import TRAIN_TOPICS, demo_pairs

    return write_jsonl(tmp_path_factory.mktemp("forty") / "t.jsonl", demo_pairs(TRAIN_TOPICS, 40, seed=5))


def forty_config(llama_dir, forty_pairs, out, *overrides):
    return make_config(llama_dir, forty_pairs, out, "train.max_steps=null", "train.epochs=1", "data.eval_fraction=0",
                       "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", "train.save_every=1",
                       "train.keep_last=20", "train.lr_scheduler=cosine", "train.warmup_steps=2", *overrides)


@pytest.fixture(scope="module")
def epoch_runs(llama_dir, forty_pairs, tmp_path_factory):
    """One epoch over 40 pairs in steps of 2x2, a checkpoint after every step; plain and length-grouped
    with the packed layout (whose grouping depends on the micro-batch size)."""
    runs = {}
    for name, options in {"plain": [], "grouped": ["data.group_by_length=true", "data.layout=packed_prefix_shared"]}.items():
        out = tmp_path_factory.mktemp(name) / "run"
        seen: list[list[int]] = []
        real_call = train_module.DpoStep.__call__

        def spy(self, pairs, micro_batches, table, seen=seen):
            seen.append([index for batch in micro_batches for index in batch])
            return real_call(self, pairs, micro_batches, table)

        train_module.DpoStep.__call__ = spy
        try:
            summary = train(forty_config(llama_dir, forty_pairs, out, *options), progress=False)
        finally:
            train_module.DpoStep.__call__ = real_call
        runs[name] = (out, options, seen, summary)
    return runs


# ---------------------------------------------------------------------------------------------
# Epochs


@pytest.mark.parametrize("options", [[], ["data.group_by_length=true", "data.layout=packed"]], ids=["plain", "grouped"])
def test_an_epoch_trains_each_pair_once_and_its_last_step_is_short(options, llama_dir, forty_pairs, tmp_path,
                                                                    steps_seen):
    """40 pairs in steps of 4 x 4: 16 + 16 + 8, not three steps of 16 that train 8 pairs twice."""
    summary = train(forty_config(llama_dir, forty_pairs, tmp_path / "run", "train.micro_batch_size=4",
                                 "train.gradient_accumulation_steps=4", "train.epochs=2", "train.save_every=0",
                                 *options), progress=False)
    assert [len(step) for step in steps_seen] == [16, 16, 8, 16, 16, 8]
    for epoch in (steps_seen[:3], steps_seen[3:]):
        assert sorted(i for step in epoch for i in step) == list(range(40))  # each pair once per epoch
    assert [row["epoch"] for row in train_rows(tmp_path / "run")] == [0.4, 0.8, 1.0, 1.4, 1.8, 2.0]
    assert (summary.steps, summary.pairs_trained, summary.train_pairs, summary.epochs) == (6, 80, 40, 2.0)
    assert summary.lines()[0].startswith("trained 6 steps on 80 pairs (2 epochs of the 40 training pairs) in ")


def test_a_fraction_of_an_epoch_trains_that_share_of_the_pairs(llama_dir, forty_pairs, tmp_path, steps_seen):
    summary = train(forty_config(llama_dir, forty_pairs, tmp_path / "run", "train.micro_batch_size=4",
                                 "train.gradient_accumulation_steps=4", "train.epochs=0.75", "train.save_every=0"),
                    progress=False)
    assert [len(step) for step in steps_seen] == [16, 14]
    assert summary.pairs_trained == 30 and "trained 2 steps on 30 pairs (0.75 epochs of the 40 training pairs)" in (
        summary.lines()[0])


def fake_pairs(count):
    return [TokenizedPair([1] * (1 + i % 7), [2] * (1 + i % 5), [3] * (2 + i % 3)) for i in range(count)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_the_stream_counts_pairs_so_a_new_micro_batch_size_continues_with_the_unseen_pairs(group_by_length):
    pairs = fake_pairs(75)  # odd sizes on purpose: short micro-batches and short steps

    def stream(mb, accumulation, position=None, layout="padded"):
        return PairStream(pairs, mb, accumulation, 7, group_by_length, layout, position)

    # Interrupted after 5 steps of 2 x 3 (30 pairs), resumed with 4 x 1 and another layout for 7
    # steps, then with 3 x 3 to the end of the second epoch.
    first = stream(2, 3)
    taken = [i for _ in range(5) for batch in first.next_step() for i in batch]
    resumed = stream(4, 1, first.position(), layout="prefix_shared")
    for _ in range(7):
        step = resumed.next_step()
        assert [len(batch) for batch in step] == [4]
        taken += [i for batch in step for i in batch]
    again = stream(3, 3, resumed.position())
    while again.consumed < 150:
        taken += [i for batch in again.next_step() for i in batch]
    assert again.consumed == 150
    assert sorted(taken[:75]) == list(range(75)) and sorted(taken[75:]) == list(range(75))

    # Unchanged settings: the resumed stream hands out the very same micro-batches.
    fresh, later = stream(2, 3), stream(2, 3)
    for _ in range(4):
        later.next_step()
    continued = stream(2, 3, later.position())
    assert [fresh.next_step() for _ in range(30)][4:] == [continued.next_step() for _ in range(26)]


def test_steps_until_matches_the_steps_taken_for_any_target():
    pairs = fake_pairs(37)
    for group_by_length in (False, True):
        for target in (1, 5, 36, 37, 38, 60, 74, 111, 200):
            stream = PairStream(pairs, 4, 3, 1, group_by_length)
            planned = stream.steps_until(target)
            taken = 0
            while stream.consumed < target:
                stream.next_step(target - stream.consumed)
                taken += 1
            assert (planned, stream.consumed) == (taken, target), (group_by_length, target)


# ---------------------------------------------------------------------------------------------
# Resuming with changed settings


@pytest.mark.parametrize("name", ["plain", "grouped"])
def test_resuming_with_another_micro_batch_size_trains_every_pair_once(name, epoch_runs, llama_dir, forty_pairs,
                                                                      tmp_path, steps_seen):
    """2 x 2 -> 4 x 1 after 4 steps (16 pairs): the same 4 pairs per step, so the same run up to rounding."""
    finished, options, uninterrupted_steps, _ = epoch_runs[name]
    out = interrupted_at(finished, 4, tmp_path / "run")
    summary = train(forty_config(llama_dir, forty_pairs, out, *options, "train.micro_batch_size=4",
                                 "train.gradient_accumulation_steps=1", "train.resume=always"), progress=False)
    trained = [i for step in uninterrupted_steps[:4] + steps_seen for i in step]
    assert sorted(trained) == list(range(40))  # every pair exactly once in the epoch
    assert [sorted(s) for s in steps_seen] == [sorted(s) for s in uninterrupted_steps[4:]]
    assert summary.steps == 10 and summary.pairs_trained == 40
    got, want = train_rows(out), train_rows(finished)
    assert [r["lr"] for r in got] == [r["lr"] for r in want]  # the same schedule of the same length
    for a, b in zip(got, want, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert json.loads((out / "summary.json").read_text())["resumes"] == [
        {"step": 4, "changed": {"train.micro_batch_size": [2, 4], "train.gradient_accumulation_steps": [2, 1]}}]


def test_resuming_with_more_pairs_per_step_trains_the_rest_of_the_epoch(epoch_runs, llama_dir, forty_pairs, tmp_path,
                                                                        steps_seen):
    """Accumulation 2 -> 8 after 4 steps: 24 pairs left, two steps of 16 and 8 (not zero steps)."""
    finished, _, uninterrupted_steps, _ = epoch_runs["plain"]
    out = interrupted_at(finished, 4, tmp_path / "run")
    summary = train(forty_config(llama_dir, forty_pairs, out, "train.gradient_accumulation_steps=8",
                                 "train.resume=always"), progress=False)
    assert [len(s) for s in steps_seen] == [16, 8] and summary.steps == 6 and summary.pairs_trained == 40
    assert sorted(i for step in uninterrupted_steps[:4] + steps_seen for i in step) == list(range(40))
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("change,message", [
    ("train.max_steps=3", "it is at step 4, and train.max_steps=3 leaves nothing to train. Fix: set train.max_steps "
                          "above 4, or pass --overwrite to start again"),
    ("train.epochs=0.25", "it has trained 16 pairs (0.4 epochs), and train.epochs=0.25 asks for 10, so nothing is "
                          "left. Fix: raise train.epochs above 0.4"),
    ("train.seed=7", "cannot resume with changed train.seed: checkpoint-4 was made with train.seed=42, and it decides "
                     "the held-out split and the order of the pairs. Fix: restore it, or pass --overwrite"),
])
def test_a_resume_that_cannot_continue_is_refused_before_the_model_loads(change, message, epoch_runs, llama_dir,
                                                                        forty_pairs, tmp_path, monkeypatch):
    finished, _, _, _ = epoch_runs["plain"]
    out = interrupted_at(finished, 4, tmp_path / "run")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(LoraDpoError) as info:
        train(forty_config(llama_dir, forty_pairs, out, change, "train.resume=always"), progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == before


def test_resuming_on_changed_data_is_refused(epoch_runs, llama_dir, forty_pairs, tmp_path, monkeypatch):
    finished, _, _, _ = epoch_runs["plain"]
    out = interrupted_at(finished, 4, tmp_path / "run")
    rows = [json.loads(line) for line in forty_pairs.read_text().splitlines()]
    changed = write_jsonl(tmp_path / "changed.jsonl", rows[2:] + rows[:2][::-1])  # same size, other pairs in place
    monkeypatch.setattr(train_module, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(LoraDpoError) as info:
        train(forty_config(llama_dir, changed, out, "train.resume=always"), progress=False)
    assert str(info.value).startswith(f"cannot resume from {out / 'checkpoint-4'}: the training pairs differ from "
                                      "those it was trained with (40 pairs then, 40 now")
    assert "Fix: restore the data the run started with, or pass --overwrite to start again" in str(info.value)
    dropped = write_jsonl(tmp_path / "dropped.jsonl", rows[:-3])
    with pytest.raises(LoraDpoError, match=r"the training pairs differ .* \(40 pairs then, 37 now"):
        train(forty_config(llama_dir, dropped, out, "train.resume=always"), progress=False)


def test_resuming_applies_a_changed_learning_rate_schedule_and_weight_decay(epoch_runs, llama_dir, forty_pairs,
                                                                           tmp_path, monkeypatch):
    """The rate of every resumed step is the new schedule's at that step, from the first one on;
    config.yaml and summary.json say what ran."""
    finished, _, _, _ = epoch_runs["plain"]
    out = interrupted_at(finished, 6, tmp_path / "run")
    decay = []
    real_call = train_module.DpoStep.__call__

    def spy(self, pairs, micro_batches, table):
        decay.append({group["weight_decay"] for group in self.optimizer.param_groups})
        return real_call(self, pairs, micro_batches, table)

    monkeypatch.setattr(train_module.DpoStep, "__call__", spy)
    new = ["train.learning_rate=5e-4", "train.weight_decay=0.1", "train.lr_scheduler=linear", "train.warmup_steps=0"]
    train(forty_config(llama_dir, forty_pairs, out, *new, "train.resume=always"), progress=False)
    rows = train_rows(out)
    assert [r["lr"] for r in rows[:6]] == [r["lr"] for r in train_rows(finished)[:6]]
    assert [r["lr"] for r in rows[6:]] == pytest.approx([5e-4 * (10 - s) / 10 for s in (6, 7, 8, 9)], rel=1e-12)
    assert decay == [{0.1}] * 4
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["learning_rate"], saved["weight_decay"], saved["lr_scheduler"]) == (5e-4, 0.1, "linear")
    assert json.loads((out / "summary.json").read_text())["resumes"] == [{"step": 6, "changed": {
        "train.learning_rate": [1e-3, 5e-4], "train.lr_scheduler": ["cosine", "linear"],
        "train.warmup_steps": [2, 0], "train.weight_decay": [0.0, 0.1]}}]


def test_the_documented_resume_table_is_the_code(tmp_path):
    """docs/reliability.md lists every setting with what a resume does with it; the code must agree."""
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = text.split("| setting | on resume |")[1].split("\n\n")[0]
    words = {"refused": "refused", "checked": "checked", "applied": "applied", "applied, speed and memory only": "speed",
             "irrelevant": "irrelevant"}
    documented = {}
    for line in table.strip().splitlines()[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for key in re.findall(r"`([a-z0-9_.*]+)`", cells[0]):
            assert key not in documented, f"{key} is in the table twice"
            documented[key] = words[cells[1]]
    for key in _flatten(Config().to_dict()):
        pattern = key if key in documented else key.split(".")[0] + ".*"
        assert pattern in documented, f"{key} is missing from the resume table in docs/reliability.md"
        assert documented[pattern] == resume_rule(key)[0], key
    assert set(documented) == set(train_module.RESUME_RULES)


# ---------------------------------------------------------------------------------------------
# A finished run, started again; the output directory's advice


def test_auto_on_a_finished_run_is_done_and_exits_0(epoch_runs, forty_pairs, llama_dir, tmp_path, capsys):
    finished, _, _, summary = epoch_runs["plain"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load((finished / "config.yaml").read_text())))
    before = (finished / "summary.json").read_text()
    assert main(["train", str(config), "train.resume=auto"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"already finished: {finished} holds this run, with these settings and data; nothing to do\n"
                              "trained 10 steps on 40 pairs (1 epochs of the 40 training pairs)")
    assert (finished / "summary.json").read_text() == before

    assert main(["train", str(config), "train.resume=auto", "train.learning_rate=2e-3"]) == 2
    err = capsys.readouterr().err
    assert f"output.dir {finished} holds a finished run made with other settings or data (train.learning_rate: " in err
    assert "Fix: choose another output.dir, or pass --overwrite to replace it" in err
    moved = tmp_path / "moved.jsonl"
    shutil.copyfile(forty_pairs, moved)
    assert main(["train", str(config), "train.resume=auto", f"data.train_file={moved}"]) == 0  # the same bytes
    capsys.readouterr()
    moved.write_text(moved.read_text() + moved.read_text().splitlines()[0] + "\n")  # one row more
    assert main(["train", str(config), "train.resume=auto", f"data.train_file={moved}"]) == 2
    assert "(data.train_file: its contents changed)" in capsys.readouterr().err
    assert main(["train", str(config), "--resume"]) == 2
    assert "already holds a finished run, so there is nothing to resume" in capsys.readouterr().err


def test_a_folder_lora_dpo_did_not_make_gets_the_right_advice_at_once(llama_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    args = ["train", str(REPO / "configs" / "demo.yaml"), f"model.name_or_path={llama_dir}", f"output.dir={folder}"]
    for extra in ([], ["--overwrite"], ["train.resume=auto"], ["--resume"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert (f"output.dir {folder} holds files that lora-dpo did not write (such as notes.txt); a run writes only "
                "into an empty directory or one of its own. Fix: choose another output.dir") in err
        assert "--overwrite" not in err and "--resume" not in err
    assert (folder / "notes.txt").read_text() == "keep me"


def test_the_documented_out_of_memory_message_is_the_one_printed():
    from lora_dpo.config import load_config

    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    documented = text.split("## Out of GPU memory")[1].split("```")[1].strip()
    config = load_config(None, ["model.name_or_path=m", "data.train_file=t.jsonl", "train.micro_batch_size=4",
                                "data.max_length=2048"])
    pair = TokenizedPair([1] * 873, [2] * 1000, [3] * 10)
    message = train_module._out_of_memory(config, "at step 1", [pair])
    assert documented == f"lora-dpo: error: {message}"

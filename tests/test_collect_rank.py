"""`lora-dpo collect rank`: pairs formed the right way round and counted per mode, duplicates,
empties and ties skipped and counted, a killed and rerun collection equal to an uninterrupted one,
other arguments against an existing output refused, reward-model scores batched as alone, and
the output trains with `lora-dpo train` as it is."""

from __future__ import annotations

import json
import logging
import random

import pytest
from conftest import make_config, write_jsonl

from lora_dpo.cli import main
from lora_dpo.collect.rank import (SKIP_FEW, SKIP_MARGIN, SKIP_TIED, distinct_answers, pair_rng, rank_pairs,
                                   ranking_scores)
from lora_dpo.records import Records

PROMPTS = ["Can you tell me about bread?", "Why do people like owls?", "Give me a tip about snow.",
           "What is interesting about tea?", "Could you explain chess simply?", "I want to learn about bees."]
SCORER = '''
def varied(prompt, answer):
    return float(sum(map(ord, answer)) % 97)

def flat(prompt, answer):
    return 1.0
'''


# ---------------------------------------------------------------------------------------------
# Pure pairing


def test_pairs_per_mode_are_the_right_way_round_and_counted():
    scores = [3.0, 1.0, 5.0, 1.0]
    assert rank_pairs(scores, "best-worst").pairs == [(2, 1)]  # lowest tie: the earlier answer
    drawn = rank_pairs(scores, "best-random", rng=random.Random(1)).pairs
    assert len(drawn) == 1 and drawn[0][0] == 2 and drawn[0][1] in (0, 1, 3)
    every = rank_pairs(scores, "all-above-margin").pairs
    assert sorted(every) == [(0, 1), (0, 3), (2, 0), (2, 1), (2, 3)]  # ties (1, 3) never pair
    assert sorted(rank_pairs(scores, "all-above-margin", margin=2.5).pairs) == [(2, 1), (2, 3)]
    assert all(scores[i] > scores[j] for i, j in every)
    # best-random's draw depends only on (seed, prompt index)
    picks = {rank_pairs(scores, "best-random", rng=pair_rng(7, 3)).pairs[0] for _ in range(5)}
    assert len(picks) == 1
    assert len({rank_pairs(scores, "best-random", rng=pair_rng(7, i)).pairs[0] for i in range(40)}) == 3


def test_skips_and_their_reasons():
    assert rank_pairs([2.0], "best-worst").skip == SKIP_FEW
    assert rank_pairs([2.0, 2.0, 2.0], "all-above-margin").skip == SKIP_TIED
    assert rank_pairs([2.0, 1.5], "best-worst", margin=0.5).skip == SKIP_MARGIN
    assert rank_pairs([2.0, 1.4], "best-random", margin=0.5).pairs == [(0, 1)]
    distinct = distinct_answers(["a", " ", "b", "a ", "", "c", "b"])
    assert (distinct.kept, distinct.empty, distinct.duplicates) == ([0, 2, 5], 2, 2)


def test_length_penalty_turns_the_ranking():
    # a long answer with the higher reward loses once each token costs 0.1
    ranking = ranking_scores([2.0, 1.5], [30, 5], 0.1)
    assert ranking == pytest.approx([-1.0, 1.0])
    assert rank_pairs(ranking, "best-worst").pairs == [(1, 0)]


# ---------------------------------------------------------------------------------------------
# The command on a tiny random model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("rank")
    (root / "scorer.py").write_text(SCORER)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": text} for text in PROMPTS])
    return root, prompts, llama_dir


def rank(setup, out, *extra):
    root, prompts, model = setup
    return main(["collect", "rank", "--prompts", str(prompts), "--generator", str(model),
                 "--reward-model", f"{root / 'scorer.py'}:varied", "--out", str(out), "-n", "4",
                 "--max-new-tokens", "8", "--temperature", "1.0", "--batch-size", "4", "--device", "cpu",
                 "--seed", "5", *extra])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def skips(path):
    progress = path.with_name(path.name + ".progress").read_text().splitlines()[1:]
    return [json.loads(line)["skipped"] for line in progress if "skipped" in json.loads(line)]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup[0] / "whole.jsonl"
    assert rank(setup, out) == 0
    return out


def test_rows_hold_the_pair_and_its_audit(uninterrupted, setup):
    found = rows(uninterrupted)
    assert len(found) + len(skips(uninterrupted)) == len(PROMPTS)
    assert len(found) >= 4
    for row in found:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen"] in row["candidates"] and row["rejected"] in row["candidates"]
        scores = dict(zip(row["candidates"], row["scores"]))
        assert scores[row["chosen"]] == row["chosen_score"] == max(s for s in row["scores"] if s is not None)
        assert row["sampling"]["temperature"] == 1.0 and row["sampling"]["num_samples"] == 4
        assert row["seed"] == 5 and row["generator"] == str(setup[2]) and row["reward"].endswith("scorer.py:varied")
        assert row["prompt"] == PROMPTS[row["prompt_index"]]
    # the candidates are removed once the output is complete
    assert sorted(p.name for p in uninterrupted.parent.glob("whole*")) == ["whole.jsonl", "whole.jsonl.progress"]


def test_all_above_margin_writes_every_pair_above_the_gap(uninterrupted, setup, tmp_path):
    out = tmp_path / "all.jsonl"
    assert rank(setup, out, "--pairs", "all-above-margin", "--margin", "3") == 0
    by_prompt = {}
    for row in rows(out):
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    for group in by_prompt.values():
        scores = [s for s in group[0]["scores"] if s is not None]
        expected = sum(1 for a in scores for b in scores if a - b > 3)
        assert len(group) == expected and all(r["chosen_score"] - r["rejected_score"] > 3 for r in group)
    # same generations as the best-worst run: the candidates do not depend on the pairing
    whole = {r["prompt_index"]: r["candidates"] for r in rows(uninterrupted)}
    assert all(group[0]["candidates"] == whole[i] for i, group in by_prompt.items() if i in whole)


def test_duplicates_and_ties_are_skipped_and_counted(setup, tmp_path, capsys):
    same = tmp_path / "same.jsonl"
    assert rank(setup, same, "--top-k", "1", "--limit", "3") == 0  # top-1 sampling: every answer the same
    assert same.read_text() == "" and skips(same) == [SKIP_FEW] * 3
    assert f"3 {SKIP_FEW}" in capsys.readouterr().out
    root = setup[0]
    flat = tmp_path / "flat.jsonl"
    assert main(["collect", "rank", "--prompts", str(setup[1]), "--generator", str(setup[2]), "--reward-model",
                 f"{root / 'scorer.py'}:flat", "--out", str(flat), "--temperature", "1.0", "--max-new-tokens", "8",
                 "--device", "cpu", "--limit", "3"]) == 0
    assert skips(flat) == [SKIP_TIED] * 3


def test_a_killed_run_continues_to_the_same_file(uninterrupted, setup, tmp_path, monkeypatch, caplog):
    """Killed while generating (after 2 of 6 prompts' candidates) and again while scoring: the
    third run ends with the uninterrupted run's bytes."""
    out = tmp_path / "killed.jsonl"
    real = Records.write
    calls = {"n": 0, "at": 3}

    def dying(self, prompt_index, rows_):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise KeyboardInterrupt
        real(self, prompt_index, rows_)

    monkeypatch.setattr(Records, "write", dying)
    assert rank(setup, out) == 130
    assert (tmp_path / "killed.jsonl.candidates").is_file() and out.read_text() == ""
    calls.update(n=0, at=6)  # 4 candidates left, then the second pair write
    assert rank(setup, out) == 130
    assert 0 < len(rows(out)) < len(rows(uninterrupted))
    monkeypatch.setattr(Records, "write", real)
    caplog.set_level(logging.INFO, logger="lora_dpo.collect")
    assert rank(setup, out) == 0
    assert "resuming" in caplog.text
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert skips(out) == skips(uninterrupted)


def test_other_arguments_against_an_existing_output_fail_clearly(uninterrupted, setup, capsys):
    before = uninterrupted.read_bytes()
    assert rank(setup, uninterrupted, "--seed", "6") == 2
    error = capsys.readouterr().err
    assert "was started with other settings" in error and "--overwrite" in error and "seed" in error
    assert uninterrupted.read_bytes() == before


def test_sampling_config_section_and_its_errors(setup, tmp_path, capsys):
    config = tmp_path / "collect.yaml"
    config.write_text("sampling:\n  temperature: 1.0\n  max_new_tokens: 8\n")
    out = tmp_path / "from-config.jsonl"
    root, prompts, model = setup
    base = ["collect", "rank", "--prompts", str(prompts), "--generator", str(model), "--limit", "2", "--reward-model",
            f"{root / 'scorer.py'}:varied", "--device", "cpu", "--out", str(out), "--config", str(config)]
    assert main(base + ["--top-p", "0.8"]) == 0
    assert {r["sampling"]["temperature"] for r in rows(out)} == {1.0} and rows(out)[0]["sampling"]["top_p"] == 0.8
    config.write_text("sampling:\n  tempreature: 1.0\n")
    assert main(base + ["--overwrite"]) == 2
    assert "unknown key sampling.tempreature (did you mean sampling.temperature?)" in capsys.readouterr().err


def test_the_output_trains_as_it_is(uninterrupted, setup, tmp_path):
    from lora_dpo.train import train

    config = make_config(setup[2], uninterrupted, tmp_path / "run", "model.load_in_4bit=false", "train.max_steps=1")
    summary = train(config)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert summary is not None


def test_reward_model_scores_in_the_rows_are_those_of_each_answer_alone(setup, tmp_path, llama_dir):
    from test_rewards import build_classifier

    from lora_dpo.rewards import load_reward

    reward_dir = build_classifier(tmp_path / "rm", llama_dir)
    out = tmp_path / "rm.jsonl"
    root, prompts, model = setup
    assert main(["collect", "rank", "--prompts", str(prompts), "--generator", str(model), "--reward-model",
                 str(reward_dir), "--reward-batch-size", "3", "--out", str(out), "-n", "3", "--max-new-tokens", "6",
                 "--temperature", "1.0", "--device", "cpu", "--limit", "2"]) == 0
    reward = load_reward(str(reward_dir), device="cpu", batch_size=1)
    found = rows(out)
    assert found
    for row in found:
        scored = [(text, score) for text, score in zip(row["candidates"], row["scores"]) if score is not None]
        assert len(scored) >= 2
        alone = [reward.score([row["prompt"]], [text])[0] for text, _ in scored]
        assert [score for _, score in scored] == pytest.approx(alone, abs=1e-5)
        assert row["chosen_score"] == pytest.approx(max(alone), abs=1e-5)


def test_bench_collect_reports_prompts_per_second(tmp_path):
    """scripts/bench_collect.py on the tiny shape: the command, generation and scoring rows."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_collect

    args = bench_collect.parse(["--shape", "tiny", "--prompts", "2", "-n", "2", "--max-new-tokens", "6",
                                "--batch-size", "4", "--device", "cpu", "--work", str(tmp_path)])
    report = bench_collect.run(args)
    results = report["results"]
    assert results["generated"]["prompts"] == results["scored"]["prompts"] == 2
    assert results["command"]["prompts_per_s"] > 0 and results["pairs"] <= 2
    table = bench_collect.table(report)
    assert "| lora-dpo collect rank | generation | 2 |" in table and "torch " in table

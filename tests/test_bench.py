"""scripts/bench.py: the CPU smoke run end to end, and the pieces its numbers come from."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("lora_dpo_bench_script", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _run(*args, tmp_path):
    # One thread: the test suite may share two cores with other processes, and oversubscribed
    # OpenMP threads make CPU steps a hundred times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(BENCH), *args, "--model-root", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)


def test_tiny_cpu_run_prints_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = _run("--shape", "tiny", "--steps", "2", "--warmup", "1", "--skip-trl", "--json", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert ("| impl | layout | reference | s/step | tokens/s | peak alloc GiB | peak reserved GiB | row tokens/step "
            "| prep s | vs TRL |") in lines
    assert "CPU run: a smoke test of the code paths; these timings say nothing about GPU throughput." in lines
    rows = [line for line in lines if line.startswith("| lora-dpo |")]
    assert len(rows) == 6  # three default layouts x two reference modes

    report = json.loads(out.read_text())
    assert report["settings"]["shape"] == "tiny" and report["settings"]["steps"] == 2
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    assert report["device"].startswith("CPU")
    results = {(r["layout"], r["reference"]): r for r in report["results"]}
    assert set(results) == {(layout, mode) for layout in ("padded", "prefix_shared", "packed_prefix_shared")
                            for mode in ("every_step", "precomputed")}
    for r in results.values():
        assert r["impl"] == "lora-dpo" and r["s_per_step"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_allocated_gib"] is None and r["vs_trl"] is None  # no GPU, no TRL
        # The adapter starts at zero and lr is 5e-6: policy = reference, so the loss stays ln 2 unless
        # the reference (on-demand or looked up from the precomputed table) belongs to other pairs.
        assert r["final_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert results[("padded", "precomputed")]["prep_s"] > 0
    # Same pairs in every configuration: same throughput count, fewer processed tokens when shared.
    padded = results[("padded", "every_step")]
    shared = results[("prefix_shared", "every_step")]
    assert shared["row_tokens_per_step"] < padded["row_tokens_per_step"]
    per_token = {key: r["tokens_per_s"] * r["s_per_step"] for key, r in results.items()}
    assert max(per_token.values()) == pytest.approx(min(per_token.values()), rel=1e-6)
    assert (tmp_path / "lora-dpo-bench-tiny" / "config.json").is_file()  # saved once, reused next time


def test_bad_arguments_exit_with_usage_error(tmp_path):
    result = _run("--shape", "tiny", "--layouts", "padded,zigzag", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "--layouts: unknown layout 'zigzag'" in result.stderr
    result = _run("--shape", "tiny", "--warmup", "0", tmp_path=tmp_path)
    assert result.returncode == 2 and "--warmup must be at least 1" in result.stderr


def test_ratios_pair_each_mode_with_trl_of_the_same_mode(bench):
    results = [
        {"impl": "lora-dpo", "layout": "padded", "reference": "every_step", "tokens_per_s": 6000.0},
        {"impl": "lora-dpo", "layout": "padded", "reference": "precomputed", "tokens_per_s": 9000.0},
        {"impl": "trl 1.16.0", "layout": "trl", "reference": "every_step", "tokens_per_s": 2000.0},
        {"impl": "trl 1.16.0", "layout": "trl", "reference": "precomputed", "tokens_per_s": 6000.0},
    ]
    for r in results:
        r.update(s_per_step=1.0, peak_allocated_gib=2.5, peak_reserved_gib=3.0, row_tokens_per_step=None, prep_s=0.0)
    bench.add_ratios(results)
    assert [r["vs_trl"] for r in results] == [3.0, 1.5, None, None]
    text = bench.table(results)
    assert "| lora-dpo | padded | every_step | 1.000 | 6,000 | 2.50 | 3.00 | n/a | 0.00 | 3.00x |" in text


def test_steady_state_skips_warmup(bench):
    ends = [10.0, 11.0, 11.5, 12.0]  # step ends; the first step (warm-up) is slow
    stats = bench.steady_state(ends, [100, 200, 200, 200], warmup=1)
    assert stats == {"s_per_step": 2.0 / 3, "tokens_per_s": 600 / 2.0}


def test_word_tokenizer_and_pairs_have_exact_lengths(bench):
    tokenizer = bench.build_tokenizer(64)
    assert tokenizer("w5 w6</s>")["input_ids"] == [1, 5, 6, 2]  # BOS added; EOS split off a glued word
    shape = bench.SHAPES["tiny"]
    rows = bench.make_rows(shape, 20, seed=3)
    assert rows == bench.make_rows(shape, 20, seed=3)
    tokenizer = bench.build_tokenizer(shape.words)
    pairs = bench.tokenize_rows(rows, tokenizer, shape)
    for row, pair in zip(rows, pairs):
        assert shape.prompt[0] <= len(pair.prompt_ids) <= shape.prompt[1]
        assert len(pair.chosen_ids) == len(row["chosen"].split()) + 1 and pair.chosen_ids[-1] == 2
        assert shape.response[0] <= len(pair.rejected_ids) <= shape.response[1]
        # TRL tokenizes prompt + response as one text: the same tokens must come out.
        assert tokenizer(row["prompt"] + row["chosen"])["input_ids"] == pair.prompt_ids + pair.chosen_ids[:-1]
    long = bench.long_rows(bench.SHAPES["8b"])
    assert (long.micro_batch, long.max_length, long.prompt) == (1, 2048, (768, 1024))

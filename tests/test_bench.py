"""scripts/bench.py: the CPU smoke run end to end, and the pieces its numbers come from."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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
    result = _run("--shape", "tiny", "--steps", "2", "--warmup", "1", "--skip-trl", "--json", str(out),
                  "--profile", str(tmp_path / "profile"), "--check-layouts", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert ("| impl | layout | reference | s/step | tokens/s | peak alloc GiB | peak reserved GiB | row tokens/step "
            "| prep s | vs TRL |") in lines
    assert "CPU run: a smoke test of the code paths; these timings say nothing about GPU throughput." in lines
    rows = [line for line in lines if line.startswith("| lora-dpo |")]
    assert len(rows) == 6  # three default layouts x two reference modes
    assert "| layout | reference | collate ms | reference ms | policy ms | backward ms | update ms |" in lines
    assert "| layout | max abs logp diff | max rel logp diff | grad rel diff (L2) | mean abs logp (padded) |" in lines

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
        assert r["phase_s"]["policy"] > 0 and r["phase_s"]["backward"] > 0
        assert r["phase_s"]["reference"] > 0  # the pass, or the lookup in the precomputed table
        profile = (tmp_path / "profile" / f"lora-dpo-{r['layout']}-{r['reference']}.txt").read_text()
        assert "aten::mm" in profile  # the profiler's operator table
    assert results[("padded", "precomputed")]["prep_s"] > 0
    # float32 on the CPU: every layout gives padded's numbers (the GPU run states its bf16 tolerance).
    agreement = {row["layout"]: row for row in report["layout_agreement"]}
    assert set(agreement) == {"prefix_shared", "packed", "packed_prefix_shared"}
    for row in agreement.values():
        assert row["dtype"] == "float32" and row["mean_abs_logp"] > 10
        assert row["max_abs_logp_diff"] < 1e-4 and row["grad_rel_diff"] < 1e-4
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
    assert result.returncode == 2 and "argument --warmup: must be at least 1, got 0" in result.stderr
    assert not (tmp_path / "lora-dpo-bench-tiny").exists()  # refused before any model is built


@pytest.mark.parametrize("flag, value, message", [
    ("--micro-batch", "0", "must be at least 1, got 0"),  # 0 used to fall back silently to the shape's default
    ("--micro-batch", "-2", "must be at least 1, got -2"),
    ("--pack-length", "0", "must be at least 1, got 0"),
    ("--pack-length", "-64", "must be at least 1, got -64"),
    ("--steps", "0", "must be at least 1, got 0"),
    ("--warmup", "-1", "must be at least 1, got -1"),
    ("--micro-batch", "two", "'two' is not an integer"),
])
def test_numeric_flags_are_checked_while_parsing(bench, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--shape", "tiny", flag, value])
    assert stopped.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_valid_numeric_flags_pass_through(bench):
    args = bench.parse_args(["--micro-batch", "1", "--pack-length", "128", "--steps", "1", "--warmup", "1"])
    assert (args.micro_batch, args.pack_length, args.steps, args.warmup) == (1, 128, 1, 1)
    assert bench.parse_args([]).micro_batch is None  # the shape's own micro-batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused_by_resolve_device(bench, tmp_path, capsys):
    assert bench.main(["--shape", "tiny", "--device", "cuda", "--skip-trl", "--model-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bench: --device is cuda but no CUDA GPU is visible. Fix: set --device to cpu or auto" in err
    assert list(tmp_path.iterdir()) == []


def test_dpo_step_runs_the_reference_in_eval_mode_and_reports_its_parts(bench, llama_dir, tmp_path):
    """DpoStep (what the loop and the bench both run) takes the on-demand reference pass under
    model.eval() + no_grad and goes back to train mode for the policy pass."""
    from lora_dpo.batching import collate, decoder_and_head, pair_logps
    from lora_dpo.modeling import load_model, load_tokenizer, trainable_parameters
    from lora_dpo.train import DpoStep, build_scheduler

    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--optim", "adamw"])
    shape = bench.SHAPES["tiny"]
    config = bench.lora_dpo_config(args, shape, llama_dir, tmp_path)
    assert config.model.load_in_4bit and config.model.gradient_checkpointing and config.lora.dropout > 0
    tokenizer = load_tokenizer(config.model)
    model = load_model(config, torch.device("cpu"))
    model.train()
    pairs = bench.tokenize_rows(bench.make_rows(shape, 2, seed=1), tokenizer, shape)
    with torch.no_grad():  # pair_logps' one-time check of the model, before passes are counted
        pair_logps(model, collate(pairs[:1], tokenizer.pad_token_id))
    passes = []
    decoder, _ = decoder_and_head(model)  # what pair_logps calls
    decoder.register_forward_pre_hook(lambda module, inputs: passes.append((module.training, torch.is_grad_enabled())))

    params = trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    config.train.max_grad_norm = 1e-3
    parts = []
    step = DpoStep(config, model, optimizer, build_scheduler(config, optimizer, 0, 10), None, torch.device("cpu"),
                   tokenizer.pad_token_id, phase=parts.append)
    metrics, applied, bad = step(pairs, [[0, 1]], None)
    assert passes == [(False, False), (True, True)]  # reference: eval, no grad; policy: train, grad
    assert parts == ["collate", "reference", "policy", "backward", "update"]
    assert model.training and applied and not bad
    # LoRA B starts at zero, so policy = reference and the loss is ln 2: the reference pass
    # really was the adapter-free model, with the same pairs.
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["tokens"] == pairs[0].num_tokens + pairs[1].num_tokens
    # SGD with lr 1 moves the weights by exactly the clipped gradient: clipping happened.
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert 0 < float(moved) <= 1e-3 * (1 + 1e-4)
    assert all(p.grad is None for p in params)  # zero_grad(set_to_none=True), as the loop does

    class Table:  # a precomputed reference: looked up, no reference pass
        def lookup(self, indices, device):
            from lora_dpo.batching import collate, pair_logps

            with torch.no_grad():
                return pair_logps(model, collate([pairs[i] for i in indices], tokenizer.pad_token_id))

    passes.clear()
    parts.clear()
    step(pairs, [[0, 1]], Table())
    assert passes[-1] == (True, True) and len(passes) == 2  # the lookup's own pass, then the policy pass
    assert parts == ["collate", "reference", "policy", "backward", "update"]  # "reference": the lookup


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


def test_layout_agreement_sees_a_wrong_layout(bench, llama_dir, tmp_path, monkeypatch):
    """The agreement check must notice a layout that scores the wrong tokens."""
    from lora_dpo import batching
    from lora_dpo.modeling import load_model, load_tokenizer

    args = bench.parse_args(["--shape", "tiny", "--device", "cpu", "--optim", "adamw"])
    shape = bench.SHAPES["tiny"]
    config = bench.lora_dpo_config(args, shape, llama_dir, tmp_path)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config, torch.device("cpu"))
    pairs = bench.tokenize_rows(bench.make_rows(shape, 2, seed=4), tokenizer, shape)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    real_collate = bench.collate

    def shifted(pairs, pad_id, layout="padded", pack_length=None):
        batch = real_collate(pairs, pad_id, layout=layout, pack_length=pack_length)
        if layout == "packed":
            batch.target_positions = batch.target_positions + 1  # off by one: predicts from the wrong state
        return batch

    monkeypatch.setattr(bench, "collate", shifted)
    rows = {r["layout"]: r for r in bench.layout_agreement(model, pairs, batching.LAYOUTS, torch.autocast("cpu", enabled=False),
                                                            tokenizer.pad_token_id, 7, None, seed=0)}
    assert rows["prefix_shared"]["max_abs_logp_diff"] < 1e-4
    assert rows["packed"]["max_abs_logp_diff"] > 1.0 and rows["packed"]["grad_rel_diff"] > 0.1
    # The random adapter used for the check is undone.
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)


def test_checkpoint_layers_reach_the_model_and_bad_counts_are_one_line(tmp_path):
    result = _run("--shape", "tiny", "--steps", "1", "--warmup", "1", "--skip-trl", "--layouts", "padded",
                  "--reference", "precomputed", "--checkpoint-layers", "1", "--breakdown-steps", "0", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gradient checkpointing on (lora-dpo: first 1 layers only)" in result.stdout
    result = _run("--shape", "tiny", "--steps", "1", "--warmup", "1", "--skip-trl", "--checkpoint-layers", "3",
                  tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("bench: model.checkpoint_layers=3 but ")
    assert "has 2 decoder layers" in result.stderr and "Traceback" not in result.stderr


def test_gpu_suite_script_writes_each_stage_under_out(tmp_path):
    """scripts/gpu_suite.sh, as a device session runs it, on the tiny shape (SMOKE=1) with one stage."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SMOKE": "1", "SKIP": "8b-long 8b-partial 8b-compile 1b",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_suite.sh"), str(out)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "== 8b: exit 0 after" in result.stdout and "== 1b: skipped" in result.stdout
    report = json.loads((out / "8b.json").read_text())
    assert report["settings"]["shape"] == "tiny" and len(report["layout_agreement"]) == 3
    assert (out / "profile-8b" / "lora-dpo-padded-every_step.txt").is_file()
    assert "torch 2" in (out / "environment.txt").read_text()
    assert result.stdout.rstrip().endswith((out / "8b.txt").read_text().rstrip())  # the tables come last


def test_sigterm_reports_the_configurations_that_finished(tmp_path):
    """A time limit (`timeout` sends SIGTERM) keeps what was measured: table and JSON, marked partial."""
    import signal

    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(BENCH), "--shape", "tiny", "--steps", "3", "--warmup", "1",
                                "--skip-trl", "--layouts", "padded,prefix_shared", "--reference", "precomputed",
                                "--breakdown-steps", "150", "--json", str(out), "--model-root", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        for line in process.stderr:  # the first configuration is done; the second is in its long breakdown
            if line.startswith("  lora-dpo padded"):
                break
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 124, stderr[-2000:]
    assert "PARTIAL: stopped by SIGTERM before every configuration ran" in stdout
    assert [line.split(" | ")[1] for line in stdout.splitlines() if line.startswith("| lora-dpo |")] == ["padded"]
    report = json.loads(out.read_text())
    assert report["settings"]["partial"] is True and [r["layout"] for r in report["results"]] == ["padded"]

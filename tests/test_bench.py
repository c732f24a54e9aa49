"""scripts/bench.py: the CPU smoke run end to end, and the pieces its numbers come from."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
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


def documented_smoke_command() -> list[str]:
    """The CPU smoke command of docs/benchmarks.md, as written there."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    block = text.split("### CPU smoke run (no timing claims)\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.splitlines() if "scripts/bench.py" in line]
    return shlex.split(line)


def test_documented_smoke_command_runs_every_layout(tmp_path):
    """docs/benchmarks.md's smoke command, run as written (only --model-root added, and its paths
    put under tmp_path): every layout in both modes, the agreement check, the breakdown and one profile."""
    words = documented_smoke_command()
    assert words[:3] == ["OMP_NUM_THREADS=1", "python", "scripts/bench.py"]
    assert words[words.index("--layouts") + 1].split(",") == ["padded", "prefix_shared", "packed", "packed_prefix_shared"]
    flags = [word.replace("runs/", f"{tmp_path}/runs/") for word in words[3:]]
    result = _run(*flags, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert ("| impl | layout | reference | s/step | tokens/s | peak alloc GiB | peak reserved GiB | row tokens/step "
            "| prep s | vs TRL |") in lines
    assert "CPU run: a smoke test of the code paths; these timings say nothing about GPU throughput." in lines
    assert "TRL: not run: skipped (--skip-trl)" in lines
    assert ("LoRA r=16, alpha 32, all linear layers; adapter weights: lora-dpo float32 with dropout 0.05") in lines
    rows = [line for line in lines if line.startswith("| lora-dpo |")]
    assert len(rows) == 8  # four layouts x two reference modes
    assert "| layout | reference | collate ms | reference ms | policy ms | backward ms | update ms |" in lines
    assert "| layout | max abs logp diff | max rel logp diff | grad rel diff (L2) | mean abs logp (padded) |" in lines

    report = json.loads((tmp_path / "runs" / "bench-tiny.json").read_text())
    assert report["settings"]["shape"] == "tiny" and report["settings"]["steps"] == 2
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    assert report["device"].startswith("CPU") and report["failures"] == []
    results = {(r["layout"], r["reference"]): r for r in report["results"]}
    assert set(results) == {(layout, mode) for layout in ("padded", "prefix_shared", "packed", "packed_prefix_shared")
                            for mode in ("every_step", "precomputed")}
    for r in results.values():
        assert r["impl"] == "lora-dpo" and r["s_per_step"] > 0 and r["tokens_per_s"] > 0 and r["micro_batch"] == 2
        assert r["peak_allocated_gib"] is None and r["vs_trl"] is None  # no GPU, no TRL
        assert (r["adapter_dtype"], r["lora_dropout"]) == ("float32", 0.05)
        # The adapter starts at zero and lr is 5e-6: policy = reference, so the loss stays ln 2 unless
        # the reference (on-demand or looked up from the precomputed table) belongs to other pairs.
        assert r["final_loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert r["phase_s"]["policy"] > 0 and r["phase_s"]["backward"] > 0
        assert r["phase_s"]["reference"] > 0  # the pass, or the lookup in the precomputed table
    assert results[("padded", "precomputed")]["prep_s"] > 0
    # One profile: of the last layout with the first reference mode, without record_shapes.
    profiles = list((tmp_path / "runs" / "bench-tiny-profile").iterdir())
    assert [p.name for p in profiles] == ["lora-dpo-packed_prefix_shared-every_step.txt"]
    profile = profiles[0].read_text()
    assert "aten::mm" in profile and "Input Shapes" not in profile
    assert [r.get("profile") for r in report["results"]].count("lora-dpo-packed_prefix_shared-every_step.txt") == 1
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
    # The diagnostics come after the timed configurations.
    err = result.stderr.splitlines()
    assert max(i for i, line in enumerate(err) if line.startswith("  lora-dpo ")) < min(
        i for i, line in enumerate(err) if line.startswith("  breakdown "))


@pytest.fixture
def one_thread():
    """In-process runs of the bench: one thread, as the subprocess runs get with OMP_NUM_THREADS=1
    (two threads on two busy cores make tiny steps many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trl_ready(bench):
    """TRL's trainer and what it needs import and work (the `test` extra installs them)."""
    problem = bench.trl_problem()
    if problem:
        pytest.skip(f"TRL cannot run here: {problem}")


def _tiny(tmp_path, *flags):
    return ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--model-root", str(tmp_path),
            "--json", str(tmp_path / "bench.json"), *flags]


# What the bench itself prints on stdout; anything else there would come from a library.
STDOUT_LINE = re.compile(r"^(\||$|tiny|\d+ pairs/step|LoRA r=16|TRL: |CPU run: |FAILED: |PARTIAL: |Each layout|lora-dpo step parts)")


def test_trl_rows_reach_the_table_and_json_with_ratios(bench, trl_ready, one_thread, tmp_path, capsys):
    """TRL on the tiny shape: its rows are in the table and the JSON, every lora-dpo row has its
    ratio against TRL's row of the same reference mode, TRL trains with LoRA dropout 0.05, and
    TRL runs before lora-dpo's breakdown steps."""
    assert bench.main(_tiny(tmp_path, "--layouts", "padded", "--breakdown-steps", "1")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line for line in lines if not STDOUT_LINE.match(line)] == []  # nothing from TRL on stdout
    trl_lines = [line for line in lines if line.startswith("| trl ")]
    assert [line.split(" | ")[2] for line in trl_lines] == ["every_step", "precomputed"]
    mine = [line for line in lines if line.startswith("| lora-dpo |")]
    assert len(mine) == 2 and all(re.search(r"\| \d+\.\d\dx \|$", line) for line in mine)
    assert "TRL: ran" in lines

    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    trl = {r["reference"]: r for r in rows if r["impl"].startswith("trl ")}
    assert set(trl) == {"every_step", "precomputed"} and report["failures"] == []
    for r in rows:
        assert r["micro_batch"] == 2
        if r["impl"] == "lora-dpo":
            assert r["vs_trl"] == pytest.approx(r["tokens_per_s"] / trl[r["reference"]]["tokens_per_s"])
            # Same pairs, same order: the same tokens per step as TRL's.
            assert r["tokens_per_s"] * r["s_per_step"] == pytest.approx(
                trl[r["reference"]]["tokens_per_s"] * trl[r["reference"]]["s_per_step"], rel=1e-6)
    for r in trl.values():
        assert r["tokens_exact"] and r["s_per_step"] > 0 and r["prep_s"] > 0
        assert r["lora_dropout"] == 0.05  # disable_dropout=False; TRL's default would give 0
        assert r["adapter_dtype"] == "bfloat16"  # TRL's cast on a 4-bit base, stated in docs/benchmarks.md
    assert report["versions"]["trl"] and report["settings"]["trl"] == "ran"
    err = captured.err.splitlines()
    assert max(i for i, line in enumerate(err) if line.startswith("  trl ")) < min(
        i for i, line in enumerate(err) if line.startswith("  breakdown "))


def test_trl_that_cannot_import_leaves_lora_dpo_rows(bench, one_thread, tmp_path, capsys, monkeypatch):
    """`import trl` works without datasets; the trainer does not. The bench says why, up front, and
    measures lora-dpo anyway."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    problem = bench.trl_problem()
    assert problem.startswith("ImportError: ") or problem.startswith("ModuleNotFoundError: ")
    assert bench.main(_tiny(tmp_path, "--layouts", "padded", "--reference", "every_step", "--breakdown-steps", "0")) == 0
    captured = capsys.readouterr()
    assert f"TRL: not run: {problem}" in captured.out.splitlines()
    assert f"bench: TRL cannot run here ({problem}); lora-dpo only" in captured.err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["impl"] for r in report["results"]] == ["lora-dpo"]


@pytest.mark.parametrize("failure, status, kind", [
    (RuntimeError("trainer broke"), 1, "error"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 0, "out of memory"),
])
def test_a_trl_failure_keeps_every_finished_row(bench, trl_ready, one_thread, tmp_path, capsys, monkeypatch, failure, status,
                                               kind):
    """TRL failing in one reference mode costs neither lora-dpo's rows nor TRL's other mode. Running
    out of memory (under a cap) is a result; any other error makes the exit status 1."""
    import trl

    real = trl.DPOTrainer

    def trainer(*args, **kwargs):
        if not kwargs["args"].precompute_ref_log_probs:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(trl, "DPOTrainer", trainer)
    assert bench.main(_tiny(tmp_path, "--layouts", "padded", "--breakdown-steps", "0")) == status
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert f"FAILED: trl {trl.__version__} trl every_step: {kind}: {type(failure).__name__}: {failure}" in lines
    rows = [line.split(" | ") for line in lines if line.startswith(("| lora-dpo |", "| trl "))]
    assert [(row[0], row[2]) for row in rows] == [("| lora-dpo", "every_step"), ("| lora-dpo", "precomputed"),
                                                  (f"| trl {trl.__version__}", "precomputed")]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["impl"] == "lora-dpo", r["reference"]) for r in report["results"]] == [
        (True, "every_step"), (True, "precomputed"), (False, "precomputed")]
    assert [r["vs_trl"] is None for r in report["results"][:2]] == [True, False]  # no ratio without TRL's row
    assert report["failures"][0]["kind"] == kind
    assert ("Traceback" in captured.err) == (kind == "error")


def test_saved_report_prints_again_with_show(bench, tmp_path, capsys):
    """--show renders a --json report (the suite's fallback when a stage was killed before printing)."""
    report = {"date": "2026-12-01", "device": "NVIDIA H200", "versions": {"torch": "2.11.0"}, "failures": [],
              "layout_agreement": [],
              "settings": {"shape": "8b", "long_rows": True, "micro_batch": 1, "mean_tokens_per_pair": 3600,
                           "checkpointing": "on", "optim": "paged_adamw_8bit", "attn": "sdpa", "compile": False,
                           "cuda_alloc_conf": "expandable_segments:True", "breakdown_steps": 0, "trl": "ran",
                           "partial": "stopped by SIGTERM during TRL every_step; the rows below are those that finished",
                           "memory_cap": {"memory_cap_gib": 8.0, "memory_cap_applied": True, "cuda_context_gib": 0.5,
                                          "allocator_limit_gib": 7.5, "card_gib": 139.8, "fraction": 0.054}},
              "results": [{"impl": "lora-dpo", "layout": "padded", "reference": "every_step", "micro_batch": 1,
                           "s_per_step": 2.0, "tokens_per_s": 1800.0, "peak_allocated_gib": 6.0, "peak_reserved_gib": 6.5,
                           "outside_allocator_gib": 0.75, "paged_optimizer_gib": 0.02, "row_tokens_per_step": 3600,
                           "prep_s": 0.0, "adapter_dtype": "float32", "lora_dropout": 0.05},
                          {"impl": "lora-dpo", "layout": "prefix_shared", "reference": "every_step", "micro_batch": 1,
                           "s_per_step": 1.5, "tokens_per_s": 2400.0, "peak_allocated_gib": 7.0, "peak_reserved_gib": 7.4,
                           "outside_allocator_gib": 0.75, "paged_optimizer_gib": 0.02, "row_tokens_per_step": 2700,
                           "prep_s": 0.0, "adapter_dtype": "float32", "lora_dropout": 0.05}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert bench.main(["--show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("Memory cap 8 GiB: CUDA context 0.50 GiB, so the allocator is limited to 7.50 GiB of the 140 GiB card "
            "(set_per_process_memory_fraction); paged optimizer state is managed memory outside that limit.") in lines
    assert "PARTIAL: stopped by SIGTERM during TRL every_step; the rows below are those that finished." in lines
    assert ("| impl | layout | reference | peak reserved GiB | outside allocator GiB | of which paged optimizer GiB "
            "| total GiB | fits 8 GiB |") in lines
    assert "| lora-dpo | padded | every_step | 6.50 | 0.75 | 0.020 | 7.25 | yes |" in lines
    assert "| lora-dpo | prefix_shared | every_step | 7.40 | 0.75 | 0.020 | 8.15 | no |" in lines


def test_memory_cap_leaves_room_for_the_cuda_context(bench):
    """The allocator's share of a 139 GiB card that, with the context, makes an 8 GiB card (the
    arithmetic of apply_memory_cap, from the numbers cudaMemGetInfo gives; no GPU here)."""
    gib = 2**30
    total = 139 * gib
    cap = bench.memory_cap(8, free=total - gib - gib // 2, total=total, reserved=gib)  # context: 0.5 GiB
    assert cap["cuda_context_gib"] == pytest.approx(0.5)
    assert cap["allocator_limit_gib"] == pytest.approx(7.5)
    assert cap["fraction"] == pytest.approx(7.5 / 139)
    with pytest.raises(bench.LoraDpoError, match="the CUDA context alone takes 9.00 GiB"):
        bench.memory_cap(8, free=total - 9 * gib, total=total, reserved=0)
    with pytest.raises(bench.LoraDpoError, match="more than the card's"):
        bench.memory_cap(200, free=total, total=total, reserved=0)
    assert bench.apply_memory_cap(8, torch.device("cpu")) == {"memory_cap_gib": 8, "memory_cap_applied": False}


def test_bad_arguments_exit_with_usage_error(bench, tmp_path, capsys):
    for argv, message in ((["--layouts", "padded,zigzag"], "--layouts: unknown layout 'zigzag'"),
                          (["--warmup", "0"], "argument --warmup: must be at least 1, got 0"),
                          (["--memory-cap-gib", "0"], "--memory-cap-gib must be positive, got 0")):
        with pytest.raises(SystemExit) as stopped:
            bench.main(["--shape", "tiny", "--model-root", str(tmp_path), *argv])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any model is built


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


def test_profile_config_must_be_a_configuration_that_runs(bench, capsys):
    assert bench.parse_args(["--layouts", "padded,prefix_shared"]).profile_config == ["prefix_shared", "every_step"]
    args = bench.parse_args(["--layouts", "padded", "--profile-config", "padded:precomputed"])
    assert args.profile_config == ["padded", "precomputed"]
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(["--layouts", "padded", "--profile-config", "packed:every_step"])
    assert stopped.value.code == 2
    assert "--profile-config packed:every_step: give LAYOUT:REFERENCE from --layouts (padded)" in capsys.readouterr().err


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


def test_ratios_pair_each_mode_with_trl_of_the_same_mode_and_micro_batch(bench):
    results = [
        {"impl": "lora-dpo", "layout": "padded", "reference": "every_step", "micro_batch": 2, "tokens_per_s": 6000.0},
        {"impl": "lora-dpo", "layout": "padded", "reference": "precomputed", "micro_batch": 2, "tokens_per_s": 9000.0},
        {"impl": "lora-dpo", "layout": "padded", "reference": "every_step", "micro_batch": 4, "tokens_per_s": 7000.0},
        {"impl": "trl 1.16.0", "layout": "trl", "reference": "every_step", "micro_batch": 2, "tokens_per_s": 2000.0},
        {"impl": "trl 1.16.0", "layout": "trl", "reference": "precomputed", "micro_batch": 2, "tokens_per_s": 6000.0},
    ]
    for r in results:
        r.update(s_per_step=1.0, peak_allocated_gib=2.5, peak_reserved_gib=3.0, row_tokens_per_step=None, prep_s=0.0)
    bench.add_ratios(results)
    assert [r["vs_trl"] for r in results] == [3.0, 1.5, None, None, None]  # micro-batch 4 has no TRL row of its own
    text = bench.table(results)
    assert "| lora-dpo | padded | every_step | 1.000 | 6,000 | 2.50 | 3.00 | n/a | 0.00 | 3.00x |" in text
    assert "| lora-dpo | padded | every_step | 1.000 | 7,000 | 2.50 | 3.00 | n/a | 0.00 | n/a |" in text


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


def test_checkpoint_layers_reach_the_model_and_bad_counts_are_one_line(bench, one_thread, tmp_path, capsys):
    tiny = ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--skip-trl", "--device", "cpu", "--model-root", str(tmp_path)]
    assert bench.main([*tiny, "--layouts", "padded", "--reference", "precomputed", "--checkpoint-layers", "1",
                       "--breakdown-steps", "0"]) == 0
    assert "gradient checkpointing on (lora-dpo: first 1 layers only)" in capsys.readouterr().out
    assert bench.main([*tiny, "--checkpoint-layers", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1].startswith("bench: model.checkpoint_layers=3 but ")
    assert "has 2 decoder layers" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing measured, no table


def test_sigterm_reports_the_configurations_that_finished(tmp_path):
    """A time limit (`timeout` sends SIGTERM) keeps what was measured: table and JSON, marked
    partial; the JSON holds each row as soon as it is measured, before the run ends."""
    import signal

    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, str(BENCH), "--shape", "tiny", "--steps", "2", "--warmup", "1",
                                "--skip-trl", "--layouts", "padded,prefix_shared", "--reference", "precomputed",
                                "--breakdown-steps", "150", "--json", str(out), "--model-root", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        for line in process.stderr:
            if line.startswith("  lora-dpo padded"):
                assert [r["layout"] for r in json.loads(out.read_text())["results"]] == ["padded"]
            if line.startswith("  diagnostics of lora-dpo padded/precomputed"):
                break  # both timed; the diagnostics' reference pass and 150 breakdown steps have begun
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 124, stderr[-2000:]
    assert ("PARTIAL: stopped by SIGTERM during the diagnostics of lora-dpo padded/precomputed; the rows below are "
            "those that finished.") in stdout.splitlines()
    assert [line.split(" | ")[1] for line in stdout.splitlines() if line.startswith("| lora-dpo |")] == [
        "padded", "prefix_shared"]
    report = json.loads(out.read_text())
    assert report["settings"]["partial"].startswith("stopped by SIGTERM")
    assert [(r["layout"], r["phase_s"]) for r in report["results"]] == [("padded", None), ("prefix_shared", None)]
    assert not out.with_name("bench.json.partial").exists()  # written whole, then renamed

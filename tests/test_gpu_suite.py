"""scripts/gpu_suite.sh: the one-call GPU suite, on the CPU.

The smoke test runs the real suite on the tiny shape (the slowest test of this file: two bench
processes with TRL, about a minute on two busy cores). The time-keeping tests put a stand-in for
the Python interpreter in place of the bench (PYTHON=...), so that limits, skips and kills are
checked in seconds without a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

from conftest import REPO

SUITE = REPO / "scripts" / "gpu_suite.sh"


def _suite(tmp_path, out_name="out", timeout=900, **env):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "SCRATCH": str(tmp_path / "scratch"), **env}
    for name in ("STAGES", "SKIP", "SMOKE", "PLAN", "BUDGET", "PYTHON", "SUITE_START", "KILL_GRACE"):
        if name not in env:
            environ.pop(name, None)
    return subprocess.run(["bash", str(SUITE), str(tmp_path / out_name)], capture_output=True, text=True,
                          env=environ, timeout=timeout, cwd=tmp_path)


def test_smoke_suite_delivers_everything_in_three_files(tmp_path):
    """SMOKE=1 of the default (one-call) stages: every table with TRL's rows and the ratios, each
    printed as its stage ends and the 8b tables again last; OUT holds tables.md, suite.tar.gz and
    environment.txt only; the long-row stage runs TRL too, with the cap and the allocator setting."""
    # A caller's allocator setting is cleared: only 8b-long sets one.
    result = _suite(tmp_path, SMOKE="1", SUITE_START=str(int(time.time())),
                    PYTORCH_CUDA_ALLOC_CONF="garbage_collection_threshold:0.6")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "suite.tar.gz", "tables.md"]
    stdout = result.stdout
    # Each stage's tables right after its exit line, in stage order, and the 8b tables once more at the end.
    assert stdout.index("== 8b: exit 0") < stdout.index("### 8b\n") < stdout.index("== 8b-long (limit")
    assert stdout.index("== 8b-long: exit 0") < stdout.index("### 8b-long\n") < stdout.index("### 8b (again")
    scratch = tmp_path / "scratch"
    main_table = (scratch / "8b.txt").read_text().rstrip()
    assert stdout.rstrip().endswith(main_table)
    tables = (out / "tables.md").read_text()
    assert tables.index("### 8b\n") < tables.index("### 8b-long\n")
    assert main_table in tables and (scratch / "8b-long.txt").read_text().rstrip() in tables
    with tarfile.open(out / "suite.tar.gz") as archive:
        names = {name.removeprefix("./") for name in archive.getnames()}
    assert {"8b.txt", "8b.json", "8b.log", "8b-long.txt", "8b-long.json", "8b-long.log",
            "profile-8b/lora-dpo-packed_prefix_shared-every_step.txt"} <= names
    assert list((scratch / "profile-8b").iterdir()) == [scratch / "profile-8b" / "lora-dpo-packed_prefix_shared-every_step.txt"]
    environment = (out / "environment.txt").read_text()
    assert re.search(r"^torch 2\.\S+ /", environment, re.M) and re.search(r"^pyarrow ", environment, re.M)
    assert re.search(r"^fsspec ", environment, re.M) and "s since SUITE_START" in environment
    assert "PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:0.6 was set by the caller; cleared" in environment

    main = json.loads((scratch / "8b.json").read_text())
    long = json.loads((scratch / "8b-long.json").read_text())
    assert main["settings"]["shape"] == long["settings"]["shape"] == "tiny" and long["settings"]["long_rows"]
    assert len(main["layout_agreement"]) == 3
    assert long["settings"]["memory_cap"] == {"memory_cap_gib": 8.0, "memory_cap_applied": False}
    assert long["settings"]["cuda_alloc_conf"] == "expandable_segments:True"
    assert main["settings"]["cuda_alloc_conf"] == ""
    assert "Memory cap 8 GiB: not applied (no CUDA device)." in (scratch / "8b-long.txt").read_text()
    if not (importlib.util.find_spec("trl") and importlib.util.find_spec("datasets")):  # the `test` extra has both
        assert "TRL: not run: " in main_table
        return
    assert main["settings"]["trl"] == long["settings"]["trl"] == "ran"
    for report, modes in ((main, {"every_step", "precomputed"}), (long, {"every_step"})):
        trl = {r["reference"] for r in report["results"] if r["impl"].startswith("trl ")}
        assert trl == modes
        mine = [r for r in report["results"] if r["impl"] == "lora-dpo"]
        assert mine and all(r["vs_trl"] and r["vs_trl"] > 0 for r in mine)
    assert [r["micro_batch"] for r in long["results"]] == [1, 1, 1]
    assert all(re.search(r"\| \d+\.\d\dx \|$", line) for line in main_table.splitlines() if line.startswith("| lora-dpo"))


def test_plan_in_the_docs_is_the_script_and_fits_one_call(tmp_path):
    """The one-call plan of docs/benchmarks.md names the default stages with the limits the script
    enforces, and adds up to less than 560 s with the install and the environment step."""
    plan = _suite(tmp_path, PLAN="1")
    assert plan.returncode == 0, plan.stderr
    script = [line.split() for line in plan.stdout.splitlines()]
    assert [row[0] for row in script] == ["8b", "8b-long"]
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    section = docs.split("The plan for the one call", 1)[1].split("\n\n", 2)[1]
    rows = {m[0]: int(m[1]) for m in re.findall(r"^\| `?([\w-]+)`? \| (\d+) \|", section, re.M)}
    assert {name: rows[name] for name, _, _ in script} == {name: int(limit) for name, limit, _ in script}
    total = re.search(r"^\| \*\*total\*\* \| \*\*(\d+)\*\* \|", section, re.M)
    assert int(total[1]) == sum(rows.values()) == rows["install"] + rows["environment"] + sum(
        int(limit) for _, limit, _ in script)
    assert sum(rows.values()) < 560
    command = docs.split("run, as one command that must end within 600 s:", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    assert command.startswith("export SUITE_START=$(date +%s); python3 -m pip install")
    assert 'STAGES="8b 8b-long" bash scripts/gpu_suite.sh "$OUT"' in command
    every = _suite(tmp_path, PLAN="1", STAGES="all", SKIP="1b")
    assert [line.split()[0] for line in every.stdout.splitlines()] == ["8b", "8b-long", "8b-partial", "8b-compile",
                                                                       "collect", "plan", "sweep", "fsdp"]


STAND_IN = r"""#!/usr/bin/env bash
# A stand-in for python3 in scripts/gpu_suite.sh: the environment step's `python3 -` runs for real,
# `python3 -m pip` and scripts/bench.py only record their arguments and act as FAKE_MODE says.
if [[ $1 == - ]]; then exec "$REAL_PYTHON" "$@"; fi
echo "$*" >> "$FAKE_LOG"
if [[ $1 == -m ]]; then echo "pip stand-in"; exit 0; fi
if [[ " $* " == *" --show "* ]]; then echo "| impl | rendered from the JSON |"; exit 0; fi
json=""; previous=""
for word in "$@"; do [[ $previous == --json ]] && json=$word; previous=$word; done
echo '{}' > "$json"
if [[ $FAKE_MODE == hang ]]; then trap '' TERM; sleep 60; fi
echo "| impl | stand-in table |"
"""


def _stand_in(tmp_path, mode, **env):
    fake = tmp_path / "python-stand-in"
    fake.write_text(STAND_IN)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    result = _suite(tmp_path, PYTHON=str(fake), FAKE_LOG=str(log), FAKE_MODE=mode, REAL_PYTHON=sys.executable, **env)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_budget_counts_from_the_call_start_and_8b_stages_need_90_s(tmp_path):
    """SUITE_START 500 s ago with BUDGET 570: 65 s left, too little to start an 8B stage."""
    result, calls = _stand_in(tmp_path, "quick", SUITE_START=str(int(time.time()) - 500), BUDGET="570")
    assert result.returncode == 1
    assert re.search(r"^== 8b: skipped, 6\ds of BUDGET left \(it needs 90s to start\)$", result.stdout, re.M)
    assert re.search(r"^== 8b-long: skipped, 6\ds of BUDGET left", result.stdout, re.M)
    assert calls == ["-m pip show pyarrow fsspec"]  # no stage ran
    assert "failed stages: 8b 8b-long" in result.stderr
    assert re.search(r"^date: .*; 50\d s since SUITE_START", (tmp_path / "out" / "environment.txt").read_text(), re.M)


def test_stage_limits_shrink_to_what_the_budget_has_left(tmp_path):
    """120 s left: the 8b stage gets 120 s, not 330, and the stage after it what is left then."""
    result, calls = _stand_in(tmp_path, "quick", SUITE_START=str(int(time.time()) - 445), BUDGET="570")
    assert result.returncode == 0, result.stderr
    limits = [int(m) for m in re.findall(r"^== 8b(?:-long)? \(limit (\d+)s\)", result.stdout, re.M)]
    assert len(limits) == 2 and 115 <= limits[1] <= limits[0] <= 120
    assert len(calls) == 3 and calls[1].startswith("scripts/bench.py --shape 8b --steps 6")
    assert "--memory-cap-gib 8" in calls[2] and "--skip-trl" not in calls[2]
    assert "SUITE_START is not set" not in result.stderr


def test_a_stage_that_ignores_sigterm_is_killed_at_its_limit_and_rendered_from_json(tmp_path):
    """SIGTERM KILL_GRACE before the limit, SIGKILL at it; the tables then come from the stage's JSON."""
    started = time.monotonic()
    result, calls = _stand_in(tmp_path, "hang", STAGES="8b", LIMIT_8B="6", KILL_GRACE="2")
    assert time.monotonic() - started < 40
    assert result.returncode == 1
    assert re.search(r"^== 8b: exit 137 after [6-9]s$", result.stdout, re.M)
    assert calls[-1] == f"scripts/bench.py --show {tmp_path}/scratch/8b.json"
    assert "| impl | rendered from the JSON |" in (tmp_path / "out" / "tables.md").read_text()
    assert "SUITE_START is not set" in result.stderr  # the budget then counts from the script's own start


def test_the_collect_stage_runs_the_collection_bench_when_named(tmp_path):
    """Not a default stage; named, it runs scripts/bench_collect.py on the 1B shape on the GPU
    (SMOKE: the tiny shape on the CPU), time-boxed like the others."""
    result, calls = _stand_in(tmp_path, "quick", STAGES="collect", LIMIT_COLLECT="40")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^== collect \(limit 40s\): ", result.stdout, re.M)
    assert calls[1].startswith("scripts/bench_collect.py --model shape --shape 1b --reward model --prompts 64 -n 4")
    assert "--device cuda" in calls[1] and calls[1].endswith(f"--json {tmp_path}/scratch/collect.json")
    assert "### collect" in (tmp_path / "out" / "tables.md").read_text()
    result, calls = _stand_in(tmp_path, "quick", STAGES="collect", SMOKE="1")
    assert calls[-1].endswith(f"--shape tiny --prompts 4 --max-new-tokens 8 --batch-size 8 --device cpu --json "
                              f"{tmp_path}/scratch/collect.json")


def test_the_plan_stage_runs_plan_check_with_its_shapes_lengths_and_caps(tmp_path):
    """STAGES=plan calls scripts/plan_check.py for 1B and 8B at three lengths and four emulated cards;
    its tables land in tables.md. (tests/test_memory.py runs plan_check.py itself on the tiny shape.)"""
    result, calls = _stand_in(tmp_path, "quick", STAGES="plan", SUITE_START=str(int(time.time())))
    assert result.returncode == 0, result.stderr
    assert calls[1:] == [f"scripts/plan_check.py --shapes 1b,8b --lengths 512,1024,2048 --caps 8,12,16,24 "
                         f"--json {tmp_path}/scratch/plan-check.json"]
    assert re.search(r"^== plan \(limit 300s\)", result.stdout, re.M)
    assert "### plan\n\n| impl | stand-in table |" in (tmp_path / "out" / "tables.md").read_text()


def test_unknown_stage_names_are_refused(tmp_path):
    result = _suite(tmp_path, STAGES="8b 9b")
    assert result.returncode == 2
    assert ("gpu_suite: unknown stage '9b' in STAGES/SKIP; known: 8b 8b-long 8b-partial 8b-compile 1b collect plan sweep fsdp"
            in result.stderr)


def test_the_sweep_stage_times_bench_sweep_and_is_not_a_default(tmp_path):
    """`sweep` runs only when named: scripts/bench_sweep.py on the GPU, or its CPU smoke with SMOKE=1."""
    assert "sweep" not in _suite(tmp_path, PLAN="1").stdout
    assert _suite(tmp_path, PLAN="1", STAGES="sweep").stdout.split() == ["sweep", "240", "60"]
    for smoke, flags in (("", "--device cuda"), ("1", "--steps 2 --device cpu")):
        (tmp_path / "calls.log").unlink(missing_ok=True)
        result, calls = _stand_in(tmp_path, "quick", STAGES="sweep", SMOKE=smoke, SUITE_START=str(int(time.time())))
        assert result.returncode == 0, result.stderr
        ran = [call for call in calls if "bench_sweep.py" in call]
        assert ran == [f"scripts/bench_sweep.py {flags} --json {tmp_path / 'scratch' / 'sweep-timing.json'}"]
        assert "### sweep" in (tmp_path / "out" / "tables.md").read_text()


def test_the_fsdp_stage_runs_fsdp_check_on_the_1b_shape_when_named(tmp_path):
    """Not a default stage; named, it runs scripts/fsdp_check.py on the 1B shape on the GPU (SMOKE:
    the tiny shape on the CPU), time-boxed by LIMIT_FSDP, its tables in tables.md."""
    assert "fsdp" not in _suite(tmp_path, PLAN="1").stdout
    assert _suite(tmp_path, PLAN="1", STAGES="fsdp").stdout.split() == ["fsdp", "150", "90"]
    result, calls = _stand_in(tmp_path, "quick", STAGES="fsdp", LIMIT_FSDP="40", SUITE_START=str(int(time.time())))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^== fsdp \(limit 40s\): ", result.stdout, re.M)
    assert calls[1:] == [f"scripts/fsdp_check.py --shape 1b --device cuda --json {tmp_path}/scratch/fsdp.json"]
    assert "### fsdp\n\n| impl | stand-in table |" in (tmp_path / "out" / "tables.md").read_text()
    result, calls = _stand_in(tmp_path, "quick", STAGES="fsdp", SMOKE="1", SUITE_START=str(int(time.time())))
    assert result.returncode == 0, result.stderr
    assert calls[-1] == f"scripts/fsdp_check.py --shape tiny --device cpu --json {tmp_path}/scratch/fsdp.json"


def _fsdp_check(tmp_path, *flags):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "fsdp_check.py"), "--shape", "tiny", "--device", "cpu",
                             "--model-root", str(tmp_path), "--json", str(tmp_path / "fsdp.json"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


def test_fsdp_check_on_the_cpu_shards_a_process_group_of_one_and_agrees_with_the_plain_load(tmp_path):
    """scripts/fsdp_check.py on the tiny shape (gloo, world size 1): the load, agreement and step
    tables with both ways' rows; the sharded scorer's log-probs and step losses are the plain ones."""
    check = _fsdp_check(tmp_path)
    stdout, stderr = check.communicate(timeout=120)
    assert check.returncode == 0, stderr[-3000:]
    assert "process group gloo, world size 1" in stdout and "PARTIAL" not in stdout
    assert "| impl | load + shard s | allocated before GiB | peak allocated GiB |" in stdout
    assert len(re.findall(r"^\| sharded \(FSDP2, 1 process\) \| ", stdout, re.M)) == 2  # load and steps
    assert len(re.findall(r"^\| plain \| ", stdout, re.M)) == 2
    assert re.search(r"^\| policy \| 8 \| ", stdout, re.M) and re.search(r"^\| reference \| 8 \| ", stdout, re.M)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["settings"]["backend"] == "gloo" and not report.get("partial")
    assert [r["impl"] for r in report["load"]] == [r["impl"] for r in report["steps"]] == [
        "sharded (FSDP2, 1 process)", "plain"]
    policy, reference = report["agreement"]
    assert policy["pass"] == "policy" and reference["pass"] == "reference"
    assert policy["max_abs_diff"] < 1e-4 and reference["max_abs_diff"] < 1e-4  # float32 on the CPU
    assert policy["policy_vs_reference"] > 1e-3  # the adapter is on: the policy row checks something
    assert policy["max_abs_logp"] > 10
    assert all(len(r["losses"]) == 4 and r["s_per_step"] > 0 for r in report["steps"])
    assert report["loss_diff"] < 1e-5
    assert f"Step losses, sharded against plain: max abs diff {report['loss_diff']:.3g}." in stdout


def test_fsdp_check_stopped_by_sigterm_prints_and_writes_what_finished(tmp_path):
    check = _fsdp_check(tmp_path, "--steps", "300")  # the steps would outlast the test; SIGTERM ends them
    for line in check.stderr:
        if line.startswith("  sharded: loaded in"):
            break
    check.send_signal(signal.SIGTERM)
    stdout, _ = check.communicate(timeout=60)
    assert check.returncode == 0
    assert "(PARTIAL: stopped by SIGTERM; the rows below finished)" in stdout
    assert re.search(r"^\| sharded \(FSDP2, 1 process\) \| ", stdout, re.M)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["partial"] and [r["impl"] for r in report["load"]] == ["sharded (FSDP2, 1 process)"]
    assert report["steps"] == [] and report["agreement"] == []

#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md reports, in one device call, most important first.
#
#   export SUITE_START=$(date +%s)   # first thing in the call: the budget counts from here
#   bash scripts/gpu_suite.sh [OUT]  # OUT defaults to $OUT, then ./gpu-suite
#
# Default stages (the one-call plan in docs/benchmarks.md, under 560 s with the install): `8b`,
# lora-dpo against TRL on the 8B shape, both reference modes, then the layouts' bf16 agreement,
# the per-part breakdown and one profile; `8b-long`, 8B long rows, lora-dpo and TRL, under an
# allocator cap equivalent to an 8 GiB card. More stages run when STAGES names them
# (STAGES="8b 8b-long 8b-partial", or STAGES=all); SKIP="..." leaves stages out. `collect` measures
# `lora-dpo collect rank` (prompts/s, scripts/bench_collect.py); `plan` (scripts/plan_check.py)
# checks the memory planner and emulates small cards; `sweep` times lora-dpo sweep against
# separate train runs; `fsdp` (scripts/fsdp_check.py) loads the 1B base the FSDP-QLoRA way and
# shards it in a process group of one (load peak, log-prob agreement, step time against the
# plain load); none of the four is a default stage.
#
# Time: every stage has a limit (LIMIT_<NAME>, e.g. LIMIT_8B_LONG) and a least time left to
# start (8B stages: 90 s, for imports and the 4-bit load); the whole run ends within BUDGET
# seconds (default 570) of SUITE_START, so a stage gets at most what is left. At its limit minus
# KILL_GRACE (15 s) a stage gets SIGTERM, prints and writes what finished (PARTIAL), and is
# killed at its limit if it has not exited.
#
# Output: at most three files in OUT, as a device call returns at most 8: tables.md (each
# stage's tables, appended as the stage ends), suite.tar.gz (every stage's table, JSON, log and
# profile, refreshed after each stage) and environment.txt. Each stage's tables also print as
# soon as it ends, and the 8B table prints again last (a call returns the end of its output).
# Stage files live in SCRATCH (default: a new temporary directory).
#
# SMOKE=1 runs the stages on the tiny shape on the CPU: a check of this script, no timing claims.
# PLAN=1 prints the stages that would run (name, limit, least time to start) and runs nothing.
# PYTHON names the interpreter (default python3).
set -u
known="8b 8b-long 8b-partial 8b-compile 1b collect plan sweep fsdp"
stages=${STAGES:-8b 8b-long}
[[ $stages == all ]] && stages=$known
for name in $stages ${SKIP:-}; do
  if [[ " $known " != *" $name "* ]]; then echo "gpu_suite: unknown stage '$name' in STAGES/SKIP; known: $known" >&2; exit 2; fi
done
if [[ -z ${SUITE_START:-} && -z ${PLAN:-} ]]; then
  echo "gpu_suite: SUITE_START is not set, so BUDGET counts from now and leaves out what ran before (the install)" >&2
fi
start=${SUITE_START:-$(date +%s)}
budget=${BUDGET:-570}
deadline=$((start + budget))
grace=${KILL_GRACE:-15}
reserve=5  # the last tarball and the closing table
python=${PYTHON:-python3}
out=$(realpath -m "${1:-${OUT:-gpu-suite}}")
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# The allocator setting is each stage's own (8b-long sets it): one inherited from the caller would
# change every stage's reserved memory and break the like-for-like comparison.
inherited_alloc_conf=${PYTORCH_CUDA_ALLOC_CONF:-}
unset PYTORCH_CUDA_ALLOC_CONF

scratch=${SCRATCH:-}
if [[ -z ${PLAN:-} ]]; then
  mkdir -p "$out"
  scratch=${SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/lora-dpo-gpu-suite.XXXXXX")}
  mkdir -p "$scratch"
  : >"$out/tables.md"
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(($(date +%s) - start)) s since SUITE_START (install and call start)"
    echo "stages: $stages${SKIP:+ (skip: $SKIP)}; BUDGET ${budget} s; stage files in $scratch"
    [[ -n $inherited_alloc_conf ]] && echo "PYTORCH_CUDA_ALLOC_CONF=$inherited_alloc_conf was set by the caller; cleared"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
    # Version and location of each package (the image's, or the wheels installed for the run):
    # what `pip show` reports, without pip's own start-up.
    "$python" - <<'EOF'
import sys
from importlib import metadata
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "datasets", "dill", "multiprocess",
             "pyarrow", "fsspec", "pandas", "xxhash"):
    try:
        found = metadata.distribution(name)
        print(name, found.version, found.locate_file(""))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF
    # What datasets needs from the image's pyarrow and fsspec (Requires / Required-by).
    [[ -z ${SMOKE:-} ]] && "$python" -m pip show pyarrow fsspec 2>&1
    df -h /dev/shm "${TMPDIR:-/tmp}" 2>/dev/null
  } | tee "$out/environment.txt"
fi

pack() {  # refresh OUT/suite.tar.gz from SCRATCH without ever leaving a torn archive behind
  tar -czf "$out/suite.tar.gz.partial" -C "$scratch" . && mv "$out/suite.tar.gz.partial" "$out/suite.tar.gz"
}

show() {  # show NAME: print a stage's tables and append them to tables.md
  { echo; echo "### $1"; echo; cat "$scratch/$1.txt"; } | tee -a "$out/tables.md"
}

failed=""
shown=""
stage() {  # stage NAME LIMIT MIN_START COMMAND...: run COMMAND (stdout: the stage's tables) time-boxed
  local name=$1 limit=$2 least=$3
  shift 3
  if [[ " $stages " != *" $name "* || " ${SKIP:-} " == *" $name "* ]]; then return; fi
  if [[ -n ${PLAN:-} ]]; then echo "$name $limit $least"; return; fi
  local left=$((deadline - reserve - $(date +%s)))
  if ((left < least)); then
    echo "== $name: skipped, ${left}s of BUDGET left (it needs ${least}s to start)"
    failed="$failed $name"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local began=$SECONDS
  STAGE_DIR="$scratch" timeout -k "$grace" "$((limit - grace))" "$@" >"$scratch/$name.txt" 2>"$scratch/$name.log"
  local status=$?
  echo "== $name: exit $status after $((SECONDS - began))s"
  if [[ $status != 0 ]]; then
    failed="$failed $name"
    tail -n 5 "$scratch/$name.log"
  fi
  # Killed before it could print: its JSON holds every configuration that finished.
  if ! grep -q '^| impl |' "$scratch/$name.txt" && [[ -s "$scratch/$name.json" ]]; then
    timeout 30 "$python" scripts/bench.py --show "$scratch/$name.json" >>"$scratch/$name.txt" 2>>"$scratch/$name.log"
  fi
  [[ -s "$scratch/$name.txt" ]] && show "$name" && shown="$shown $name"
  pack
}

bench_stage() {  # bench_stage NAME LIMIT MIN_START BENCH_FLAGS...: a stage of scripts/bench.py
  local name=$1 limit=$2 least=$3
  shift 3
  local smoke=()
  if [[ -n ${SMOKE:-} ]]; then  # the tiny shape on the CPU, one step of each kind; later flags win in argparse
    smoke=(--shape tiny --steps 1 --warmup 1 --device cpu)
    [[ " $* " == *" --breakdown-steps "* ]] || smoke+=(--breakdown-steps 1)
  fi
  stage "$name" "$limit" "$least" "$python" scripts/bench.py "$@" ${smoke[@]+"${smoke[@]}"} --json "$scratch/$name.json"
}

# The stages, in the order they run. A new one is a line here and its name in `known` above.
# The comparison: lora-dpo's three layouts and TRL, both reference modes; TRL runs before
# lora-dpo's diagnostics (agreement, breakdown, one profile), which the limit cuts first.
bench_stage 8b "${LIMIT_8B:-330}" 90 --shape 8b --steps 6 --warmup 2 --check-layouts --profile "$scratch/profile-8b"
# The 8 GB-card target: allocator capped at 8 GiB minus the CUDA context, with the allocator
# setting the lora-dpo commands use, for TRL's long-row anchor too (like for like).
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  bench_stage 8b-long "${LIMIT_8B_LONG:-150}" 90 --shape 8b --long-rows --steps 3 --warmup 1 --breakdown-steps 0 \
  --layouts padded,prefix_shared --reference every_step --memory-cap-gib 8
# Memory left under TRL's peak buys speed: the last 8 of 32 layers without checkpointing.
[[ -n ${SMOKE:-} ]] && partial=1 || partial=24  # the tiny shape has 2 layers
bench_stage 8b-partial "${LIMIT_8B_PARTIAL:-90}" 90 --shape 8b --steps 6 --warmup 2 --skip-trl \
  --checkpoint-layers "$partial" --layouts packed_prefix_shared
# torch.compile'd decoder layers; the warm-up steps take the compiles (train, and eval for the reference).
bench_stage 8b-compile "${LIMIT_8B_COMPILE:-240}" 90 --shape 8b --steps 6 --warmup 3 --skip-trl --compile \
  --layouts packed_prefix_shared
bench_stage 1b "${LIMIT_1B:-120}" 60 --shape 1b --steps 8 --warmup 2 --check-layouts
# Collection speed: a random 1B generator, 4 answers of 128 tokens to each of 64 prompts, scored by
# a small random reward model (the model the 1b stage built is reused). Later flags win in argparse.
collect_flags=(--model shape --shape 1b --reward model --prompts 64 -n 4 --max-new-tokens 128 --batch-size 64 --device cuda)
[[ -n ${SMOKE:-} ]] && collect_flags+=(--shape tiny --prompts 4 --max-new-tokens 8 --batch-size 8 --device cpu)
stage collect "${LIMIT_COLLECT:-150}" 60 "$python" scripts/bench_collect.py "${collect_flags[@]}" --json "$scratch/collect.json"
# The memory planner's prediction beside the measured peak (1B, 8B; three lengths; both reference
# modes), then 8/12/16/24 GiB cards emulated, with the micro-batch auto picks trained under each.
plan_flags=(--shapes 1b,8b --lengths 512,1024,2048 --caps 8,12,16,24)
[[ -n ${SMOKE:-} ]] && plan_flags=(--shapes tiny --lengths 24,40,64 --steps 1 --device cpu)
stage plan "${LIMIT_PLAN:-300}" 90 "$python" scripts/plan_check.py "${plan_flags[@]}" --json "$scratch/plan-check.json"
# lora-dpo sweep against separate train runs (scripts/bench_sweep.py, docs/sweep.md): the demo's
# 3-trial beta sweep, each way a process of its own (7 processes, ~15 s of start-up and load each).
[[ -n ${SMOKE:-} ]] && sweep_flags=(--steps 2 --device cpu) || sweep_flags=(--device cuda)
stage sweep "${LIMIT_SWEEP:-240}" 60 "$python" scripts/bench_sweep.py "${sweep_flags[@]}" --json "$scratch/sweep-timing.json"
# FSDP-QLoRA on the one card (docs/distributed.md): the 1B base loaded on the CPU and sharded onto
# the GPU by a process group of one (NCCL takes one rank per GPU); the load's peak against the
# resident size, log-probs and step losses against the plain load, and both ways' step time.
# 90 s to start: bitsandbytes quantizes the sharded base on the CPU (about 1 s per 16M weights on 2 cores).
[[ -n ${SMOKE:-} ]] && fsdp_flags=(--shape tiny --device cpu) || fsdp_flags=(--shape 1b --device cuda)
stage fsdp "${LIMIT_FSDP:-150}" 90 "$python" scripts/fsdp_check.py "${fsdp_flags[@]}" --json "$scratch/fsdp.json"

[[ -n ${PLAN:-} ]] && exit 0
# The main comparison last, where the returned end of the output keeps it.
if [[ " $shown " == *" 8b "* && ${shown##* } != 8b ]]; then
  echo; echo "### 8b (again: the main comparison)"; echo; cat "$scratch/8b.txt"
fi
if [[ -n "$failed" ]]; then
  echo "failed stages:$failed (their logs are in suite.tar.gz)" >&2
  exit 1
fi

#!/usr/bin/env bash
# Everything docs/benchmarks.md reports from a GPU, in one go, most important first: lora-dpo
# against TRL on the 8B shape (with the per-part breakdown, a profile and the layouts' bf16
# agreement), the 8B long-row memory run, 8B with partial checkpointing and with compiled layers,
# then the 1B shape. Each stage has its own time limit and writes its table, JSON and log under
# OUT as soon as it ends (a stage cut off at its limit still reports the configurations it
# finished), so a session that runs out of time keeps what finished. Every stage's tables print last.
#
#   bash scripts/gpu_suite.sh [OUT]          (OUT defaults to $OUT, then ./gpu-suite)
#
# LIMIT_8B, LIMIT_8B_LONG, LIMIT_8B_PARTIAL, LIMIT_8B_COMPILE and LIMIT_1B change the stages'
# limits (seconds); BUDGET (default 540) caps the whole run, shortening or skipping the last
# stages so that everything prints inside one 600 s device call; SKIP="1b 8b-long" leaves stages
# out; SMOKE=1 runs every stage on the tiny shape on the CPU (a check of this script, no timing
# claims). On an offline machine install the wheels first (docs/benchmarks.md).
set -u
budget=${BUDGET:-540}  # a stage may take 30 s past its limit to die: still under a 600 s device call
out=$(realpath -m "${1:-${OUT:-gpu-suite}}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 - <<'EOF' | tee "$out/environment.txt"
import torch, transformers, peft
try:
    import bitsandbytes; bnb = bitsandbytes.__version__
except ImportError:
    bnb = "missing"
try:
    import trl; trl_version = trl.__version__
except ImportError:
    trl_version = "not installed"
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"{card}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bnb}, trl {trl_version}")
EOF

stage() {  # stage NAME LIMIT ARGS...: one bench run, its outputs under $out
  local name=$1 limit=$2
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name: skipped"; return; fi
  local left=$((budget - SECONDS))
  if ((left < 30)); then echo "== $name: skipped, ${left}s of BUDGET left"; failed="$failed $name"; return; fi
  ((limit > left)) && limit=$left
  if [[ -n "${SMOKE:-}" ]]; then
    set -- "$@" --shape tiny --steps 2 --warmup 1 --device cpu  # later flags win in argparse
  fi
  echo "== $name (limit ${limit}s): scripts/bench.py $*"
  local started=$SECONDS
  timeout -k 30 "$limit" python3 scripts/bench.py "$@" --json "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.log"
  local status=$?
  echo "== $name: exit $status after $((SECONDS - started))s"
  if [[ $status != 0 ]]; then
    failed="$failed $name"
    tail -n 5 "$out/$name.log"
  fi
}
failed=""

stage 8b "${LIMIT_8B:-330}" --shape 8b --steps 6 --warmup 2 --check-layouts --profile "$out/profile-8b"
# The 8 GB-card target: peak reserved memory with the allocator setting the lora-dpo commands use.
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  stage 8b-long "${LIMIT_8B_LONG:-100}" --shape 8b --long-rows --steps 3 --warmup 1 --skip-trl \
  --layouts padded,prefix_shared --reference every_step
# Memory left under TRL's peak buys speed: the last 8 of 32 layers without checkpointing.
[[ -n "${SMOKE:-}" ]] && partial=1 || partial=24  # the tiny shape has 2 layers
stage 8b-partial "${LIMIT_8B_PARTIAL:-90}" --shape 8b --steps 6 --warmup 2 --skip-trl --checkpoint-layers "$partial" \
  --layouts packed_prefix_shared
# torch.compile'd decoder layers; the warm-up steps take the compiles (train, and eval for the reference).
stage 8b-compile "${LIMIT_8B_COMPILE:-240}" --shape 8b --steps 6 --warmup 3 --skip-trl --compile \
  --layouts packed_prefix_shared
stage 1b "${LIMIT_1B:-120}" --shape 1b --steps 8 --warmup 2 --check-layouts

for name in 8b 8b-long 8b-partial 8b-compile 1b; do
  if [[ -s "$out/$name.txt" ]]; then
    echo
    echo "### $name"
    cat "$out/$name.txt"
  fi
done
if [[ -n "$failed" ]]; then
  echo "failed stages:$failed (their logs are in $out)" >&2
  exit 1
fi

#!/usr/bin/env bash
# One-call GPU check of the speed targets (issue #5), sized to finish in under 8 minutes:
# about 1.5 minutes of benchmarks, then the whole 240-epoch run, stopped at its 6-minute target.
# The run uses 16 steps per dispatch (the trainer's GPU default is 8; EXTRAS=1 times both).
# EXTRAS=1 replaces the whole run (a second call, about 5 minutes) with a kernel-level profile
# and a part-by-part breakdown of the batch-64 step, two XLA-flag variants, bf16 at batch 64,
# 8 (the default) and 32 steps per dispatch against 16, the ImageNet recipe's step, and the
# eval-mode forward of resnet32x4 at batch 256.
#
# The GPU machines have JAX, flax, optax, orbax and chex but no ml-collections/tensorboardX;
# fetch those wheels once, where pip works, into .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 tensorboardX
# then run on the device machine, from the repository root, carrying .whl:
#   bash scripts/gpu_check.sh            # results in $OUT (or /tmp/gpu_check)
# EPOCHS=2 shortens the whole-run check (a smoke test of this script, e.g. on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
EPOCHS=${EPOCHS:-240}
RUN_LIMIT_S=${RUN_LIMIT_S:-360}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
CFG=configs/cifar_kd.py:res32x4_res8x4
BENCH="python3 scripts/benchmark.py --config $CFG --windows 3 --window-seconds 1 --json $OUT/bench.jsonl"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

# Targets 1 and 2: >= 40,000 img/s at batch 64 fp32; >= 110,000 img/s at batch 2048 bf16.
$BENCH --batch-size 64 --steps-per-dispatch 16 --noeval 2>&1 | tail -n 4
$BENCH --batch-size 2048 --dtype bfloat16 --steps-per-dispatch 4 --noeval 2>&1 | tail -n 4

if [ "${EXTRAS:-0}" = 1 ]; then
  # Where the batch-64 step's time goes: kernel by kernel (trace kept in $OUT/trace.json.gz),
  # and part by part (teacher forward and targets per dispatch, the student's steps alone).
  $BENCH --batch-size 64 --steps-per-dispatch 16 --noeval --breakdown \
      --profile /tmp/gpu_check_trace > "$OUT/profile_b64.log" 2>&1
  grep -A 14 "^per dispatch" "$OUT/profile_b64.log"
  grep -E "^(train_step|part_)" "$OUT/profile_b64.log"
  cp "$(find /tmp/gpu_check_trace -name perfetto_trace.json.gz | head -n 1)" "$OUT/trace.json.gz"
  for flags in "--xla_gpu_enable_command_buffer=" \
               "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
    echo "XLA_FLAGS=$flags"
    XLA_FLAGS="$flags" $BENCH --batch-size 64 --steps-per-dispatch 16 --noeval 2>&1 | tail -n 3
  done
  $BENCH --batch-size 64 --dtype bfloat16 --steps-per-dispatch 16 --noeval 2>&1 | tail -n 3
  # The trainer's default on accelerators is 8 steps per dispatch; the whole run uses 16.
  $BENCH --batch-size 64 --steps-per-dispatch 8 --noeval 2>&1 | tail -n 3
  $BENCH --batch-size 64 --steps-per-dispatch 32 --noeval 2>&1 | tail -n 3
  # The ImageNet recipe's device step (r34 -> r18, batch 512, 224 px, bf16), without input.
  python3 scripts/benchmark.py --config configs/imagenet_kd.py:r34_r18 --dtype bfloat16 \
      --noinput --noeval --windows 3 --window-seconds 1 --json "$OUT/bench.jsonl" 2>&1 | tail -n 3
  # Issue #3's figure: eval-mode forward of resnet32x4 at batch 256 (the eval_student line).
  python3 scripts/benchmark.py --config configs/cifar_vanilla.py:res32x4_res8x4 \
      --config.student.name=resnet32x4 --config.eval_batch_size=256 --batch-size 256 \
      --windows 3 --window-seconds 1 --json "$OUT/bench.jsonl" 2>&1 | tail -n 5
  exit 0
fi

# Target 3: a whole 240-epoch KD+Sort run, per-epoch eval and checkpoints, in <= 6 minutes.
# The run is stopped at the limit: then the target is missed, and the epochs done are reported.
rm -rf /tmp/gpu_check_teacher
python3 - <<'PY'
from flax import nnx
from sortkd_jax import checkpoint, models
checkpoint.save_model("/tmp/gpu_check_teacher", models.create_model(
    "resnet32x4", 100, rngs=nnx.Rngs(0)), arch="resnet32x4", num_classes=100)
PY
rm -rf /tmp/gpu_check_run
start=$(date +%s.%N)
timeout "$RUN_LIMIT_S" python3 scripts/train.py --config $CFG --config.data.name=synthetic \
    --config.teacher.checkpoint=/tmp/gpu_check_teacher --config.num_epochs="$EPOCHS" \
    --config.steps_per_dispatch=16 \
    --config.log_every_steps=100000 --workdir /tmp/gpu_check_run > "$OUT/run.log" 2>&1
rc=$?
end=$(date +%s.%N)
grep -E "Compiled|Best" "$OUT/run.log" | tail -n 2
cp /tmp/gpu_check_run/metrics.jsonl "$OUT/run_metrics.jsonl" 2>/dev/null
python3 - "$EPOCHS" "$(python3 -c "print($end - $start)")" "$rc" <<'PY' | tee -a "$OUT/device.txt"
import json, sys
epochs, wall, rc = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
try:
  records = [json.loads(line) for line in open("/tmp/gpu_check_run/metrics.jsonl")]
except FileNotFoundError:
  records = []
done = [r for r in records if r.get("kind") == "epoch"]
status = "finished" if rc == 0 and len(done) == epochs else f"stopped (rc={rc})"
line = f"whole run: {len(done)}/{epochs} epochs in {wall:.1f} s wall, {status}"
if done:
  per_epoch = sum(r["epoch_time_s"] for r in done) / len(done)
  line += f"; {per_epoch:.2f} s per epoch (train + eval), best top-1 {done[-1]['best_top1']:.2f}"
print(line)
PY

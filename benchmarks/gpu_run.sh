#!/usr/bin/env bash
# The whole GPU benchmark in one short run, on a machine with CUDA PyTorch and no internet.
#
# Prepare (here, once):  bash benchmarks/fetch_wheels.sh        # pycolmap + poselib wheels -> .whl/ (~40 MB)
#                        mkdir -p .bal && cp ../shared/data/bal/*.bz2 .bal/   # BAL problems (2.6 MB, git-ignored)
# Run (device tool):     run(command="bash benchmarks/gpu_run.sh", carry=[".whl", ".bal"], timeout_s=600)
# Afterwards (here):     copy bench_gpu.json / bench_gpu.md, syncs_gpu.md and bench_ba_gpu_*.md from the run's
#                        files to docs/, then
#                        python benchmarks/plot_scaling.py docs/bench_cpu.json docs/bench_gpu.json -o docs/scaling.png
#
# What it runs, in this order (each part's output is written before the next starts):
# 1. host syncs per solver iteration on the GPU (`benchmarks/count_syncs.py --table`: dense,
#    pcg and pcg_explicit LM paths x trivial/Huber x float64/float32 on Ladybug-49, and rotation
#    averaging's IRLS) -> syncs_gpu.md (~1 min);
# 2. BA on the 4 BAL problems (benchmarks/bench_ba.py, dense and pcg, trivial and Huber), on
#    cuda in float64 and float32, and the same code on 2 CPU threads of this machine for the
#    GPU / CPU ratio -> bench_ba_gpu_{float64,float32}.md, bench_ba_cpu2.md (~2-3 min; BA_CPU=0
#    skips the CPU part);
# 3. `torchsfm bench --suite gpu` (synthetic ring50, turntable200, corridor1000 table; corridor
#    100 ... 10,000 scaling curve) with torchsfm on cuda and the pycolmap baselines on the
#    machine's CPU cores, every mapper with the same thread count. The JSON is rewritten after
#    every dataset and the suite stops starting runs after BENCH_BUDGET seconds, so a cut-off run
#    still returns what it measured.
# Environment: BENCH_THREADS (16), BENCH_BUDGET (300 s), BENCH_CAP (per run, 240 s), BENCH_ARGS
# (extra arguments, e.g. "--scaling corridor100,corridor5000"), BAL_DIR (.bal, else
# ../shared/data/bal), BA_CPU (1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-out/gpu}
mkdir -p "$OUTDIR"
if ! python3 -c "import pycolmap, poselib" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run benchmarks/fetch_wheels.sh here and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' || exit 2
import torch, pycolmap, poselib
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("pycolmap", pycolmap.__version__, "poselib", poselib.__version__)
assert torch.cuda.is_available(), "no CUDA device"
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

BAL_DIR=${BAL_DIR:-.bal}
[ -d "$BAL_DIR" ] || BAL_DIR=../shared/data/bal
if ls "$BAL_DIR"/problem-*.bz2 >/dev/null 2>&1; then
  echo "== host syncs per solver iteration (cuda)"
  timeout 150 python3 benchmarks/count_syncs.py --table --device cuda --bal "$BAL_DIR/problem-49-7776-pre.txt.bz2" \
    --md "$OUTDIR/syncs_gpu.md" 2>&1 | grep -v "^[IW][0-9]" || echo "(sync counts stopped)"
  echo "== BA on the BAL problems"
  for dt in float64 float32; do
    timeout 150 python3 benchmarks/bench_ba.py --bal "$BAL_DIR"/problem-*.bz2 --ceres '' --solvers dense,pcg \
      --device cuda --dtype "$dt" --warmup --json "$OUTDIR/bench_ba_gpu_$dt.json" --md "$OUTDIR/bench_ba_gpu_$dt.md" \
      2>&1 | grep -v "^[IW][0-9]" | tail -n 20 || echo "(BAL on cuda, $dt, stopped)"
  done
  if [ "${BA_CPU:-1}" = 1 ]; then  # the same code on 2 CPU threads of this machine: the ratio's baseline
    OMP_NUM_THREADS=2 timeout 200 python3 benchmarks/bench_ba.py --bal "$BAL_DIR"/problem-*.bz2 --ceres '' \
      --solvers dense,pcg --device cpu --threads 2 --json "$OUTDIR/bench_ba_cpu2.json" --md "$OUTDIR/bench_ba_cpu2.md" \
      2>&1 | grep -v "^[IW][0-9]" | tail -n 20 || echo "(BAL on 2 CPU threads stopped)"
  fi
else
  echo "no BAL problems in $BAL_DIR: sync counts and BAL timings skipped (copy ../shared/data/bal/*.bz2 to .bal/)"
fi

python3 -m torchsfm bench --suite gpu --device cuda --threads "${BENCH_THREADS:-16}" \
  --budget "${BENCH_BUDGET:-300}" --time-cap "${BENCH_CAP:-240}" --work-dir /tmp/bench \
  --json "$OUTDIR/bench_gpu.json" --md "$OUTDIR/bench_gpu.md" --plot "$OUTDIR/scaling_gpu.png" \
  --note "GPU machine, one run; baselines on its CPU cores" ${BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/bench_gpu.log" | grep -v "^[IW][0-9]"
rc=${PIPESTATUS[0]}
cat "$OUTDIR/syncs_gpu.md" "$OUTDIR"/bench_ba_gpu_*.md "$OUTDIR/bench_gpu.md" 2>/dev/null
exit "$rc"

#!/usr/bin/env bash
# The whole GPU benchmark in one short run, on a machine with CUDA PyTorch and no internet.
#
# Prepare (here, once):  bash benchmarks/fetch_wheels.sh        # pycolmap + poselib wheels -> .whl/ (~40 MB)
# Run (device tool):     run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
# Afterwards (here):     copy bench_gpu.json / bench_gpu.md from the run's files to docs/, then
#                        python benchmarks/plot_scaling.py docs/bench_cpu.json docs/bench_gpu.json -o docs/scaling.png
#
# What it runs: `torchsfm bench --suite gpu` (synthetic ring50, turntable200, corridor1000 table;
# corridor 100 ... 10,000 scaling curve) with torchsfm on cuda and the pycolmap baselines on the
# machine's CPU cores, every mapper with the same thread count. The JSON is rewritten after
# every dataset and the suite stops starting runs after BENCH_BUDGET seconds, so a cut-off run
# still returns what it measured. Environment: BENCH_THREADS (16), BENCH_BUDGET (480 s),
# BENCH_CAP (per run, 300 s), BENCH_ARGS (extra arguments, e.g. "--scaling corridor100,corridor5000").
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
python3 -m torchsfm bench --suite gpu --device cuda --threads "${BENCH_THREADS:-16}" \
  --budget "${BENCH_BUDGET:-480}" --time-cap "${BENCH_CAP:-300}" --work-dir /tmp/bench \
  --json "$OUTDIR/bench_gpu.json" --md "$OUTDIR/bench_gpu.md" --plot "$OUTDIR/scaling_gpu.png" \
  --note "GPU machine, one run; baselines on its CPU cores" ${BENCH_ARGS:-} 2>&1 | tee "$OUTDIR/bench_gpu.log" | grep -v "^[IW][0-9]"
rc=${PIPESTATUS[0]}
cat "$OUTDIR/bench_gpu.md" 2>/dev/null
exit "$rc"

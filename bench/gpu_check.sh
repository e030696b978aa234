#!/usr/bin/env bash
# The GPU checks of issue 14 in ONE call of a lent machine (about 8 minutes on an H100):
#   1. the GPU-marked tests (pytest -m gpu: tiny models on CUDA; bf16 sessions on one engine, CUDA graphs
#      keeping one shape over a stream, at most one synchronising call a hop, compiled == eager frames);
#   2. bench/sessions.py, full dims, bf16, N = 1, 8, 16, 32, 48 sessions (eager);
#   3. the same with --compile (CUDA graphs) for N = 1, 8, 32, as far as its time allows.
# Each step has its own time cap (seconds, overridable: TESTS_S, EAGER_S, COMPILED_S); a bench stopped by
# its cap keeps the rows it finished (the JSON is rewritten after every N).
#
# How to run it (from the repository root of the checkout the device tool sends, i.e. after merging):
#   the machine has python3 with torch, transformers, numpy, opencv, pillow, pyyaml, tqdm and pytest
#   (/work/.library/device/KINDS.md) but not PyAV, and it cannot fetch anything. The local .venv (2.3 GB)
#   cannot travel (64 MiB), so carry PyAV's wheel instead, fetched here once:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 -d .whl av==18.1.0          # 36 MB
#   then one device call:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# A dry run of the plumbing on a CPU: DEVICE=cpu DIMS=tiny EAGER_SESSIONS=1,2 COMPILED_S=0 bash bench/gpu_check.sh
# Output under $OUT (bench/results/gpu elsewhere): env.txt, tests.log, sessions_eager.json/.log,
# sessions_compiled.json/.log, summary.txt (each step's exit status: 0 ok, 124 stopped by its cap).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DIMS=${DIMS:-full}

if ! $PY -c "import av" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, av; print('torch', torch.__version__, 'transformers', transformers.__version__,
'av', av.__version__, 'cuda', torch.cuda.is_available())"; uptime; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! $PY -c "import av, torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check: needs python3 with torch seeing a GPU and PyAV (carry .whl, see the top of this file)" >&2
    exit 2
fi

step() {   # step NAME SECONDS COMMAND...: run it under its cap, log it, record its exit status
    local name=$1 cap=$2; shift 2
    [ "$cap" -gt 0 ] || return 0
    echo "== $name (cap ${cap}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

step tests "${TESTS_S:-150}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py
step sessions_eager "${EAGER_S:-140}" $PY bench/sessions.py --dims "$DIMS" --device "$DEVICE" \
    --sessions "${EAGER_SESSIONS:-1,8,16,32,48}" --out "$OUT/sessions_eager.json"
step sessions_compiled "${COMPILED_S:-170}" $PY bench/sessions.py --dims "$DIMS" --device "$DEVICE" --compile \
    --sessions "${COMPILED_SESSIONS:-1,8,32}" --out "$OUT/sessions_compiled.json"
cat "$OUT/summary.txt"

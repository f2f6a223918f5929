#!/usr/bin/env bash
# The checks CI's 2-core CPU machine cannot do, as one device call (issue 3): the CUDA tests, 1 vs 8 evaluation
# workers on 16 cores (target: >= 5x the evaluations per minute), train -> search -> apply with --device cuda, and
# what the search's driver adds when it feeds 8 workers (last: it is the step to lose if time runs short).
#
# The device machine has torch, onnxruntime and onnx but not optuna, tensorly, fvcore, torch-pruning, mlxtend,
# plotly or Ray; the others travel as wheels for its Python 3.12 in .whl/ (ignored by git). Prepare them once,
# in the repo root of a session whose `status` says it can start a machine:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
#     optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 colorlog==6.12.0 cmaes tensorly==0.10.0 \
#     torch-pruning==1.6.1 termcolor==3.3.0 yacs==0.1.8 mlxtend==0.25.0 plotly==7.1.0 narwhals==2.29.0
#   python3 -m pip wheel --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10   # source-only on PyPI
# then run it with the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540).
# The log comes back as $OUT/device_check.log. Here (no GPU): SKIP_WHEELS=1 DEVICE=cpu bash benchmarks/device_check.sh
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
    && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site "$REPO" \
    || { echo "install failed"; exit 1; }
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
WORK=$(mktemp -d) && cd "$WORK"  # not the repo root, whose squeezer/ folder would shadow the installed package
step() { echo; echo "=== $* ($(date +%T))"; }
status=0
step machine
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch, onnxruntime, optuna, squeezer; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| onnxruntime', onnxruntime.__version__, '| optuna', optuna.__version__)" || exit 1

step "CUDA tests (tests/test_eval_evaluate.py::test_cuda_matches_cpu, the forward-pass MAC count, the CLI's device checks)"
python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_eval_evaluate.py" "$REPO/tests/test_mac_count.py" \
  "$REPO/tests/test_cli_errors.py" -k "cuda" || status=1

step "scaling: 1 vs 8 local workers (target: 8 give >= 5x)"
timeout 240 python3 "$REPO/benchmarks/eval_scaling.py" --n 48 --workers 1 8 --backends local || status=1

step "train -> search -> apply with --device $DEVICE"
timeout 60 squeezer train --device "$DEVICE" --steps 300 --out r20.pt || status=1
timeout 150 squeezer search --model r20.pt --device "$DEVICE" --budget "macs<=50%" --trials 8 --knobs prune,w_bits \
  --recovery kd --latency measure --repair --workers 2 --out run || status=1  # two worker processes share the GPU
timeout 60 squeezer front run || status=1
best=$(python3 -c "import json; rows=json.load(open('run/front.json'))['rows']; print(max(rows, key=lambda r: r['accuracy'])['number'])")
timeout 90 squeezer apply run --trial "$best" --device "$DEVICE" --out small.pt --onnx small.onnx \
  || status=1
ls -la small.pt small.onnx 2>/dev/null

step "orchestration with 8 local workers (target: <= 5%; one driver asks and records for all eight)"
timeout 120 python3 "$REPO/benchmarks/search_orchestration.py" --trials 200 --workers 8 --phases || status=1
step "done: status $status"
exit $status

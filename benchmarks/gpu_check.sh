#!/usr/bin/env bash
# The GPU check, in one command, for a lent CUDA machine (about 5 minutes).
#
# The GPU machine has torch, torchvision, timm and scikit-learn and no package
# registry, so this installs nothing from the network: skdfm itself with
# `pip install --no-deps -e .`, and pytest only from wheels carried along in
# ./.wheels (made here with `pip download -d .wheels pytest`; without them the tests
# are skipped and said so). Then it runs the CUDA-marked tests and
# benchmarks/bench_gpu.py (transform float32 / bfloat16 / float16, head on the
# device vs the CPU, score agreement and AUROC per precision) and prints one summary.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, in the repository
#   SKDFM_GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
device="${SKDFM_GPU_CHECK_DEVICE:-cuda}"
summary=()

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
EOF

echo "== install skdfm (no dependencies)"
if pip install -q --no-deps --no-build-isolation -e . ; then
    summary+=("install: ok")
else
    summary+=("install: FAILED")
fi
if ! python -c "import pytest" 2>/dev/null && [ -d .wheels ]; then
    pip install -q --no-index --find-links .wheels pytest || true
fi

echo "== CUDA-marked tests"
if python -c "import pytest" 2>/dev/null; then
    timeout 240 python -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 \
        | tee /tmp/skdfm-cuda-tests.txt | tail -25
    status=${PIPESTATUS[0]}
    counts=$(tail -1 /tmp/skdfm-cuda-tests.txt)
    case "$status" in
        0) summary+=("cuda tests: exit 0: $counts") ;;
        5) summary+=("cuda tests: none collected") ;;
        124) summary+=("cuda tests: TIMED OUT after 240 s") ;;
        *) summary+=("cuda tests: FAILED (pytest exit $status): $counts") ;;
    esac
else
    summary+=("cuda tests: skipped (no pytest here; carry .wheels made by 'pip download -d .wheels pytest')")
fi

echo "== benchmark (benchmarks/bench_gpu.py --device $device)"
extra=()
[ "$device" = "cpu" ] && extra=(--quick)
timeout 300 python benchmarks/bench_gpu.py --device "$device" "${extra[@]}" 2>&1 \
    | tee /tmp/skdfm-bench-gpu.txt
status=${PIPESTATUS[0]}
if [ "$status" = 0 ]; then
    summary+=("benchmark: ok")
else
    summary+=("benchmark: FAILED (exit $status)")
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
grep -E "transform|head fit|pipeline" /tmp/skdfm-bench-gpu.txt || true

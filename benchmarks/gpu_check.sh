#!/usr/bin/env bash
# One prepared GPU check (see benchmarks/README.md): the cuda-marked tests (the engine on CUDA; the
# callback under NCCL at world size 1, FSDPStrategy with full state dicts, FSDP2 bf16 compute over fp32
# sharded parameters, DeepSpeed stage 3's refusal where deepspeed imports), then the GPU engine
# benchmark. Runs with the machine's own python3 (torch with CUDA), the package from this tree.
# Usage: bash benchmarks/gpu_check.sh [tests|bench|all]   (logs go to $OUT, default /tmp/gpu-check)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
what=${1:-all}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$OUT/gpu.txt"
# package metadata (the model card reads our version); offline, no dependencies
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.txt" 2>&1 || true
if [ "$what" != bench ]; then
  # every test file with a cuda-marked test, in tests/ and its folders (tests/merging/..., tests/lightning/...)
  files=$(grep -rl --include='test_*.py' "mark.cuda" tests/ | sort | tr '\n' ' ')
  python3 -m pytest -q -m cuda -p no:cacheprovider --timeout=300 --continue-on-collection-errors ${TEST_FILES:-$files} 2>&1 | tee "$OUT/cuda-tests.txt" | tail -40
fi
if [ "$what" != tests ]; then
  python3 benchmarks/bench_engine.py --device cuda --params 200e6 --tasks 8 --case flat 2>&1 | tee "$OUT/bench-cuda-200m.txt"
  python3 benchmarks/bench_engine.py --device cuda --params 20e6 --tasks 8 --case both 2>&1 | tee "$OUT/bench-cuda-20m.txt"
fi

#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU and a CUDA build of torch
# (and Triton) already installed: build the extension with its CUDA kernels, run the test suite
# on CUDA tensors, run compute-sanitizer (memcheck; racecheck on the reduction kernels) over one
# small test per kernel, then the benchmarks. Logs and results go to $RESULTS_DIR
# (default benchmarks/results/gpu); a failing step is reported and the next one still runs.
#
#   benchmarks/gpu_suite.sh [all|build|test|sanitize|bench]...   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${RESULTS_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
steps=("${@:-all}")
status=0

want() { [[ " ${steps[*]} " == *" all "* || " ${steps[*]} " == *" $1 "* ]]; }
run() {  # run NAME CMD...: logs to $OUT_DIR/NAME.log, remembers a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT_DIR/device.txt"

if want build; then
  # CUTLASS's headers (the conv kernels) come with the pinned nvidia-cutlass wheel; a machine
  # without network installs it from $WHEELS_DIR (pip download nvidia-cutlass==4.2.0.0 there).
  $PY -c "import cutlass_library" 2>/dev/null || \
    run wheels $PY -m pip install --no-deps --no-index --find-links "${WHEELS_DIR:-wheels}" \
      nvidia-cutlass==4.2.0.0
  # sm_90 only on Hopper: half the nvcc time of the default 80;90.
  cc=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  RESNET_FAST_CUDA_ARCHS=${RESNET_FAST_CUDA_ARCHS:-$cc} MAX_JOBS=${MAX_JOBS:-16} \
    run build $PY -m pip install --no-deps --no-build-isolation -e .
  run backends $PY -c "import resnet_fast as rf; print('cuda backends:', rf.available_backends('cuda')); print('cuda:', rf.unavailable_reason('cuda', 'cuda')); print('triton:', rf.unavailable_reason('triton', 'cuda'))"
fi
if want test; then
  run test $PY -m pytest -q -p no:cacheprovider tests
fi
if want sanitize; then
  # Every kernel (training and eval forward, backward; each residual mode; both layouts; both
  # GPU backends) on two small shapes: 2x3x1x1 and 3x33x5x7 (masked edges).
  small=(-m resnet_fast verify --device cuda --shapes 2 --dtypes float32 bfloat16)
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $PY "${small[@]}"
  run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY "${small[@]}" \
    --ops dual_batch_norm_add_relu --layouts channels_last
fi
if want bench; then
  run bench_bn_act $PY benchmarks/bench_bn_act.py --device cuda --modes train,fwd,bwd,eval --out "$OUT_DIR"
  run bench_conv_bn_act $PY benchmarks/bench_conv_bn_act.py --device cuda --out "$OUT_DIR"
fi
exit $status

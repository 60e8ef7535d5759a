#!/usr/bin/env bash
# What a person with an NVIDIA GPU or a Jetson runs to prove leukoedge's GPU path (under 10 minutes):
#   1. the CUDA preprocessing kernels against the CPU reference (pytest, tolerances in leukoedge/preprocess/cuda.py);
#   2. the TensorRT backend and engine export on the real TensorRT (the tests CI runs on a fake one);
#   3. engines built per precision, Detector on TensorRT vs ONNX Runtime on samples/ (labels, verdicts), timings.
# It ends with what it could not test and why. Usage: scripts/gpu_check.sh [--runs N] [--precisions fp32,fp16,int8]
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
not_tested=()

echo "== environment"
python - <<'PY'
import importlib.util, platform, shutil
print("python", platform.python_version(), platform.machine())
for package in ("tensorrt", "pycuda", "onnxruntime", "onnx", "torch"):
    spec = importlib.util.find_spec(package)
    version = getattr(__import__(package), "__version__", "?") if spec else "absent"
    print(f"{package:12} {version}")
print("nvcc        ", shutil.which("nvcc") or "not on PATH (JetPack: export PATH=/usr/local/cuda/bin:$PATH)")
try:
    from leukoedge.backends.tensorrt import gpu_identity, import_pycuda
    print("gpu         ", gpu_identity(import_pycuda()))
except Exception as error:  # reported, and the steps below say what it stops
    print("gpu          none usable:", error)
PY

run_step() {  # name, command...
    local name="$1"; shift
    echo; echo "== $name"
    local started=$SECONDS
    "$@"
    local rc=$?
    echo "-- $name: exit $rc in $((SECONDS - started)) s"
    if [ $rc -eq 5 ]; then not_tested+=("$name: no test ran (all skipped or deselected)"); elif [ $rc -ne 0 ]; then status=1; fi
}

run_step "CUDA kernels vs the CPU reference" python -m pytest -q -rs tests/runtime/test_preprocess_cuda.py tests/runtime/test_detector_cuda.py
# -rs lists each skip with its reason: on a machine without a GPU these say what is missing.
run_step "TensorRT backend and export on the real TensorRT" python -m pytest -q -rs -k "real and not tiny" tests/runtime/test_tensorrt_backend.py tests/export/test_tensorrt.py
run_step "engines per precision, Detector TensorRT vs ONNX Runtime, timings" python scripts/gpu_check.py "$@"

echo
echo "== not tested by this script"
echo "  - the tiny-bundle variants (need torch and ../shared/data; CI runs them on the fake TensorRT)"
echo "  - INT8 accuracy: the int8 engines here come from sample-calibrated files; the gated ones come from"
echo "    leukoedge calibrate --data DIR --bundle B --target tensorrt (CPU, ONNX Runtime) and export --engine --int8"
for reason in "${not_tested[@]}"; do echo "  - $reason"; done
exit $status

#!/usr/bin/env bash
# Everything that needs a GPU, in one command for a short-lived CUDA machine with torch,
# Triton and pytest already installed and no network (no install, the project through
# PYTHONPATH):
#   1. the kernel and model tests, compiled on the GPU (tests/conftest.py builds their
#      tensors on CUDA and leaves the interpreter off), bf16 and fp16 cases included, and
#      the rotary embedding's autograd Function against its reference;
#   2. benchmarks/bench_kernels.py at realistic shapes in bf16.
# Results land in $OUT (default benchmarks/results): kernels_gpu.json, tests_gpu.json
# (the GPU's name, what passed and what failed), and the logs. Each stage has its own
# time limit so that the whole run stays under 8 minutes. STAGES="tests" or "bench" runs one
# (the tests can share the GPU with other work; the benchmark wants it alone).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   PYTHON=.venv/bin/python QUICK=1 bash benchmarks/gpu_check.sh   # plumbing check on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -n "${QUICK:-}" ] || unset TRITON_INTERPRET  # compiled kernels on the GPU
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    2>&1 | tee "$DEST/gpu_check_device.txt" || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$DEST/gpu_check_device.txt"

STAGES=${STAGES:-tests bench}
if [[ " $STAGES " == *" tests "* ]]; then
echo "== kernel and model tests, compiled"
TESTS="tests/test_kernels_moe.py tests/test_kernels_moe_backward.py tests/test_kernels_attention.py
       tests/test_kernels_attention_backward.py tests/test_training_through_kernels.py
       tests/test_attention.py::test_rope_and_its_gradient_equal_the_chunk_and_cat_reference"
[ -n "${QUICK:-}" ] && TESTS="tests/test_kernels_moe.py"
timeout "${TEST_LIMIT:-210}" $PY -m pytest -q -rfEs -p no:cacheprovider $TESTS \
    --junitxml="$DEST/tests_gpu.xml" 2>&1 | tee "$DEST/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
$PY - "$DEST" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
import torch
dest = sys.argv[1]
try:
    root = ET.parse(f"{dest}/tests_gpu.xml").getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"no test report ({e}): the tests did not finish; see gpu_tests.log")
cases = list(root.iter("testcase"))
def outcome(case):
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"
counts = {}
for case in cases:
    counts[outcome(case)] = counts.get(outcome(case), 0) + 1
report = dict(command="bash benchmarks/gpu_check.sh",
              device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              torch=torch.__version__, triton=__import__("triton").__version__, counts=counts,
              seconds=sum(float(c.get("time", 0)) for c in cases),
              not_passed=[dict(test=f"{c.get('classname')}::{c.get('name')}", outcome=outcome(c),
                               message=(c.find(outcome(c)).get("message") or "")[:400])
                          for c in cases if outcome(c) != "passed"])
with open(f"{dest}/tests_gpu.json", "w") as f:
    json.dump(report, f, indent=2)
print("tests:", counts)
EOF
fi

if [[ " $STAGES " == *" bench "* ]]; then
echo "== kernel benchmark, bf16"
BENCH_ARGS=${BENCH_ARGS:-}
[ -n "${QUICK:-}" ] && BENCH_ARGS="--quick --dtype float16 --only dispatch decode"
timeout "${BENCH_LIMIT:-240}" $PY benchmarks/bench_kernels.py $BENCH_ARGS \
    --out "$DEST/kernels_gpu.json" 2>&1 | tee "$DEST/bench_kernels.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status

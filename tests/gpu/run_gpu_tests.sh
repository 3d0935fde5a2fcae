#!/usr/bin/env bash
# Run all of tests/gpu in one go on the GPU machine, within ~2.5 minutes: the `gpu`-marked tests
# (engine on CUDA vs CPU, graphs, memory plan, model-level parity) and the kernel tests, which
# run real Triton kernels there (48 of them took 49 s on an H200 this session).
#
#   OUT=/some/dir bash tests/gpu/run_gpu_tests.sh     # from the repository root
#
# MARK selects tests (default: all of tests/gpu); BUDGET_S bounds the pytest run (default 240).
# Writes $OUT/gpu_tests.log (pytest output) and $OUT/gpu_tests.xml (JUnit), prints a short
# per-test table last. Exit status: pytest's (124 when the time budget ran out: pytest is
# interrupted with SIGINT, so the report of the tests that ran is still written).
set -u
OUT="${OUT:-/tmp/valora_gpu_tests}"
BUDGET_S="${BUDGET_S:-240}"
MARK="${MARK:-gpu or not gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader > "$OUT/gpu_device.txt" 2>&1
timeout -s INT -k 15 "$BUDGET_S" python3 -m pytest tests/gpu -m "$MARK" -v -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" -o junit_family=xunit2 --durations=10 \
    > "$OUT/gpu_tests.log" 2>&1
rc=$?
grep -E "FAILED|ERROR|Error|Interrupt|assert|passed|failed" "$OUT/gpu_tests.log" | tail -n 40
python3 - "$OUT/gpu_tests.xml" "$rc" <<'PY'
import sys
import xml.etree.ElementTree as ET

path, rc = sys.argv[1], sys.argv[2]
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as exc:
    print(f"no JUnit report ({exc}); pytest exit status {rc}")
    sys.exit(0)
counts: dict[str, int] = {}
rows = []
for case in root.iter("testcase"):
    if case.get("name") is None:
        continue  # the entry pytest leaves for an interrupted test
    result = "passed"
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            result = tag
    counts[result] = counts.get(result, 0) + 1
    name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
    rows.append((result != "passed", float(case.get("time", 0)), name, result))
rows.sort(reverse=True)
shown = [r for r in rows if r[0]] + [r for r in rows if not r[0]][:10]
print(f"{'test (not passed, then the 10 slowest)':<78}{'result':>8}{'s':>8}")
for _, seconds, name, result in shown:
    print(f"{name[:77]:<78}{result:>8}{seconds:>8.2f}")
print("summary:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), f"(exit {rc})")
PY
exit "$rc"

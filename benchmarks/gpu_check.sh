#!/usr/bin/env bash
# The GPU check: one script that installs the carried wheels, lets Jittor build for CUDA and runs
# every CUDA check of the project, on a machine without internet.
#
#     bash benchmarks/gpu_wheels.sh        # here, with internet: wheels into .gpu_wheels/
#     bash benchmarks/gpu_check.sh         # there, from the repository root
#
# Checks, in order (each under its own timeout, all under one time budget):
#   diagnostics   GPU, driver, nvcc, Python, memory, where the NVIDIA pip libraries are
#   install       .gpu_wheels/*.whl into a private folder first on PYTHONPATH (numpy 1.26 for
#                 Jittor; the machine's own numpy 2 stays installed for everything else)
#   packages      the machine's matplotlib, Pillow, tqdm, pytest and torch load beside numpy 1.26
#   jittor        python -m utils.env_check: Jittor's first build for CUDA (patched for CUDA 13
#                 by utils.cuda_setup); must report device=cuda
#   cuda_tests    tests/test_cuda.py (fused op vs float64 reference and finite differences,
#                 fp32/fp64/fp16, 2D and 3D, AMP, CCNet R=2 CUDA vs CPU), the kernel compile
#                 test and the CUDA test of tests/test_cc_attention.py
#   train         train.py --dataset demo, 50 iterations; test: test.py on its checkpoint
#   train_amp     the same with --amp
#   bench_cca, bench_model, bench_model_amp   benchmarks/cca.py and model.py (+ --amp) on CUDA
# `gpu_check.sh checks` runs the set-up and the checks, `gpu_check.sh benchmarks` the set-up and the
# benchmarks (two calls of the device's 10 minutes); no argument runs everything.
# Results: $OUT/gpu_check.json (rewritten after every check) and $OUT/gpu_check.log (all
# output); one line per check on stdout; exit status 1 when a check failed, timed out or did
# not run. CCNET_REQUIRE_CUDA=1 makes every step fail instead of falling back to the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu_check_out}
WHEELS=${GPU_WHEELS:-$REPO/.gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/ccnet-gpu-site}
WORK=${GPU_CHECK_WORK:-/tmp/ccnet-gpu-work}
BUDGET=${GPU_CHECK_BUDGET:-450}          # seconds for all checks: the machine gives 8 minutes
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
TABLE=$WORK/results.tsv
: > "$LOG"
: > "$TABLE"
START=$(date +%s)
FAILED=0
PARTS=${1:-all}                          # checks | benchmarks | all

wanted() { [ "$PARTS" = all ] || [ "$PARTS" = "$1" ]; }
case $PARTS in all|checks|benchmarks) ;; *) echo "usage: gpu_check.sh [checks|benchmarks|all]" >&2; exit 2 ;; esac

write_json() {
    "$PYTHON" - "$TABLE" "$OUT/gpu_check.json" "$START" <<'EOF'
import json, sys, time
table, target, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
checks = []
for line in open(table):
    name, status, seconds, detail = line.rstrip("\n").split("\t", 3)
    checks.append({"check": name, "status": status, "seconds": float(seconds), "detail": detail})
ok = all(c["status"] in ("pass", "skipped") for c in checks)
json.dump({"ok": ok, "elapsed_s": round(time.time() - start, 1), "checks": checks},
          open(target + ".tmp", "w"), indent=1)
import os; os.replace(target + ".tmp", target)
EOF
}

record() {   # name status seconds detail
    local detail=${4//$'\t'/ }
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${detail//$'\n'/ }" >> "$TABLE"
    printf '%-8s %-16s %6ss  %s\n' "$(echo "$2" | tr a-z A-Z)" "$1" "$3" "${detail//$'\n'/ }"
    case $2 in pass|skipped) ;; *) FAILED=1 ;; esac
    write_json
}

# check NAME TIMEOUT DETAIL_PATTERN COMMAND...: run COMMAND (output to the log and to
# $WORK/NAME.out), record pass / fail / timeout with the last output line matching the pattern.
check() {
    local name=$1 limit=$2 pattern=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 15 ]; then
        record "$name" not_run 0 "out of time (budget ${BUDGET}s)"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "===== $name (timeout ${limit}s): $*" >> "$LOG"
    local t0=$(date +%s%N) rc
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$WORK/$name.out" 2>&1   # functions too
    rc=$?
    cat "$WORK/$name.out" >> "$LOG"
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    local seconds="$(( ms / 1000 )).$(( ms % 1000 / 100 ))"
    local detail=$(grep -E -- "$pattern" "$WORK/$name.out" | tail -n 1 | cut -c1-300)
    echo "===== $name: exit $rc after ${seconds}s" >> "$LOG"
    if [ $rc -eq 0 ]; then
        record "$name" pass "$seconds" "$detail"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" timeout "$seconds" "killed after ${limit}s; last: $(tail -n 1 "$WORK/$name.out" | cut -c1-200)"
    else
        record "$name" fail "$seconds" "exit $rc: ${detail:-$(tail -n 1 "$WORK/$name.out" | cut -c1-200)}"
    fi
    return $rc
}

diagnostics() {
    local gpu nvcc_release
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
    nvcc_release=$(nvcc --version 2>&1 | grep -o "release [0-9.]*")
    command -v nvcc g++; g++ --version | head -n 1
    ls /usr/bin/python3*-config "$(dirname "$(command -v "$PYTHON")")"/python3*-config 2>/dev/null
    "$PYTHON" - <<'EOF'
import glob, os, sys
import numpy
print("numpy (machine):", numpy.__version__)
for entry in sys.path:
    for lib in sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib"))):
        print("pip CUDA libraries:", lib, " ".join(sorted(os.listdir(lib)))[:300])
EOF
    echo "summary: GPU ${gpu:-none} | nvcc ${nvcc_release:-none} | $("$PYTHON" --version 2>&1) |" \
         "$(nproc) cpus, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
}

install_wheels() {
    ls "$WHEELS"/*.whl || return 1
    rm -rf "$SITE"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl &&
    PYTHONPATH="$SITE" "$PYTHON" -c "
import numpy, os
assert numpy.__version__ == '1.26.4' and numpy.__file__.startswith('$SITE'), (numpy.__version__, numpy.__file__)
assert os.path.isdir('$SITE/jittor') and os.path.isdir('$SITE/jittor_utils')
print('installed: numpy', numpy.__version__, 'and jittor into $SITE')"
}

jittor_on_cuda() {
    local out rc
    out=$("$PYTHON" -m utils.env_check 2>&1); rc=$?
    echo "$out"
    [ $rc -eq 0 ] && grep -q "ccnet-jittor: device=cuda" <<< "$out"
}

train_and_report() {   # WORKDIR [train flags]: 50 demo iterations, then the final validation line
    local dir=$1; shift
    rm -rf "$dir"
    "$PYTHON" train.py --dataset demo --iters 50 --eval-interval 0 --eval-max-images 10 --save-interval 50 \
        --log-interval 10 --no-progress --work-dir "$dir" "$@" || return 1
    "$PYTHON" - "$dir" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1] + "/log.jsonl")]
train = [r for r in records if r.get("type") == "train"]
val = [r for r in records if r.get("type") == "val"]
assert train and val, "log.jsonl has no training or validation records"
print(f"train summary: loss {train[0]['loss']:.4f} (iter {train[0]['iter']}) -> {train[-1]['loss']:.4f} "
      f"(iter {train[-1]['iter']}), step_time of the last window {train[-1]['step_time']:.3f}s, "
      f"val mIoU {100 * val[-1]['mIoU']:.2f} on 10 images")
EOF
}

export -f diagnostics install_wheels jittor_on_cuda train_and_report
export PYTHON SITE WHEELS

check diagnostics 60 "^summary:" diagnostics
if check install 120 "installed" install_wheels; then
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
# the machine's own packages, built for its numpy 2, must load with numpy 1.26 first on the path
check packages 60 "loaded" "$PYTHON" -c "import matplotlib, PIL, tqdm, pytest, torch; print('loaded: matplotlib', matplotlib.__version__, 'torch', torch.__version__)"
export CCNET_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1
check jittor 300 "ccnet-jittor:" jittor_on_cuda
if wanted checks; then
    NVIDIA_TF32_OVERRIDE=0 check cuda_tests 240 "passed|failed|error" "$PYTHON" -m pytest -q -s -rs -p no:cacheprovider \
        tests/test_cuda.py tests/test_cca_cuda_compile.py "tests/test_cc_attention.py::test_cuda_kernels_match_reference"
    check train 150 "train summary" train_and_report "$WORK/train"
    check test 90 "mIoU|miou" "$PYTHON" test.py --checkpoint "$WORK/train/latest.pkl" --dataset demo --max-images 10 --no-progress
    check train_amp 150 "train summary" train_and_report "$WORK/train_amp" --amp
fi
if wanted benchmarks; then
    check bench_cca 180 "." "$PYTHON" benchmarks/cca.py --device cuda --json "$OUT/cca_cuda.json"
    check bench_model 180 "." "$PYTHON" benchmarks/model.py --device cuda --json "$OUT/model_cuda.json"
    check bench_model_amp 180 "." "$PYTHON" benchmarks/model.py --device cuda --amp --json "$OUT/model_cuda_amp.json"
fi

echo "results: $OUT/gpu_check.json, log: $LOG (elapsed $(( $(date +%s) - START ))s)"
exit $FAILED

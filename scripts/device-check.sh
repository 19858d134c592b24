#!/usr/bin/env bash
# The GPU checks and figures of issue #13 (Deliver 4) in one prepared run, for a session lent
# a GPU machine (15 minutes of device time, every try counted): run from the repository root
#
#     bash scripts/device-check.sh
#
# Steps (each time-limited; each runs even if one before failed):
#   install  this checkout into the machine's own python3, no download, no dependencies
#            (the machine's torch, numpy, scipy, mpmath, tqdm, matplotlib, pytest)
#   tests    the CUDA tests: every kernel and relu_moments on the GPU under
#            torch.cuda.set_sync_debug_mode("error"), `nm bench floor --device cuda`, and
#            layer-wise propagation on the GPU against the CPU (tests/test_propagate.py)
#   floorN   `nm bench floor --device $DEVICE --p N` for N in $SIZES, float64 and float32,
#            then `nmgen check-points` of its float64 entries against mpmath (30 digits)
#
# Writes under $OUT (else results/device-check): device-check.log (every step's output),
# floor<N>.md (each table, as the README shows them) and device-check.tgz (all of it, JSON
# included). Exit status: the number of failed steps. Environment (defaults): DEVICE (cuda),
# SIZES ("1024 4096"), REPEATS (3), CHECK_ENTRIES (20: off-diagonal entries checked against
# mpmath per size), PY (python3), INSTALL (1; 0 skips the install step). On a machine without
# a GPU, `DEVICE=cpu SIZES=64 PY=.venv/bin/python bash scripts/device-check.sh` runs the same
# steps (the CUDA tests skip; tests/test_device_check.py runs it so).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-results/device-check}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
py="${PY:-python3}"
device="${DEVICE:-cuda}"
sizes="${SIZES:-1024 4096}"
repeats="${REPEATS:-3}"
entries="${CHECK_ENTRIES:-20}"
log="$out/device-check.log"
mkdir -p "$out"
: >"$log"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NM_CACHE_DIR="$work/cache"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output into the log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "== $name: ok, $((SECONDS - t0)) s" | tee -a "$log"
    else
        echo "== $name: FAILED (exit $rc; 124: over $limit s), $((SECONDS - t0)) s" | tee -a "$log"
        failed=$((failed + 1))
    fi
}

{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "devices", torch.cuda.device_count())' 2>&1
    git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
} >>"$log"

# editable, as the README's `make` installs it: nmgen.generated maps to generated/ (needs the
# machine's setuptools; nothing is downloaded)
if [ "${INSTALL:-1}" != 0 ]; then
    step install 120 "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
nm=("$py" -c 'import sys; from torchbridge.cli import main; sys.exit(main())')
nmgen=("$py" -c 'import sys; from nmgen.cli import main; sys.exit(main())')

step tests 240 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_propagate.py \
    -k cuda

for p in $sizes; do
    dir="$work/floor$p"
    step "floor$p" 240 "${nm[@]}" bench floor --device "$device" --p "$p" --threads 1 \
        --repeats "$repeats" --check-entries "$entries" --no-progress --out "$dir"
    step "check$p" 120 "${nmgen[@]}" check-points "$dir/bench_floor_oracle_points.json"
    [ -f "$dir/bench_floor.md" ] && cp "$dir/bench_floor.md" "$out/floor$p.md"
done

tar -czf "$out/device-check.tgz" -C "$work" --exclude cache . 2>>"$log"
echo "== $failed step(s) failed; outputs in $out" | tee -a "$log"
exit "$failed"

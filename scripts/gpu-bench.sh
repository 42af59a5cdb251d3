#!/usr/bin/env bash
# The GPU benchmark grid: xent's fused cross-entropy against the device's own copy rate, for
# the vocabularies LLMs use, over row counts from 1k to 64k, f32 and bf16, forward and
# forward + gradient; then the split-row and workgroup-size variants for long rows. Writes one
# JSON file: {"date", "revision", "device", "rows": [one object per measurement]}.
#
#   scripts/gpu-bench.sh [OUT.json]            # builds the CLI unless XENT_BIN names one
#
# Sized for a few minutes of device time: at most 2.6e9 logits per shape (10.4 GB in f32),
# twenty timed repetitions after a warm-up; each (V, dtype) workload is generated once per op.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-bench.json}
BIN=${XENT_BIN:-}
if [ -z "$BIN" ]; then
    cargo build --release -p xent-cli
    BIN=target/release/xent
fi
REPS=${REPS:-20}
MAX_ELEMS=${MAX_ELEMS:-2600000000}
LINES=$(mktemp)
trap 'rm -f "$LINES"' EXIT

bench() { # bench OP DTYPES SHAPES [flags...] -- every line tagged with the flags used
    local op=$1 dtypes=$2 shapes=$3
    shift 3
    local tag="${*:-default}"
    "$BIN" bench --backend gpu --json --reps "$REPS" --op "$op" --dtype "$dtypes" --shapes "$shapes" "$@" |
        sed "s/}\$/,\"variant\":\"$tag\"}/" | tee -a "$LINES"
}

for v in 32000 128256 152064 256000; do
    shapes=()
    for n in 1024 4096 16384 65536; do
        if [ $((n * v)) -le "$MAX_ELEMS" ]; then shapes+=("${n}x${v}"); fi
    done
    [ ${#shapes[@]} -gt 0 ] || continue
    s=$(IFS=,; echo "${shapes[*]}")
    for op in copy fwd fwd-bwd; do
        bench "$op" f32,bf16 "$s"
    done
done

# Long rows split into segments, and narrower workgroups than the default (SWEEP=0 skips them).
if [ "${SWEEP:-1}" != 0 ]; then
    for seg in 16384 65536; do
        bench fwd-bwd f32 1024x128256,4096x128256,1024x256000,4096x256000 --segment-len "$seg"
    done
    for wg in 256 512 1024; do
        bench fwd f32,bf16 4096x32000,16384x32000 --workgroup-size "$wg"
        bench fwd-bwd f32,bf16 4096x32000,16384x32000 --workgroup-size "$wg"
    done
fi

{
    printf '{"date":"%s","revision":"%s","device":"%s","rows":[\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${XENT_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
        "$( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown) | head -1)"
    paste -sd, "$LINES"
    printf ']}\n'
} >"$OUT"
echo "wrote $OUT ($(wc -l <"$LINES") measurements)"

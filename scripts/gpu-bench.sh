#!/usr/bin/env bash
# The GPU benchmark grid, sized for at most five minutes on one NVIDIA H100 or H200 with nothing
# else reachable. Writes one JSON file (rewritten after every step, so that a run cut short
# keeps what it measured):
#   {"date", "revision", "device", "mode", "elapsed_s", "notes": [...], "rows": [one per measurement]}
#
#   scripts/gpu-bench.sh [--dry-run] [OUT.json]
#
# Default OUT: benches/gpu-h100-<date>.json (gpu-h200-..., from nvidia-smi's name), or
# target/gpu-bench-dry-run.json with --dry-run. XENT_REVISION names the revision where the
# working tree has no .git (the device machine's copy).
#
# 1. Cross-entropy grid: V = 32000, 128256, 152064, 256000; N = 4096 and 16384 where N V <=
#    MAX_ELEMS; ops copy (the ceiling: buffer copy, copy kernel, read-only row sum), fwd and
#    fwd-bwd; f32 and bf16, bf16 with 16-byte and 8-byte loads in the same process
#    (`--load-width 16,8`; each row carries "load_width").
# 2. Fused linear cross-entropy (`--op linear-fwd-bwd`) at 8192x4096x32000 and 8192x2304x256000,
#    bf16 and f32, with cooperative matrices on and off: `--matmul coop16|simt`. That flag comes
#    from the branch adding the cooperative-matrix GpuOptions field; its name must match what
#    that branch gives `xent bench`. A binary without it runs the products once per dtype with
#    its default, and the JSON says so in "notes".
# 3. SWEEP=1 only (not in the five minutes): segment lengths and workgroup sizes.
# 0. First, in seconds: the host CPU's bf16 linear loss on each matrix-product kernel its flags
#    offer (`--cpu-matmul`: amx-bf16 where /proc/cpuinfo has amx_bf16, as Intel Sapphire Rapids
#    hosts of H100s do; avx512-bf16; f32) at 4096x512x32000, and before that the kernels' tests
#    where their binaries were carried: CPU_TEST_BINS="lib-test-binary cpu_matmul-test-binary"
#    (from `cargo test --release -p xent --lib --test cpu_matmul --no-run`), each run with
#    `--nocapture` and its verdict and kernel lines kept in "notes". The host's model and flags
#    are noted. Where the host has AMX, four other blockings of the AMX kernels follow
#    (`XENT_AMX_KC`, `XENT_AMX_MC`; variants "cpu-amx-kc<KC>-mc<MC>").
#
# The device machine has no Rust toolchain and no network: build here and carry the binary,
#   cargo build --release -p xent-cli && mkdir -p .devbin && cp target/release/xent .devbin/
# then there: XENT_BIN=.devbin/xent scripts/gpu-bench.sh "$OUT/gpu-h100-$(date +%F).json"
# (with the Vulkan loader unpacked first if `ldconfig -p | grep libvulkan` finds none). Without
# XENT_BIN the script builds with cargo (offline when there is no network), if cargo is there.
#
# --dry-run: small shapes (V still 32000 and 256000), two repetitions: every step end to end on
# lavapipe in well under a minute. Not part of scripts/test.sh.
#
# Knobs: REPS (10), LINEAR_REPS (3), MAX_ELEMS (1.1e9 logits per shape), BUDGET_S (270: a step
# not started by then is skipped and named in "notes"), SWEEP (0).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = --dry-run ]; then
    DRY=1
    shift
fi
START=$SECONDS
BUDGET_S=${BUDGET_S:-270}

BIN=${XENT_BIN:-}
if [ -z "$BIN" ]; then
    if ! command -v cargo >/dev/null; then
        echo "gpu-bench: no XENT_BIN and no cargo: build xent-cli elsewhere and set XENT_BIN" >&2
        exit 2
    fi
    cargo build --release -p xent-cli || cargo build --release --offline -p xent-cli
    BIN=target/release/xent
fi
[ -x "$BIN" ] || { echo "gpu-bench: $BIN is not an executable" >&2; exit 2; }

DEVICE=$( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true) | head -1)
if [ $DRY = 1 ]; then
    MODE=dry-run
else
    # gpu-h100 / gpu-h200 from the device's name.
    model=$( (echo "$DEVICE" | grep -oiE 'h100|h200' || true) | head -1 | tr 'A-Z' 'a-z')
    TAG=gpu-${model:-unknown}
    MODE=full
fi
if [ $DRY = 1 ]; then
    OUT=${1:-target/gpu-bench-dry-run.json} # not a measurement to keep under benches/
else
    OUT=${1:-benches/${TAG}-$(date -u +%Y-%m-%d).json}
fi
[ -n "$DEVICE" ] || DEVICE=unknown

if [ $DRY = 1 ]; then
    REPS=${REPS:-2}
    LINEAR_REPS=${LINEAR_REPS:-1}
    CE_V="32000 256000"
    CE_N="4 8"
    MAX_ELEMS=${MAX_ELEMS:-1100000}
    LINEAR_SHAPES="16x64x1000,8x32x2000"
else
    REPS=${REPS:-10}
    LINEAR_REPS=${LINEAR_REPS:-3}
    CE_V="32000 128256 152064 256000"
    CE_N="4096 16384"
    MAX_ELEMS=${MAX_ELEMS:-1100000000}
    LINEAR_SHAPES="8192x4096x32000,8192x2304x256000"
fi

LINES=$(mktemp)
NOTES=$(mktemp)
ERR=$(mktemp)
trap 'rm -f "$LINES" "$NOTES" "$ERR"' EXIT

json_str() { # a JSON string literal of $1 (backslashes, quotes, control characters)
    printf '"%s"' "$(printf '%s' "$1" | tr '\n\t\r' '   ' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}
note() {
    echo "gpu-bench: $1" >&2
    json_str "$1" >>"$NOTES"
    echo >>"$NOTES"
}
write_json() {
    mkdir -p "$(dirname "$OUT")"
    {
        printf '{"date":"%s","revision":"%s","device":%s,"mode":"%s","elapsed_s":%d,"notes":[' \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
            "${XENT_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
            "$(json_str "$DEVICE")" "$MODE" $((SECONDS - START))
        paste -sd, "$NOTES"
        printf '],"rows":[\n'
        paste -sd, "$LINES"
        printf ']}\n'
    } >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
}

bench() { # [BACKEND=cpu] bench TAG [xent bench arguments...]: one invocation, every line tagged "variant"
    local tag=$1
    shift
    local left=$((BUDGET_S - (SECONDS - START)))
    if [ $left -le 5 ]; then
        note "skipped (time budget of ${BUDGET_S}s spent): $tag: $*"
        return 0
    fi
    local t0=$SECONDS
    if timeout "$left" "$BIN" bench --backend "${BACKEND:-gpu}" --json "$@" 2>"$ERR" >"$LINES.part"; then
        sed "s/}\$/,\"variant\":\"$tag\"}/" "$LINES.part" | tee -a "$LINES"
        echo "gpu-bench: $tag: $((SECONDS - t0)) s" >&2
    else
        local rc=$?
        sed "s/}\$/,\"variant\":\"$tag\"}/" "$LINES.part" >>"$LINES"
        note "failed (exit $rc after $((SECONDS - t0)) s): $tag: $*: $(tail -c 400 "$ERR")"
    fi
    rm -f "$LINES.part"
    write_json
}

note "mode $MODE, reps $REPS (linear $LINEAR_REPS), budget ${BUDGET_S}s, binary $BIN"
write_json

# 0. The host CPU's matrix-product kernels: their tests where carried, then the linear loss.
FLAGS=$(grep -o -w -E 'amx_bf16|amx_tile|avx512_bf16' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ' || true)
note "host CPU: $( (lscpu 2>/dev/null || true) | sed -n 's/^Model name: *//p' | head -1); $(nproc) cores; flags: ${FLAGS:-none of amx_bf16, amx_tile, avx512_bf16}"
for t in ${CPU_TEST_BINS:-}; do
    if [ ! -x "$t" ]; then
        note "cpu tests: $t is not an executable"
        continue
    fi
    rc=0
    # The emulated AMX tests (CI runs them) would only cost time here: skipped.
    timeout 300 "$t" --nocapture --skip emulat >"$ERR" 2>&1 || rc=$?
    note "cpu tests $(basename "$t"): exit $rc; $(grep -E '^test result|cpu_matmul |skipped|AMX|panicked' "$ERR" | sort | uniq -c | head -20 | tr -s ' ')"
done
kernels=f32
case " $FLAGS " in *" avx512_bf16 "*) kernels="avx512-bf16,$kernels" ;; esac
case " $FLAGS " in *" amx_bf16 "*) kernels="amx-bf16,$kernels" ;; esac
if [ $DRY = 1 ]; then CPU_SHAPES=64x64x1000; else CPU_SHAPES=4096x512x32000; fi
BACKEND=cpu bench "cpu-matmul" --reps "$LINEAR_REPS" --op linear-fwd-bwd --dtype f32,bf16 --shapes "$CPU_SHAPES" \
    --cpu-matmul "$kernels" --bf16-grad split,rounded
# On AMX, the first measurement of other blockings (block of k, rows per tile; defaults 512, 224).
case " $FLAGS " in *" amx_bf16 "*)
    for kcmc in 256,224 1024,224 512,96 512,448; do
        XENT_AMX_KC=${kcmc%,*} XENT_AMX_MC=${kcmc#*,} BACKEND=cpu bench "cpu-amx-kc${kcmc%,*}-mc${kcmc#*,}" \
            --reps "$LINEAR_REPS" --op linear-fwd-bwd --dtype bf16 --shapes "$CPU_SHAPES" --cpu-matmul amx-bf16 \
            --bf16-grad split,rounded
    done ;;
esac

# 1. The cross-entropy grid, one invocation per (V, op): workloads generated once per dtype.
for v in $CE_V; do
    shapes=()
    for n in $CE_N; do
        if [ $((n * v)) -le "$MAX_ELEMS" ]; then shapes+=("${n}x${v}"); fi
    done
    [ ${#shapes[@]} -gt 0 ] || continue
    s=$(IFS=,; echo "${shapes[*]}")
    for op in copy fwd fwd-bwd; do
        bench default --reps "$REPS" --op "$op" --dtype f32,bf16 --shapes "$s" --load-width 16,8
    done
done

# 2. Fused linear cross-entropy with and without cooperative matrices.
HELP=$("$BIN" bench --help 2>/dev/null || true)
if grep -q -- '--matmul' <<<"$HELP"; then
    for dtype in bf16 f32; do
        for mm in coop16 simt; do
            bench "matmul=$mm" --reps "$LINEAR_REPS" --op linear-fwd-bwd --dtype "$dtype" --shapes "$LINEAR_SHAPES" \
                --matmul "$mm"
        done
    done
else
    note "this xent bench has no --matmul flag: linear-fwd-bwd ran once per dtype with the library's default products"
    for dtype in bf16 f32; do
        bench "matmul=default" --reps "$LINEAR_REPS" --op linear-fwd-bwd --dtype "$dtype" --shapes "$LINEAR_SHAPES"
    done
fi

# 3. Long rows split into segments, and workgroup sizes (SWEEP=1).
if [ "${SWEEP:-0}" != 0 ]; then
    for seg in 16384 65536; do
        bench "segment-len=$seg" --reps "$REPS" --op fwd-bwd --dtype f32,bf16 --shapes 4096x128256,4096x256000 \
            --segment-len "$seg"
    done
    for wg in 256 512 1024; do
        bench "workgroup-size=$wg" --reps "$REPS" --op fwd --dtype f32,bf16 --shapes 4096x32000,16384x32000 \
            --workgroup-size "$wg"
    done
fi

note "done in $((SECONDS - START)) s"
write_json
echo "wrote $OUT ($(wc -l <"$LINES") measurements, $((SECONDS - START)) s)"

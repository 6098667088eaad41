#!/usr/bin/env bash
# One prepared command for the lent GPU machine (no venv, no internet, no dataset: synthetic CIFAR-shaped data).
#
#   bash benchmarks/gpu_check.sh                         # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu bash benchmarks/gpu_check.sh      # rehearsal on a CPU: tiny pair, tiny step counts
#
# Prints the nvidia-smi header, the torch version and one JSON line per result:
#   0. graph_check: the step recorded as one CUDA graph trains like the eager step (fails the check if not);
#   1. compare, for each PRECISION:COMPILE of COMPARES: reference-style pipeline vs engine, resnet32x4 ->
#      resnet8x4 KD at batch 64 (images/s, ratio, multiply-add rates, measured matmul peaks, extrapolated epoch
#      of 50,000 images);
#   2. the engine's measured epoch of 50,000 images, with BOOK (fp32:off, the book's defaults) and FAST (a
#      PRECISION:COMPILE);
#   3. four concurrent engine processes (BOOK) on the one device vs one: total images/s ratio; then gpu_figures:
#      the BOOK epoch and this ratio, with their card, command and date, written to kcdlib/gpu_figures.json (on
#      CUDA without QUICK; else to a temporary file, checked the same way), the figures the plan's GPU estimate
#      extrapolates from (kcdlib.estimate), and to $OUT/gpu_figures.json when $OUT is set;
#   4. KCD cost check (FAST): a pass over a random 35,000-point subset vs the first 35,000 points (within 5 %?);
#   5. ImageNet input: JPEGs decoded by PIL in DataLoader workers (all cores) vs by nvjpeg on the device, images/s
#      side by side, and ResNet34 -> ResNet18 KD steps/s at batch 256 in bf16 on in-memory tensors vs fed by the
#      device decoder (benchmarks/decode_throughput.py; on a CPU the decoding part only, labelled as such).
#   6. torchrun_nccl: one short KC-KD run (synthetic CIFAR-100, resnet20 -> resnet8, two stages of one epoch)
#      under `torchrun --nproc-per-node 1`: the data-parallel path on NCCL (gloo on a CPU), its record printed.
# Each python call runs under its own `timeout`; the whole run stays inside TOTAL_S seconds (default 470);
# a failed step is reported and the others still run; the exit status is non-zero if any step failed.
# When $OUT is set, the whole log is also written to $OUT/gpu_check.log.
set -u

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
TOTAL_S=${TOTAL_S:-470}
BATCH=${BATCH:-64}
# graph: the whole step as one CUDA graph; default+graph: the same around torch.compile'd networks; off: eager.
COMPARES=${COMPARES:-bf16:graph fp32:graph bf16:default+graph fp32:off}
FAST=${FAST:-bf16:graph}
# The setting of the figures kcd book --plan extrapolates from: the book's defaults (fp32, eager steps).
BOOK=fp32:off
if [ "$QUICK" = 1 ]; then
    TEACHER=${TEACHER:-resnet20} STUDENT=${STUDENT:-resnet8}
    POINTS=${POINTS:-600} STEPS=${STEPS:-2} WARMUP=${WARMUP:-1} WORKERS=${WORKERS:-2}
    CONC_STEPS=${CONC_STEPS:-2} SUBSET=${SUBSET:-420} REPEATS=${REPEATS:-1} PEAK=${PEAK:-256}
    GRAPH_STEPS=${GRAPH_STEPS:-2}
    EXTRA=(--threads 1)
    DECODE_ARGS=(--files 40 --decode-images 512 --batch-size 64 --train-batch 16 --train-steps 2 --train-warmup 1
                 --torch-threads 1)
else
    TEACHER=${TEACHER:-resnet32x4} STUDENT=${STUDENT:-resnet8x4}
    POINTS=${POINTS:-50000} STEPS=${STEPS:-300} WARMUP=${WARMUP:-10} WORKERS=${WORKERS:-8}
    CONC_STEPS=${CONC_STEPS:-400} SUBSET=${SUBSET:-35000} REPEATS=${REPEATS:-2} PEAK=${PEAK:-0}
    GRAPH_STEPS=${GRAPH_STEPS:-20}
    EXTRA=()
    DECODE_ARGS=()
fi
BENCH=(benchmarks/bench_epoch.py --dataset synthetic --points "$POINTS" --teacher "$TEACHER" --student "$STUDENT"
       --device "$DEVICE" --batch-size "$BATCH" --warmup "$WARMUP" ${EXTRA[@]+"${EXTRA[@]}"})
# --precision P --compile C from "P:C"
setting() { echo "--precision ${1%%:*} --compile ${1#*:}"; }
read -r -a FAST_ARGS <<< "$(setting "$FAST")"
read -r -a BOOK_ARGS <<< "$(setting "$BOOK")"
FAILED=()
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# SAVED FILE COMMAND...: run COMMAND, keep its output in FILE and print it (a step whose result a later one reads).
SAVED=(bash -c 'out=$1; shift; "$@" > "$out"; rc=$?; cat "$out"; exit $rc' saved)

# step NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of TOTAL_S); record a failure.
step() {
    local name=$1 limit=$2 rc
    shift 2
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "{\"step\": \"$name\", \"ok\": false, \"error\": \"skipped: the ${TOTAL_S} s budget is spent\"}"
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "## $name (timeout ${limit} s, t=${SECONDS} s)"
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "{\"step\": \"$name\", \"ok\": false, \"rc\": $rc$([ "$rc" -eq 124 ] && echo ', "error": "timeout"')}"
        FAILED+=("$name")
    fi
    return "$rc"
}

# The concurrency check: one engine process, then PARTIES started together (they meet at a file barrier after
# their warm-up, so their timed windows overlap); total images/s of the group over that of the single one.
concurrency() {
    local parties=4 pids=() rc=0 i
    "$PY" "${BENCH[@]}" "${BOOK_ARGS[@]}" --mode engine --steps "$CONC_STEPS" > "$TMP/single.json" || return 1
    mkdir -p "$TMP/barrier"
    for i in $(seq "$parties"); do
        "$PY" "${BENCH[@]}" "${BOOK_ARGS[@]}" --mode engine --steps "$CONC_STEPS" --seed "$i" \
            --barrier "$TMP/barrier" --parties "$parties" > "$TMP/group.$i.json" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    [ "$rc" -eq 0 ] || return 1
    "$PY" - "$TMP" "$parties" <<'EOF'
import glob, json, sys
tmp, parties = sys.argv[1], int(sys.argv[2])
single = json.load(open(f"{tmp}/single.json"))
group = [json.load(open(p)) for p in sorted(glob.glob(f"{tmp}/group.*.json"))]
assert len(group) == parties, f"{len(group)} of {parties} processes reported"
images = sum(g["engine_images"] for g in group)
span = max(g["end_unix"] for g in group) - min(g["start_unix"] for g in group)
overlap = min(g["end_unix"] for g in group) - max(g["start_unix"] for g in group)
total = images / span
print(json.dumps({
    "benchmark": "concurrency", "teacher": single["teacher"], "student": single["student"],
    "device_name": single["device_name"], "torch": single["torch"], "precision": single["precision"],
    "compile": single["compile"], "processes": parties,
    "steps_each": single["steps"], "single_images_per_second": single["engine_images_per_second"],
    "group_images_per_second": round(total, 1),
    "group_sum_of_rates": round(sum(g["engine_images_per_second"] for g in group), 1),
    "per_process_images_per_second": [g["engine_images_per_second"] for g in group],
    "ratio_group_over_single": round(total / single["engine_images_per_second"], 3),
    "overlap_fraction": round(max(overlap, 0.0) / span, 3),
}))
EOF
}

main() {
    echo "## gpu_check: device=$DEVICE quick=$QUICK pair=$TEACHER->$STUDENT points=$POINTS steps=$STEPS"
    if command -v nvidia-smi > /dev/null; then
        step nvidia-smi 20 bash -c 'nvidia-smi | head -n 12'
        step nvidia-smi-query 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
            --format=csv
    else
        echo "## no nvidia-smi"
    fi
    step versions 60 "$PY" -c "import json, torch, torchvision; print(json.dumps({
        'torch': torch.__version__, 'torchvision': torchvision.__version__, 'cuda': torch.version.cuda,
        'cudnn': torch.backends.cudnn.version(), 'device': torch.cuda.get_device_name() if torch.cuda.is_available()
        else 'cpu'}))"
    step graph_check 90 "$PY" benchmarks/graph_check.py --device "$DEVICE" --teacher "$TEACHER" --student "$STUDENT" \
        --steps "$GRAPH_STEPS" --batch-size "$BATCH"
    local c args limit
    for c in $COMPARES; do
        read -r -a args <<< "$(setting "$c")"
        limit=90
        case $c in *default*|*reduce-overhead*) limit=180 ;; esac  # torch.compile's first compilation
        step "compare_${c/:/_}" "$limit" "$PY" "${BENCH[@]}" "${args[@]}" --mode compare --steps "$STEPS" \
            --workers "$WORKERS" --peak-size "$PEAK"
    done
    local epoch=("$PY" "${BENCH[@]}" "${BOOK_ARGS[@]}" --mode engine --steps 0)
    mkdir -p "$TMP/figures"
    step "epoch_${BOOK/:/_}" 75 "${SAVED[@]}" "$TMP/figures/epoch.json" "${epoch[@]}"
    [ "$FAST" != "$BOOK" ] && step "epoch_${FAST/:/_}" 75 "$PY" "${BENCH[@]}" "${FAST_ARGS[@]}" --mode engine --steps 0
    # A function cannot run under `timeout`: the script runs itself for that step (timeout kills the whole
    # process group, the four engine processes included).
    step concurrency 120 "${SAVED[@]}" "$TMP/figures/concurrency.json" bash benchmarks/gpu_check.sh --concurrency
    local target="$TMP/gpu_figures.json"
    [ "$DEVICE" = cuda ] && [ "$QUICK" = 0 ] && target=kcdlib/gpu_figures.json
    step gpu_figures 30 "$PY" benchmarks/gpu_figures.py --out "$target" \
        --epoch "$TMP/figures/epoch.json" --epoch-command "${epoch[*]}" \
        --concurrency "$TMP/figures/concurrency.json" --concurrency-command "bash benchmarks/gpu_check.sh \
--concurrency (one, then 4 at once, of: $PY ${BENCH[*]} ${BOOK_ARGS[*]} --mode engine --steps $CONC_STEPS)" \
        --source "bash benchmarks/gpu_check.sh, its log (\$OUT/gpu_check.log)" \
        && if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -w "$OUT" ]; then cp "$target" "$OUT/gpu_figures.json"; fi
    step kcd_cost 90 "$PY" "${BENCH[@]}" "${FAST_ARGS[@]}" --mode kcd-cost --subset "$SUBSET" --repeats "$REPEATS"
    step decode_throughput 150 "$PY" benchmarks/decode_throughput.py --device "$DEVICE" \
        ${DECODE_ARGS[@]+"${DECODE_ARGS[@]}"}
    step synthetic_cifar100 60 "$PY" benchmarks/make_synthetic_cifar100.py "$TMP/data" --train 1000 --test 200
    step torchrun_nccl 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m kcdlib distill \
        --dataset cifar100 --data-root "$TMP/data" --runs-dir "$TMP/ddp-runs" --device "$DEVICE" --no-progress \
        --teacher resnet20 --teacher-epochs 1 --student resnet8 --method kcd --epochs 2 --stage-epochs 1

    if [ "${#FAILED[@]}" -gt 0 ]; then
        echo "{\"gpu_check\": \"failed\", \"failed_steps\": \"${FAILED[*]}\", \"seconds\": $SECONDS}"
        return 1
    fi
    echo "{\"gpu_check\": \"ok\", \"seconds\": $SECONDS}"
}

if [ "${1:-}" = "--concurrency" ]; then
    concurrency
    exit $?
fi
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -w "$OUT" ]; then
    main 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
main

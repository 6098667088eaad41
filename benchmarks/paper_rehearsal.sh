#!/usr/bin/env bash
# A rehearsal of the book's long profiles (course, paper) on a GPU machine with nothing but the working tree:
# synthetic CIFAR-100 (and a tiny ImageNet-shaped folder for Table 3), a cut schedule, every notebook executed,
# the HTML built when jupyter-book is there. It checks that the whole pipeline of a real build runs (every
# table's runs on CUDA, several at a time, the tables and figures built from their records); the numbers mean
# nothing.
#
#   bash benchmarks/paper_rehearsal.sh                                      # on the GPU machine (python3, no venv)
#   QUICK=1 DEVICE=cpu PY=.venv/bin/python bash benchmarks/paper_rehearsal.sh   # the CPU rehearsal (tiny data)
#
# Phases (each timed, each python call under `timeout`, the whole run inside TOTAL_S seconds):
#   1. data: benchmarks/make_synthetic_cifar100.py writes $WORK/data/cifar-100-python/{train,test} (TRAIN/TEST
#      images, every class present) and $WORK/data/imagenet/{train,val} (IMAGENET_CLASSES folders of
#      IMAGENET_TRAIN/IMAGENET_VAL JPEGs): the paper profile's Table 3 is ImageNet ResNet34 -> ResNet18, and
#      without an ImageNet folder its notebook stops on DatasetMissing (the CLI cannot leave a notebook out);
#   2. one `kcd book` per profile of PROFILES (default "course paper"), the schedule cut to --epochs EPOCHS
#      --stage-epochs STAGE_EPOCHS --teacher-epochs TEACHER_EPOCHS (default 6/1/1: KCD's six stages of one epoch;
#      QUICK: 2/1/1), --jobs-per-device JOBS_PER_DEVICE (4; QUICK: 1), --jobs JOBS notebooks at a time (3; QUICK:
#      1), --device DEVICE, --compile COMPILE (off), into --out $WORK/book-<profile> (the checkout's own book and
#      artefacts are not touched) with the run store $WORK/runs-<profile>. The HTML is built when `import
#      jupyter_book` works, else --skip-html (the summary says so). A profile gets a share of what is left of
#      TOTAL_S by its weight (paper 5, others 2), the last one all of it.
# Where papermill, ipykernel or myst_nb is missing (the GPU machine's image has none of them, and nothing can be
# installed there), `kcd book` cannot execute a notebook: the rehearsal then makes, per notebook, the calls the
# notebook makes (kcdlib.artefacts: setup, ensure the runs, build the table or figure; the five-minutes notebook's
# stage table and replay), in one python process per profile, and writes each artefact's numbers (CSV, JSON) into
# $WORK/tables-<profile>; no notebook is executed and no HTML built. MODE=direct forces this, MODE=book runs
# `kcd book` regardless; the summary's "mode" (and "note") says which ran.
#
# The run stores persist under $WORK: a second invocation reuses finished runs and resumes interrupted ones (after
# a timeout, run it again). FRESH=1 removes this script's folders under $WORK first. The data is written again only
# when its settings change. When $OUT is set, the whole log is also written to $OUT/paper_rehearsal.log.
# The last line is one JSON summary: {"paper_rehearsal": "ok"|"failed", "seconds": ..., ...}.
set -u

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
WORK=${WORK:-/tmp/kcd-rehearsal}
PROFILES=${PROFILES:-course paper}
MODE=${MODE:-auto}
FRESH=${FRESH:-0}
COMPILE=${COMPILE:-off}
STAGE_EPOCHS=${STAGE_EPOCHS:-1} TEACHER_EPOCHS=${TEACHER_EPOCHS:-1}
if [ "$QUICK" = 1 ]; then
    # Two epochs: the fewest that still condense once (with a single stage, the five-minutes notebook's replay
    # of the KCD run has no condensation to show and stops on "No objects to concatenate").
    EPOCHS=${EPOCHS:-2}
    TRAIN=${TRAIN:-100} TEST=${TEST:-100}
    IMAGENET_CLASSES=${IMAGENET_CLASSES:-2} IMAGENET_TRAIN=${IMAGENET_TRAIN:-2} IMAGENET_VAL=${IMAGENET_VAL:-1}
    JOBS_PER_DEVICE=${JOBS_PER_DEVICE:-1} JOBS=${JOBS:-1} TOTAL_S=${TOTAL_S:-2400}
    # One torch thread per process on a shared 2-core machine (OpenMP threads of several processes spin).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    EPOCHS=${EPOCHS:-6}
    TRAIN=${TRAIN:-1000} TEST=${TEST:-200}
    IMAGENET_CLASSES=${IMAGENET_CLASSES:-10} IMAGENET_TRAIN=${IMAGENET_TRAIN:-8} IMAGENET_VAL=${IMAGENET_VAL:-4}
    JOBS_PER_DEVICE=${JOBS_PER_DEVICE:-4} JOBS=${JOBS:-3} TOTAL_S=${TOTAL_S:-240}
fi
IMAGENET_SIZE=${IMAGENET_SIZE:-320x256}
DATA="$WORK/data"
PHASES=()  # "name<TAB>ok<TAB>seconds<TAB>detail" per phase, for the summary
FAILED=()

# phase NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of TOTAL_S), timed; record the result.
phase() {
    local name=$1 limit=$2 rc start
    shift 2
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "## $name: skipped, the ${TOTAL_S} s budget is spent"
        PHASES+=("$name	false	0	skipped: budget spent")
        FAILED+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "## $name (timeout ${limit} s, t=${SECONDS} s)"
    start=$SECONDS
    local tag="$$-$name-$RANDOM$RANDOM"
    KCD_REHEARSAL_TAG=$tag timeout --kill-after=10 "$limit" "$@"
    rc=$?
    reap "$tag" "$name"
    local took=$((SECONDS - start)) detail="rc $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && detail="timeout after ${limit} s (run again: finished runs are reused)"
    echo "## $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($detail)") in ${took} s"
    if [ "$rc" -eq 0 ]; then
        PHASES+=("$name	true	$took	")
    else
        PHASES+=("$name	false	$took	$detail")
        FAILED+=("$name")
    fi
    return "$rc"
}

# reap TAG NAME: end the processes a phase left behind. `timeout` ends its process group, but a notebook's kernel
# runs in a session of its own (jupyter_client starts it so), and the run store's worker processes it spawned
# outlive it and go on training. Every process of a phase carries KCD_REHEARSAL_TAG=TAG in its environment.
reap() {
    local tag=$1 name=$2 pids=() pid i
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = $$ ] && continue
        grep -qzxF "KCD_REHEARSAL_TAG=$tag" "/proc/$pid/environ" 2> /dev/null && pids+=("$pid")
    done
    [ "${#pids[@]}" -eq 0 ] && return 0
    echo "## $name: ending ${#pids[@]} process(es) it left running: ${pids[*]}"
    kill -TERM "${pids[@]}" 2> /dev/null
    for i in 1 2 3 4 5; do
        kill -0 "${pids[@]}" 2> /dev/null || return 0
        sleep 1
    done
    kill -KILL "${pids[@]}" 2> /dev/null
    return 0
}

# The data, written again only when its settings changed (same settings, same bytes: the run stores stay valid).
make_data() {
    local stamp="$DATA/.rehearsal-data" want
    want="train=$TRAIN test=$TEST imagenet=$IMAGENET_CLASSES:$IMAGENET_TRAIN:$IMAGENET_VAL:$IMAGENET_SIZE seed=0"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "synthetic data already in $DATA ($want)"
        return 0
    fi
    rm -rf "$DATA/cifar-100-python" "$DATA/imagenet" "$stamp"
    "$PY" benchmarks/make_synthetic_cifar100.py "$DATA" --train "$TRAIN" --test "$TEST" \
        --imagenet-classes "$IMAGENET_CLASSES" --imagenet-train "$IMAGENET_TRAIN" --imagenet-val "$IMAGENET_VAL" \
        --imagenet-size "$IMAGENET_SIZE" || return 1
    echo "$want" > "$stamp"
}

# The calls each notebook makes, without papermill (MODE=direct): PROFILE DATA RUNS OUT DEVICE JPD E SE TE COMPILE.
# From a file, not from standard input: the run store's worker processes (spawned) import the main module again.
direct() {
    local program="$WORK/direct_notebooks.py"
    cat > "$program" <<'EOF'
import json
import sys
import time
from pathlib import Path

from kcdlib import artefacts
from kcdlib.artefacts import five_minutes
from kcdlib.buildoptions import BuildOptions


def main(profile, data_root, runs_dir, out, device, jpd, epochs, stage, teacher, compile_mode):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = artefacts.names()
    for i, name in enumerate(names, 1):
        t = time.perf_counter()
        print(f"[{i}/{len(names)}] {name}: executing ...", flush=True)
        session = artefacts.setup(BuildOptions(
            profile=profile, runs_dir=runs_dir, data_root=data_root, device=device, jobs_per_device=int(jpd),
            compile=compile_mode, epochs=int(epochs), stage_epochs=int(stage), teacher_epochs=int(teacher)))
        p, store = session.profile, session.store
        artefact = artefacts.get(name)
        session.ensure(artefact.runs(p), progress=False)
        if artefact.build is None:  # the teaching notebook: its stage table, replay and curves
            rows = artefact.declare(p)
            recs = {row: [store.record(c) for c in cfgs] for row, cfgs in rows.items()}
            n = store.dataset(p.dataset).num_train
            kcd_cfg = rows["KCD"][0]
            five_minutes.stage_table(recs["KCD"], kcd_cfg, n).to_csv(out / f"{name}_stages.csv")
            five_minutes.watch_kcd(store, kcd_cfg)
            five_minutes.accuracy_vs_computation(recs, n, p.epochs).to_csv(out / f"{name}_curves.csv")
            kd, kcd = recs["KD"][0], recs["KCD"][0]
            numbers = {"kd_top1": kd["final_top1"], "kcd_top1": kcd["final_top1"],
                       "kcd_computation": kcd["computation"]}
        else:
            made = artefact.build(session)
            # A figure's numbers are its data; the trade-off's, its table (beside its own plot).
            data = made.table.data if hasattr(made, "table") else made.data
            data.to_csv(out / f"{name}.csv", index=False)
            numbers = made.key_numbers
            if hasattr(made, "figure"):
                made.figure.savefig(out / f"{name}.png")
            else:
                print(made.caption)
        (out / f"{name}.json").write_text(json.dumps(numbers, default=str, indent=1) + "\n")
        print(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"notebooks' calls made in {time.perf_counter() - start:.0f} s (profile '{profile}', runs in {runs_dir})")


if __name__ == "__main__":
    main(*sys.argv[1:])
EOF
    "$PY" "$program" "$@"
}

# One profile: `kcd book` (MODE=book) or the notebooks' calls (MODE=direct).
profile() {
    local name=$1 out="$WORK/book-$1" runs="$WORK/runs-$1"
    if [ "$MODE" = direct ]; then
        direct "$name" "$DATA" "$runs" "$WORK/tables-$name" "$DEVICE" "$JOBS_PER_DEVICE" "$EPOCHS" "$STAGE_EPOCHS" \
            "$TEACHER_EPOCHS" "$COMPILE"
        return $?
    fi
    local args=(--profile "$name" --data-root "$DATA" --device "$DEVICE" --runs-dir "$runs" --out "$out"
                --jobs "$JOBS" --jobs-per-device "$JOBS_PER_DEVICE" --compile "$COMPILE" --epochs "$EPOCHS"
                --stage-epochs "$STAGE_EPOCHS" --teacher-epochs "$TEACHER_EPOCHS")
    [ "$HTML" = requested ] || args+=(--skip-html)
    "$PY" -m kcdlib book "${args[@]}"
}

profile_weight() {
    case $1 in paper) echo 5 ;; *) echo 2 ;; esac
}

# What a profile's run store holds: runs, their training seconds (summed), the slowest.
store_summary() {
    "$PY" - "$@" <<'EOF'
import json, sys
from pathlib import Path

records = []
for path in Path(sys.argv[1]).glob("*/record.json"):
    try:
        records.append(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
seconds = [float(r.get("wall_seconds") or 0) for r in records]
html = Path(sys.argv[2]) / "_build" / "html" / "book" / "intro.html"
print(json.dumps({"runs": len(records), "train_seconds": round(sum(seconds), 1),
                  "slowest_run_seconds": round(max(seconds, default=0), 1),
                  "html": str(html) if html.is_file() else None}))
EOF
}

main() {
    echo "## paper_rehearsal: device=$DEVICE quick=$QUICK profiles=\"$PROFILES\" work=$WORK"
    echo "## data: cifar100 $TRAIN/$TEST, imagenet ${IMAGENET_CLASSES}x($IMAGENET_TRAIN/$IMAGENET_VAL)" \
         "$IMAGENET_SIZE;" \
         "schedule: --epochs $EPOCHS --stage-epochs $STAGE_EPOCHS --teacher-epochs $TEACHER_EPOCHS;" \
         "--jobs $JOBS --jobs-per-device $JOBS_PER_DEVICE --compile $COMPILE; budget ${TOTAL_S} s"
    if [ "$FRESH" = 1 ]; then
        local p
        for p in $PROFILES; do rm -rf "$WORK/book-$p" "$WORK/runs-$p" "$WORK/tables-$p"; done
        rm -rf "$DATA"
    fi
    mkdir -p "$WORK"
    "$PY" -c "import json, torch, torchvision; print(json.dumps({'torch': torch.__version__,
        'torchvision': torchvision.__version__, 'cuda': torch.version.cuda,
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"
    # What this python can do: execute notebooks (papermill, a python3 kernel, myst_nb's glue), build HTML.
    local notebooks=yes
    "$PY" -c "import papermill, ipykernel, nbformat, myst_nb" 2> /dev/null || notebooks=no
    NOTE=""
    if [ "$MODE" = auto ]; then
        MODE=$([ "$notebooks" = yes ] && echo book || echo direct)
        [ "$MODE" = direct ] && NOTE="papermill/ipykernel/myst_nb missing: the notebooks' calls made directly, \
no notebook executed"
    fi
    HTML=skipped
    if [ "$MODE" = direct ]; then
        HTML="not built: no notebooks executed"
    elif "$PY" -c "import jupyter_book" 2> /dev/null; then
        HTML=requested
    else
        HTML="skipped: jupyter-book missing (--skip-html)"
    fi
    echo "## mode=$MODE html=\"$HTML\"${NOTE:+ ($NOTE)}"

    export MODE HTML
    # A function cannot run under `timeout`: the script runs itself for each phase.
    phase data 120 bash benchmarks/paper_rehearsal.sh --data
    local p q weight rest stores=()
    for p in $PROFILES; do
        if [ -f "$DATA/.rehearsal-data" ]; then
            # A profile gets its share of what is left of the budget, by its weight (the paper profile has about
            # 2.5 times the course profile's runs) among the profiles still to run.
            weight=$(profile_weight "$p") rest=0
            for q in ${PROFILES#*"$p"}; do rest=$((rest + $(profile_weight "$q"))); done
            phase "$p" "$(((TOTAL_S - SECONDS) * weight / (weight + rest)))" bash benchmarks/paper_rehearsal.sh \
                --profile "$p"
        else
            PHASES+=("$p	false	0	skipped: no data")
            FAILED+=("$p")
        fi
        stores+=("$p=$(store_summary "$WORK/runs-$p" "$WORK/book-$p")")
    done
    local status=ok
    [ "${#FAILED[@]}" -gt 0 ] && status=failed
    printf '%s\n' "${PHASES[@]}" | "$PY" -c '
import json, sys
(status, seconds, mode, html, note, device, quick, work, epochs, stage, teacher, jpd, train, test,
 imagenet) = sys.argv[1:16]
phases = {}
for line in sys.stdin.read().splitlines():
    name, ok, took, detail = (line.split("\t") + [""] * 4)[:4]
    phases[name] = {"ok": ok == "true", "seconds": int(took), **({"error": detail} if detail else {})}
for item in sys.argv[16:]:
    name, _, store = item.partition("=")
    phases.setdefault(name, {}).update(json.loads(store) if store else {})
summary = {"paper_rehearsal": status, "seconds": int(seconds), "device": device, "quick": quick == "1",
           "mode": mode, "html": html,
           "schedule": f"--epochs {epochs} --stage-epochs {stage} --teacher-epochs {teacher}",
           "jobs_per_device": int(jpd), "data": {"cifar100_train": int(train), "cifar100_test": int(test),
           "imagenet": imagenet}, "phases": phases, "work": work}
if note:
    summary["note"] = note
failed = [n for n, v in phases.items() if not v.get("ok", False)]
if failed:
    summary["failed_phases"] = failed
print(json.dumps(summary))
' "$status" "$SECONDS" "$MODE" "$HTML" "$NOTE" "$DEVICE" "$QUICK" "$WORK" "$EPOCHS" "$STAGE_EPOCHS" \
        "$TEACHER_EPOCHS" "$JOBS_PER_DEVICE" "$TRAIN" "$TEST" \
        "${IMAGENET_CLASSES} classes x ${IMAGENET_TRAIN}/${IMAGENET_VAL} ${IMAGENET_SIZE}" "${stores[@]}"
    [ "$status" = ok ]
}

case "${1:-}" in
    --data) make_data; exit $? ;;
    --profile) profile "$2"; exit $? ;;
esac
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ -w "$OUT" ]; then
    main 2>&1 | tee "$OUT/paper_rehearsal.log"
    exit "${PIPESTATUS[0]}"
fi
main

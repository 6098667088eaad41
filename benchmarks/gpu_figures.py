"""Write the GPU figures the plan's estimates extrapolate from (``kcdlib/gpu_figures.json``, read by
:func:`kcdlib.estimate.figures`) from two results of ``gpu_check.sh``: the engine's measured epoch and the
concurrency check, both at the book's defaults (fp32, eager steps). Each figure keeps its card, torch version,
date and the command that measured it; the file is checked as the estimate checks it before it is written.

    python3 benchmarks/gpu_figures.py --epoch epoch.json --epoch-command "..." \\
        --concurrency concurrency.json --concurrency-command "..." --source "..." --out kcdlib/gpu_figures.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from kcdlib import files
from kcdlib.errors import KcdError
from kcdlib.estimate import FORMAT, check_figures


def figures(epoch: dict, conc: dict, epoch_command: str, conc_command: str, source: str, date: str) -> dict:
    """The file's content from ``bench_epoch.py --mode engine --steps 0``'s JSON line (``epoch``) and the
    concurrency step's (``conc``)."""

    def provenance(row: dict, command: str, step: str) -> dict:
        return {"card": row["device_name"], "torch": row["torch"], "date": date, "command": command,
                "source": f"{source}, step {step}"}  # fmt: skip

    return {
        "format": FORMAT,
        "epoch": {
            "what": "one measured epoch of the engine alone (KD), CIFAR-shaped synthetic images; no evaluation",
            **provenance(epoch, epoch_command, "epoch"),
            **{k: epoch[k] for k in ("teacher", "student", "batch_size", "precision", "compile")},
            "images": epoch["engine_images"],
            "seconds": epoch["engine_seconds"],
        },
        "concurrency": {
            "what": "engine processes at once on one card, their timed windows overlapping, against one alone",
            **provenance(conc, conc_command, "concurrency"),
            **{
                k: conc[k]
                for k in (
                    "precision",
                    "compile",
                    "processes",
                    "steps_each",
                    "single_images_per_second",
                    "group_images_per_second",
                    "overlap_fraction",
                )
            },
        },  # fmt: skip
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epoch", required=True, help="bench_epoch.py --mode engine --steps 0's JSON line, in a file")
    p.add_argument("--epoch-command", required=True, help="the command that measured it")
    p.add_argument("--concurrency", required=True, help="gpu_check.sh --concurrency's JSON line, in a file")
    p.add_argument("--concurrency-command", required=True, help="the command that measured it")
    p.add_argument("--source", required=True, help="where the log of both is kept")
    p.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    p.add_argument("--out", required=True, help="the file to write (kcdlib/gpu_figures.json on the GPU machine)")
    args = p.parse_args(argv)
    try:
        epoch, conc = (files.read_json(Path(path)) for path in (args.epoch, args.concurrency))
        data = figures(epoch, conc, args.epoch_command, args.concurrency_command, args.source, args.date)
        check_figures(data, args.out)
    except (OSError, KeyError, TypeError, ValueError, KcdError) as err:
        print(json.dumps({"benchmark": "gpu_figures", "ok": False, "error": f"{type(err).__name__}: {err}"}))
        return 1
    files.atomic_write(Path(args.out), (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode())
    print(json.dumps({"benchmark": "gpu_figures", "ok": True, "out": args.out, "card": data["epoch"]["card"],
                      "seconds_per_epoch": data["epoch"]["seconds"], "images": data["epoch"]["images"],
                      "concurrency": data["concurrency"]["group_images_per_second"]
                      / data["concurrency"]["single_images_per_second"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

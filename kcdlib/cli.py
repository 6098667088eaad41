"""The ``kcd`` command line: train teachers, distil students, build the book.

Every run goes through the run store, so a finished run is reused and a killed one resumes. Errors caused by the
input (an unknown name, a missing dataset, a checkpoint of another architecture) print one paragraph on standard
error and exit with status 2; the record's path is the last line of standard output.

``torchrun --nproc-per-node N -m kcdlib distill ...`` trains one run on N processes (:mod:`kcdlib.distributed`);
``--nproc N`` launches that itself. Process 0 alone prints.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import warnings

from . import archive, cluster, distributed, models
from .buildoptions import KNOBS, BuildOptions
from .data import DECODES
from .distillers import DISTILLERS
from .errors import BadOption, KcdError
from .fastpath import COMPILE_MODES, PRECISIONS
from .identity import MAX_SEED, RunConfig, distill_config, teacher_config
from .methods import METHODS
from .options import device as resolve_device
from .profiles import published_teachers
from .runs import RunStore
from .verify import VerificationFailed, summary, verify_store

EXIT_FAILED = 1  # a check failed (kcd runs verify, kcd book --verify)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def at_least(low: int, high: int | None = None):
    """An argparse type: an integer no smaller than ``low`` (and no larger than ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def add_stale(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--rerun",
        action="store_const",
        dest="stale",
        const="rerun",
        default="stop",
        help="train anew a run whose record in the store was made on other data or by other numerics",
    )
    g.add_argument("--keep-stale", action="store_const", dest="stale", const="keep",
                   help="reuse such a record as it is")  # fmt: skip


def add_knobs(group, *owners: str) -> None:
    """The loss and KCD knobs (:data:`kcdlib.buildoptions.KNOBS`) of ``owners`` as flags: ``--kd-weight`` sets the
    option ``kd_weight``, one name from the flag to the record."""
    for name, owner in KNOBS.items():
        if owner in owners:
            group.add_argument(f"--{name.replace('_', '-')}", type=float, help=BuildOptions.help(name))


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="digits (embedded, default), cifar100 or imagenet")
    p.add_argument("--data-root", default="data", help="folder holding cifar-100-python/ or imagenet train/ val/")
    p.add_argument(
        "--epochs", type=at_least(1), help="training epochs (default: the dataset's protocol; lr milestones scale)"
    )
    p.add_argument(
        "--seed", type=at_least(0, MAX_SEED), default=0, help="seed of initialisation, data order and augmentation"
    )
    p.add_argument("--runs-dir", default="runs", help="the run store (default: ./runs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--precision", default="fp32", choices=PRECISIONS, help="fp32 (default) or bf16 autocast for the networks"
    )
    p.add_argument(
        "--compile", default="off", choices=COMPILE_MODES,
        help="how steps run on a GPU: off (eager), default (torch.compile), reduce-overhead (compiled, with CUDA "
        "graphs per network), graph (the whole step as one CUDA graph), default+graph",
    )  # fmt: skip
    p.add_argument(
        "--decode", default="pil", choices=DECODES,
        help="how ImageNet's JPEGs are decoded and augmented: pil (default: PIL in DataLoader workers) or gpu "
        "(nvjpeg, crops and flips on the CUDA device; other pixels, so another run)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=at_least(1), help="train the run on N processes of this machine, one per GPU "
                   "(launches torchrun; the same run, the same record: see README, 'Several GPUs')")  # fmt: skip
    add_stale(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kcd",
        description="Knowledge Condensation Distillation (ECCV 2022), reproduced. Every run is recorded under "
        "--runs-dir/<config hash>/record.json; finished runs are reused, interrupted ones resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              kcd teacher --dataset digits --arch resnet20
              kcd distill --dataset digits --teacher resnet20 --student resnet8 --distiller kd
              kcd distill --dataset cifar100 --data-root ~/data --teacher-ckpt wrn_40_2.pth \\
                          --teacher-arch wrn_40_2 --student wrn_16_2 --device cuda"""
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("teacher", help="train (or reuse) a teacher with cross-entropy")
    t.add_argument("--arch", required=True, help="architecture, e.g. resnet32x4, wrn_40_2 (see `kcd models`)")
    add_common(t)

    d = sub.add_parser("distill", help="distil a student from a teacher run or a teacher checkpoint")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="ARCH", help="use (training first if missing) the cached teacher run")
    src.add_argument("--teacher-ckpt", metavar="PATH", help="a RepDistiller checkpoint {'model': state_dict}")
    d.add_argument("--teacher-arch", help="architecture of --teacher-ckpt (default: guessed from the file name)")
    d.add_argument("--student", required=True, help="student architecture")
    d.add_argument("--distiller", default="kd", help=f"one of: {', '.join(sorted(set(DISTILLERS) - {'ce'}))}")
    d.add_argument("--method", default="kd", help=f"one of: {', '.join(sorted(METHODS))} (default kd)")
    d.add_argument(
        "--teacher-epochs", type=at_least(1), help="epochs of the cached teacher run (default: the protocol)"
    )
    d.add_argument("--teachers-dir", help="with --teacher: use RepDistiller's published checkpoint of that "
                   "architecture (<arch>_vanilla/ckpt_epoch_240.pth) when the folder holds one")  # fmt: skip
    k = d.add_argument_group("KCD (--method kcd)")
    add_knobs(k, "kcd")
    k.add_argument(
        "--stage-epochs", type=at_least(1), help="epochs per stage T (default: epochs/6, the paper's 40 of 240)"
    )
    k.add_argument("--schedule", choices=["paper", "official"], help="keep-ratio schedule: paper (Eq. 16, default) "
                   "or official (the released code's)")  # fmt: skip
    k.add_argument("--augment", choices=["K1L", "K1H", "random", "none"], help="knowledge augmentation (default K1L)")
    k.add_argument("--eps-m", type=float, help="ε_m, the smallest mixing ratio (default 0.7)")
    k.add_argument(
        "--value",
        choices=["entropy", "ce", "random"],
        help="value signal: entropy (the paper's), ce (the loss on the label), random (ablation baseline)",
    )
    u = d.add_argument_group("UNIX (--method unix)")
    u.add_argument("--unix-k", type=at_least(1), help="samples distilled per batch k (default 48)")
    u.add_argument("--unix-b", type=at_least(1), help="mixup mask centre b (default 32)")
    u.add_argument("--unix-w", type=float, help="mixup mask steepness w (default 10)")
    add_knobs(d.add_argument_group("loss (the distiller's options; defaults: the paper's for each distiller)"), "loss")
    add_common(d)

    sub.add_parser("models", help="list the architectures")

    b = sub.add_parser("book", help="run every notebook on a profile (papermill) and build the HTML book")
    b.add_argument("--profile", default="smoke", help="smoke (default, CPU), course, paper or tiny")
    b.add_argument("--data-root", default="data", help="folder holding cifar-100-python/ or imagenet train/ val/")
    b.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the profile's)")
    b.add_argument("--runs-dir", help="the run store (default: runs/ in the checkout)")
    b.add_argument("--skip-html", action="store_true", help="execute the notebooks only, do not build the HTML")
    b.add_argument("--out", help="build the book in this folder (default: the checkout itself)")
    b.add_argument("--jobs", type=at_least(1), default=1, help="notebooks executed at a time (default 1)")
    b.add_argument("--devices", help="comma-separated devices to spread runs over, e.g. cuda:0,cuda:1")
    b.add_argument("--seeds", type=seed_list, help="comma-separated seeds of every table's runs, e.g. 0,1,2 (default: "
                   "the profile's)")  # fmt: skip
    b.add_argument(
        "--jobs-per-device", type=at_least(1), default=1, help="runs trained at once on each device (default 1)"
    )
    b.add_argument("--compile", default="off", choices=COMPILE_MODES, help="how steps run (see kcd distill --help)")
    b.add_argument("--teachers-dir", help="RepDistiller's published teachers (<arch>_vanilla/ckpt_epoch_240.pth), "
                   "used wherever one exists instead of training the profile's own")  # fmt: skip
    o = b.add_argument_group("a shorter schedule (a rehearsal of a long profile; every table still says it)")
    o.add_argument("--epochs", type=at_least(1), help="epochs of every run (Table 3's too)")
    o.add_argument("--stage-epochs", type=at_least(1), help="KCD's stage length T (epochs must be a multiple)")
    o.add_argument("--teacher-epochs", type=at_least(1), help="epochs of the teachers trained here")
    add_knobs(b.add_argument_group("the course's knobs: run options of every run they apply to (another value is "
                                   "another run, trained once)"), "loss", "kcd")  # fmt: skip
    b.add_argument("--plan", action="store_true", help="train nothing: list the runs the book needs, which the run "
                   "store holds, and their estimated device time (a few steps timed on --device)")  # fmt: skip
    b.add_argument("--verify", action="store_true", help="after the notebooks, re-evaluate every finished run of "
                   "the runs dir (as `kcd runs verify`); a failure fails the build")  # fmt: skip
    b.add_argument("--only", help="comma-separated notebooks (e.g. table1): only their runs and pages")
    b.add_argument(
        "--from-records",
        action="store_true",
        help="render from the run store alone (runs imported "
        "with kcd runs import): train nothing, use the recorded data fingerprints, name missing runs",
    )
    add_stale(b)
    cluster.add_options(b, at_least)

    r = sub.add_parser("runs", help="the run store: verify its runs, export them to an archive, import one")
    runs_sub = r.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    v = runs_sub.add_parser("verify", help="re-evaluate each stored final model on its test split and check the "
                            "record's accuracies, the model's hash and the data's fingerprint")  # fmt: skip
    v.add_argument("run", nargs="*", metavar="RUN", help="run hashes or run folders (default: every finished run)")
    v.add_argument("--runs-dir", default="runs", help="the run store (default: ./runs)")
    v.add_argument("--data-root", default="data", help="folder holding cifar-100-python/ or imagenet train/ val/")
    v.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    archive.add_parsers(runs_sub)

    n = sub.add_parser("notebook", help="execute one notebook of the book with new parameters (papermill), e.g. "
                       "kcd notebook table5 -p temperature 2 -y 'seeds: [0, 1, 2]'")  # fmt: skip
    n.add_argument("name", help="the notebook: table1 ... table7, figure5, kcd_in_five_minutes")
    n.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a parameter of its parameters cell (a number, True/False/None or text)")  # fmt: skip
    n.add_argument("-y", "--yaml", action="append", default=[], help="parameters as YAML, for lists: 'seeds: [0, 1]'")
    n.add_argument("--out", help="the executed notebook (default: NAME.ipynb here)")
    return parser


def seed_list(text: str) -> list[int]:
    """An argparse type: ``0,1,2``."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None


def build_options(args, repo) -> BuildOptions:
    """``kcd book``'s flags as the build's options: each flag is the field of its name."""
    given = {k: v for k, v in vars(args).items() if k in BuildOptions.names() and v is not None}
    given["runs_dir"] = args.runs_dir or str(repo / "runs")
    if args.devices:
        given["devices"] = args.devices.split(",")
    return BuildOptions.from_mapping(given)


def notebook_value(text: str):
    """A ``-p`` value as papermill reads it: True/False/None, a whole number, a number, else the text."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def notebook_parameters(args) -> dict:
    import yaml

    parameters = {name: notebook_value(value) for name, value in args.parameter}
    for text in args.yaml:
        try:
            given = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise BadOption(f"-y '{text}' is not YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(given, dict):
            raise BadOption(f"-y '{text}' must be 'name: value' (e.g. -y 'seeds: [0, 1, 2]')")
        parameters.update(given)
    return parameters


def guess_arch(path: str) -> str:
    """The architecture a RepDistiller checkpoint's path names (``.../wrn_40_2_vanilla/ckpt_epoch_240.pth``)."""
    matches = [a for a in models.ARCHS if a in path]
    if not matches:
        raise BadOption(f"cannot tell the architecture of '{path}' from its name: pass --teacher-arch")
    return max(matches, key=len)


# The flags of `kcd distill` -> the options they set: the knobs' own (kcdlib.buildoptions.KNOBS), and the rest.
DISTILLER_FLAGS = {name: name for name, owner in KNOBS.items() if owner == "loss"}
METHOD_FLAGS = {
    "kcd": {**{name: name for name, owner in KNOBS.items() if owner == "kcd"},
            "stage_epochs": "stage_epochs", "schedule": "schedule", "augment": "augment", "eps_m": "eps_m",
            "value": "value"},
    "unix": {"unix_k": "k", "unix_b": "b", "unix_w": "w"},
}  # fmt: skip


def distiller_options(args) -> dict:
    """The distiller's options given on the command line (the distiller refuses those it does not have)."""
    return {option: getattr(args, flag) for flag, option in DISTILLER_FLAGS.items() if getattr(args, flag) is not None}


def method_options(args) -> dict:
    """The method's options given on the command line; a flag of another method is an error."""
    options = {}
    for method, flags in METHOD_FLAGS.items():
        for flag, option in flags.items():
            value = getattr(args, flag)
            if value is None:
                continue
            if method != args.method:
                raise BadOption(f"--{flag.replace('_', '-')} belongs to --method {method}, not {args.method}")
            options[option] = value
    return options


def config_from_args(args) -> RunConfig:
    """The run the command line asks for, every option checked (by the run config itself) before any training."""
    if args.command == "teacher":
        return teacher_config(args.dataset, args.arch, args.seed, args.epochs, args.precision, args.decode)
    if args.distiller == "ce":
        raise BadOption("'ce' trains without a teacher: use `kcd teacher`")
    common = dict(
        distiller=args.distiller, distiller_options=distiller_options(args), method=args.method,
        method_options=method_options(args), epochs=args.epochs, seed=args.seed, precision=args.precision,
        decode=args.decode,
    )  # fmt: skip
    if args.teachers_dir and not args.teacher:
        raise BadOption("--teachers-dir goes with --teacher ARCH (which published teacher to look for)")
    published = published_teachers(args.teachers_dir, [args.teacher]) if args.teachers_dir else {}
    if args.teacher and args.teacher in published:
        if args.teacher_epochs:
            raise BadOption(f"--teacher-epochs is for a teacher trained here, and {published[args.teacher]} is a "
                            "published one")  # fmt: skip
        args.teacher_ckpt, args.teacher_arch, args.teacher = published[args.teacher], args.teacher, None
    if args.teacher:
        if args.teacher_arch:
            raise BadOption("--teacher-arch is for --teacher-ckpt; --teacher already names the architecture")
        teacher = teacher_config(args.dataset, args.teacher, 0, args.teacher_epochs, args.precision, args.decode)
        return distill_config(args.dataset, args.student, teacher=teacher, **common)
    if args.teacher_epochs:
        raise BadOption("--teacher-epochs is for a teacher trained here (--teacher), not a checkpoint (--teacher-ckpt)")
    arch = args.teacher_arch or guess_arch(args.teacher_ckpt)
    return distill_config(args.dataset, args.student, teacher_checkpoint=args.teacher_ckpt, teacher_arch=arch, **common)


def summary_line(cfg: RunConfig, rec: dict) -> str:
    who = cfg.arch if cfg.kind == "teacher" else f"{cfg.teacher_arch} -> {cfg.arch} ({cfg.distiller}, {cfg.method})"
    return (
        f"{cfg.kind} {who} on {cfg.dataset}: top-1 {rec['final_top1']:.2f} % (best {rec['best_top1']:.2f}), "
        f"top-5 {rec['final_top5']:.2f} %, computation {100 * rec['computation']:.1f} %, "
        f"{rec['wall_seconds']:.1f} s"
    )


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (a fallback to eager steps, say) as one line for the reader, not a source location."""
    print(f"kcd: warning: {message}", file=sys.stderr if file is None else file)


def launch(argv: list[str], nproc: int) -> int:
    """``kcd ... --nproc N``: the same command under torchrun, on N processes of this machine."""
    if distributed.launched_by_torchrun():
        print("kcd: error: --nproc launches torchrun, and this process already runs under it", file=sys.stderr)
        return EXIT_USAGE
    proc = subprocess.Popen(distributed.torchrun_command(nproc, distributed.without_nproc(argv)),
                            preexec_fn=distributed.die_with(os.getpid()))  # fmt: skip
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C (one process group): it stops its workers
        proc.wait()
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if getattr(args, "nproc", None):
        return launch(argv, args.nproc)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        return run(args)


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "models":
            print("\n".join(models.ARCHS))
            return 0
        if args.command == "runs" and args.runs_command == "verify":
            device = resolve_device(args.device)
            verdicts = verify_store(args.runs_dir, args.run or None, args.data_root, device, echo=print)
            print(summary(verdicts, args.runs_dir))
            return 0 if all(v.ok for v in verdicts) else EXIT_FAILED
        if args.command == "runs":
            from .plan import runs_command

            return runs_command(args)
        if args.command == "book":
            from .book import REPO, build_book

            build = build_options(args, REPO)
            if args.plan:
                from .plan import plan_command

                print(plan_command(build))
                return 0
            out = build_book(
                build, html=not args.skip_html, jobs=args.jobs, out=args.out, verify=args.verify,
                names=tuple(args.only.split(",")) if args.only else None, from_records=args.from_records,
                slurm=cluster.options_from_args(args, build.runs_dir) if args.executor == "slurm" else None,
                wait=not args.no_wait,
            )  # fmt: skip
            if out is not None:
                print(out)
            return 0
        if args.command == "notebook":
            from .book import run_notebook

            print(run_notebook(args.name, notebook_parameters(args), args.out or f"{args.name}.ipynb"))
            return 0
        cfg = config_from_args(args)
        # Under torchrun: this process's part of the run, on cuda:LOCAL_RANK (NCCL) or the CPU (gloo).
        group = distributed.from_env(args.device)
        device = resolve_device(args.device) if group is None else str(group.device)
        store = RunStore(args.runs_dir, args.data_root, device, args.compile, args.stale, group=group)
        rec = store.ensure(cfg, progress=not args.no_progress, log=lambda line: print(f"kcd: {line}", file=sys.stderr))
        if store.writer:
            print(summary_line(cfg, rec))
            record = store.path(cfg) / "record.json"
            if not record.exists() and store.stale == "keep":  # --keep-stale reused an older folder's record
                record = store.stale_records(cfg)[-1][0] / "record.json"
            print(record)
        return 0
    except VerificationFailed as err:
        print(f"kcd: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KcdError as err:
        rank = os.environ.get("RANK", "0") if distributed.launched_by_torchrun() else "0"
        print(f"kcd: error{'' if rank == '0' else f' (process {rank})'}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "kcd: interrupted; run the same command again to resume from the last finished epoch",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())

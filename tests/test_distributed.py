"""One run on two processes (torchrun, gloo): the sharding rule, the bookkeeping of one process, weights within
rounding, and a process killed mid-run that torchrun restarts to the record of the uninterrupted run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, STUDENT, TEACHER, TEACHER_EPOCHS, copy_run
from test_data import write_image_folder
from test_store import leftovers, stable, stored

from kcdlib.cli import build_parser, config_from_args
from kcdlib.data import batch_part, load_dataset, load_digits
from kcdlib.distributed import part_sizes, torchrun_command, without_nproc
from kcdlib.runs import RunStore

# Two epochs of one stage each: one condensation (entropy-ranked, mixed images), checkpointed after each epoch.
ARGS = ["distill", "--dataset", "digits", "--teacher", TEACHER, "--teacher-epochs", str(TEACHER_EPOCHS),
        "--student", STUDENT, "--epochs", "2", "--method", "kcd", "--stage-epochs", "1", "--seed", "3",
        "--device", "cpu", "--no-progress"]  # fmt: skip
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("world", [2, 3])
def test_the_parts_of_each_global_batch_are_that_batch(world):
    data = load_digits("cpu")
    points = torch.arange(0, 129)  # batches of 64, 64 and 1: the last has fewer points than processes
    whole = list(data.train_batches(points, 64, seed=5, epoch=2))
    parts = [list(data.train_batches(points, 64, seed=5, epoch=2, shard=(r, world))) for r in range(world)]
    assert all(len(p) == len(whole) for p in parts), "every process must take part in every step"
    for b, batch in enumerate(whole):
        assert [p[b][0].shape[0] for p in parts] == part_sizes(batch[0].shape[0], world)
        for joined, full in zip(zip(*(p[b] for p in parts)), batch):
            assert torch.equal(torch.cat(joined), full)  # images (augmented), labels, point indices
    test = [torch.cat([y for _, y in data.test_batches(100, shard=(r, world))]) for r in range(world)]
    assert torch.equal(torch.cat(test), data.test_labels)
    assert batch_part(10, 15, (0, 2)) == slice(10, 13) and batch_part(10, 15, (1, 2)) == slice(13, 15)


@pytest.mark.parametrize("decode, world", [("pil", 2), ("gpu", 2), ("gpu", 3)])
def test_imagenet_decodes_only_the_parts_of_its_process(tmp_path, decode, world):
    write_image_folder(tmp_path, np.random.default_rng(0))
    data = load_dataset("imagenet", str(tmp_path), decode=decode)  # "gpu": the device pipeline, here on the CPU
    data.workers = 0
    points = torch.tensor([0, 1, 2, 3, 5])  # batches of 4 and 1
    whole = list(data.train_batches(points, 4, seed=1, epoch=1))
    parts = [list(data.train_batches(points, 4, seed=1, epoch=1, shard=(r, world))) for r in range(world)]
    for b, batch in enumerate(whole):
        assert [p[b][2].shape[0] for p in parts] == part_sizes(batch[2].shape[0], world)
        assert torch.equal(torch.cat([p[b][2] for p in parts]), batch[2])
        if decode == "gpu":  # each position's crop is drawn from (seed, epoch): the same pixels in any part
            assert torch.equal(torch.cat([p[b][0] for p in parts]), batch[0])
    test = [torch.cat([y for _, y in data.test_batches(4, shard=(r, world))]) for r in range(world)]
    assert torch.cat(test).tolist() == [y for _, y in data.test_set.samples]


def test_nproc_launches_torchrun_with_the_rest_of_the_command():
    argv = ["distill", "--nproc", "4", "--student", "resnet8", "--nproc=4", "--npr", "2", "--seed", "1"]
    assert without_nproc(argv) == ["distill", "--student", "resnet8", "--seed", "1"]
    command = torchrun_command(4, ["distill"])
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=4" in command
    assert command[-3:] == ["-m", "kcdlib", "distill"]


def torchrun(*args, max_restarts=0, env=None, log=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.5", *args]  # fmt: skip
    return subprocess.Popen(command, env={**CHILD_ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_two_processes_train_the_run_one_process_trains(store, digits_teacher, tmp_path):
    roots = {name: tmp_path / name for name in ("one", "two", "killed")}
    for root in roots.values():
        copy_run(store, digits_teacher, root)
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("two", "killed")}
    # Beside each other: the run on two processes, and the same run with process 1 killed (SIGKILL) after its
    # first epoch, which torchrun restarts, every process resuming from process 0's checkpoint of that epoch.
    two = torchrun(str(WORKER), str(tmp_path / "two.json"), str(roots["two"]), *ARGS, log=logs["two"])
    killed = torchrun("-m", "kcdlib", *ARGS, "--runs-dir", str(roots["killed"]), max_restarts=1, log=logs["killed"],
                      env={"KCD_KILL_AT": "epoch:1", "KCD_KILL_RANK": "1"})  # fmt: skip
    try:
        cfg = config_from_args(build_parser().parse_args(ARGS))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each process of the group
        try:
            one = RunStore(roots["one"]).ensure(cfg, progress=False)
        finally:
            torch.set_num_threads(threads)
        assert two.wait(timeout=300) == 0, (tmp_path / "two.log").read_text()
        assert killed.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()
    finally:
        for p in (two, killed):
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
    seen = json.loads((tmp_path / "two.json").read_text())
    run = Path(seen["run"])
    assert run.name == RunStore(roots["one"]).path(cfg).name, "the number of processes entered the run's identity"
    rec = stored(run)

    # Bookkeeping: the points of every epoch (count; the first stage's set by hash), the counted computation, the
    # stages, as one process; the record says two processes trained it.
    assert (one["world_size"], rec["world_size"], seen["record_world_size"]) == (1, 2, 2)
    assert [r["points"] for r in rec["epochs"]] == [r["points"] for r in one["epochs"]]
    assert rec["epochs"][0]["points_sha"] == one["epochs"][0]["points_sha"]
    for key in ("points_distilled", "points_trained", "passes", "computation", "computation_formula",
                "never_distilled", "stage_epochs"):  # fmt: skip
        assert rec[key] == one[key], key
    assert [(s["kept"], s["mixed"]) for s in rec["stages"]] == [(s["kept"], s["mixed"]) for s in one["stages"]]
    # The checkpoint holds what one process's holds (no DDP prefix, the same BatchNorm buffers).
    alone = RunStore(roots["one"]).build_trainer(cfg, progress=False)
    assert seen["checkpoint_keys"] == sorted(alone.state_dict())
    assert seen["student_keys"] == sorted(alone.student.state_dict())

    # Numerics. One step of the global batch updates the weights as one process does, to 1e-3 of the update (3e-5
    # measured: the order of the sums differs; per tensor, BatchNorm's bias gradients are sums that cancel, and one
    # process on 2 threads instead of 1 already moves some by 3 %), and the accuracy the processes record together
    # is that of the whole test split.
    assert seen["step_weight_difference"] < 1e-3, seen["step_weight_difference"]
    assert seen["sharded_accuracy"] == seen["whole_split_accuracy"]
    # Over two epochs such differences grow as they do between thread counts, and the entropies of a barely trained
    # student lie close together: the condensed set agrees on most points, not all (one thread or two: 95 %).
    same = sum(a == b for a, b in zip(rec["value_labels"], one["value_labels"])) / len(one["value_labels"])
    assert same > 0.85, same

    # The process killed and restarted by torchrun: the uninterrupted run's record and weights, nothing left over.
    log = (tmp_path / "killed.log").read_text()
    assert "(exitcode: -9) local_rank: 1" in log, f"process 1 was not killed: {log[-3000:]}"
    resumed = stored(RunStore(roots["killed"]).path(cfg))
    assert resumed["model_sha256"] == rec["model_sha256"], "the weights differ from the uninterrupted run's"
    assert stable(resumed) == stable(rec)
    assert leftovers(RunStore(roots["killed"]).path(cfg)) == []
    assert log.strip().splitlines()[-1] == str(RunStore(roots["killed"]).path(cfg) / "record.json")

"""Run by torchrun in tests/test_distributed.py: ``ddp_worker.py OUT.json RUNS_DIR KCD-ARGS...``.

One step of the global batch on the process group against the same step by process 0 alone (the difference of the
two updates, relative to the update), the sharded evaluation against process 0's evaluation of the whole test split
with the same weights, the keys of a checkpoint, then the run itself through the run store, as ``kcd distill``
trains it. Process 0 writes what it saw to OUT.json.
"""

import json
import sys

import torch

from kcdlib import distributed
from kcdlib.cli import build_parser, config_from_args
from kcdlib.runs import RunStore
from kcdlib.train import evaluate


def first_batch(trainer, shard=None):
    kw = {} if shard is None else {"shard": shard}
    batches = trainer.data.train_batches(None, trainer.recipe.batch_size, trainer.seed, 1, **kw)
    return next(iter(batches))


def main(out: str, runs_dir: str, *args: str) -> None:
    torch.set_num_threads(1)
    group = distributed.from_env("cpu")
    store = RunStore(runs_dir, device="cpu", group=group)
    cfg = config_from_args(build_parser().parse_args(list(args)))
    store.ensure(cfg.teacher, progress=False)
    trainer = store.build_trainer(cfg, progress=False)
    x, y, idx = first_batch(trainer, group.shard)
    group.layout(trainer.recipe.batch_size)
    y, idx = group.gather(y, idx)
    trainer.step(x, y, idx)
    report = {"world_size": group.world_size, "checkpoint_keys": sorted(trainer.state_dict())}
    report["student_keys"] = sorted(trainer.student.state_dict())
    report["sharded_accuracy"] = evaluate(trainer.student, trainer.data, group=group)
    if group.is_writer:  # the same step by this process alone, from the same initialisation
        alone = store.build_trainer(cfg, progress=False, alone=True)
        start = {k: v.clone() for k, v in alone.student.state_dict().items() if v.is_floating_point()}
        alone.step(*first_batch(alone))
        mine, ref = trainer.student.state_dict(), alone.student.state_dict()
        # The difference of the two updates, relative to the update, over all weights and BatchNorm statistics.
        diff = sum(float((mine[k] - ref[k]).square().sum()) for k in start)
        update = sum(float((ref[k] - start[k]).square().sum()) for k in start)
        report["step_weight_difference"] = (diff / update) ** 0.5
        report["whole_split_accuracy"] = evaluate(trainer.student, trainer.data)
    group.barrier()
    record = store.ensure(cfg, progress=False)
    if group.is_writer:
        report["run"] = str(store.path(cfg))
        report["record_world_size"] = record["world_size"]
        with open(out, "w") as f:
            json.dump(report, f)
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:])

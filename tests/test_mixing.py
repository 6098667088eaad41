"""KCD's knowledge augmentation on files (kcdlib.data.mixing): the recipes replay the in-memory mixes bit for bit,
survive a checkpoint, and a KCD run on a generated ImageFolder trains, mixes and resumes through the run store."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import copy_run
from test_store import stable

from kcdlib import condense, data
from kcdlib.data import ImageNetData
from kcdlib.data.mixing import MixedImageFolder, MixRecipes, fit
from kcdlib.errors import CheckpointError
from kcdlib.identity import distill_config, teacher_config
from kcdlib.records import load_tensors, tensor_bytes
from kcdlib.runs import RunStore
from kcdlib.train import Trainer

CLASSES, PER_CLASS, SIDE = ("n01", "n02", "n03"), 10, 16  # 30 knowledge points


def write_folder(base, pixels_of, val=2):
    """An ImageFolder of lossless PNGs: ``pixels_of(i)`` (HWC uint8) is training point ``i``'s file."""
    from PIL import Image

    for split, count in (("train", PER_CLASS), ("val", val)):
        for c, cls in enumerate(CLASSES):
            (base / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                i = c * PER_CLASS + k  # ImageFolder's order: classes sorted, then file names
                pixels = pixels_of(i) if split == "train" else pixels_of(0)
                Image.fromarray(pixels).save(base / split / cls / f"{k:03d}.png")


def random_pixels(seed, size=lambda i: (12, 14)):
    rng = np.random.default_rng(seed)
    table = [rng.integers(0, 256, (*size(i), 3), dtype=np.uint8) for i in range(len(CLASSES) * PER_CLASS)]
    return table.__getitem__


def condense_three_times(n, seed=3):
    """Three condensations (30 -> 24 -> 18 -> 12, K1L) of a value record filled with fixed random values."""
    record = condense.ValueRecord(n)
    g = torch.Generator().manual_seed(seed)
    plans, sizes = [], [n, 24, 18, 12]
    for stage in range(1, 4):
        record.record(torch.arange(n), torch.rand(n, generator=g))
        record.end_epoch()
        plans.append(condense.summarize(record, sizes[stage - 1], sizes[stage], alpha=0.03, stage_epochs=1,
                                        augment="K1L"))  # fmt: skip
    return plans


def test_recipes_replay_the_in_memory_mixes_bit_for_bit(tmp_path):
    pixels = random_pixels(0)
    write_folder(tmp_path, pixels)
    folder = ImageNetData(str(tmp_path), workers=0, crop=SIDE).train_set
    n = len(folder)
    images = torch.stack([torch.from_numpy(pixels(i)).permute(2, 0, 1) for i in range(n)])  # the same pixels
    recipes = MixRecipes(n)
    plans = condense_three_times(n)
    for stage, plan in enumerate(plans, start=1):
        condense.apply_mix(images, plan)
        recipes.add(stage, plan)
        mixed = MixedImageFolder(folder, recipes)
        assert all(torch.equal(mixed.image(i), images[i]) for i in range(n)), f"after condensation {stage}"
        assert recipes.most_decodes() <= 2**stage
    # The three condensations compound: a point mixed twice, a source mixed before it was mixed in.
    targets = [set(p.mix_targets.tolist()) for p in plans]
    sources = [set(p.mix_sources.tolist()) for p in plans]
    assert targets[0] & targets[1] or targets[1] & targets[2], "no point is mixed twice: pick another seed"
    assert (targets[0] & (sources[1] | sources[2])) or (targets[1] & sources[2]), "no mixed source: another seed"
    assert max(len(recipes.decodes(i)) for i in range(n)) >= 3
    # Any earlier state is one call away, and a point without a recipe is its file.
    assert torch.equal(recipes.image(int(plans[0].mix_targets[-1]), mixed.decode, stage=0),
                       torch.from_numpy(pixels(int(plans[0].mix_targets[-1]))).permute(2, 0, 1))  # fmt: skip

    # Through the loader, crop and flip included (one worker each: the crops depend on the worker count): the
    # batches of an ImageFolder holding the in-memory mixed images and those of the files with the recipes agree.
    write_folder(tmp_path / "mixed", lambda i: images[i].permute(1, 2, 0).numpy())
    by_files = ImageNetData(str(tmp_path), workers=1, crop=SIDE)
    in_memory = ImageNetData(str(tmp_path / "mixed"), workers=1, crop=SIDE)
    a = list(by_files.train_batches(None, 8, seed=1, epoch=2, images=recipes))
    b = list(in_memory.train_batches(None, 8, seed=1, epoch=2))
    assert all(torch.equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)) and len(a) == len(b) == 4
    with pytest.raises(NotImplementedError, match="MixRecipes"):
        next(by_files.train_batches(None, 8, seed=1, epoch=2, images=images))


def test_a_source_of_another_size_is_resized_to_its_target():
    small, large = torch.randint(0, 256, (3, 6, 8), dtype=torch.uint8), torch.randint(0, 256, (3, 9, 5)).byte()
    assert fit(small, (6, 8)) is small  # equal sizes: untouched
    plan = condense.SummaryPlan(*(torch.tensor(v) for v in ([0], [1], [0], [1], [0.8])))
    recipes = MixRecipes(2)
    recipes.add(1, plan)
    out = recipes.image(0, [small, large].__getitem__)
    expected = torch.nn.functional.interpolate(large[None].float(), (6, 8), mode="bilinear", antialias=True)
    expected = expected[0].round().clamp(0, 255).byte()
    assert out.shape == small.shape
    assert torch.equal(out, condense.mix_pixels(small, expected, torch.tensor(0.8)))
    assert torch.equal(recipes.image(1, [small, large].__getitem__), large)


def test_recipes_survive_a_checkpoint_round_trip():
    n = 30
    recipes = MixRecipes(n)
    for stage, plan in enumerate(condense_three_times(n), start=1):
        recipes.add(stage, plan)
    back = MixRecipes(n)
    back.load_state_dict(load_tensors(tensor_bytes(recipes.state_dict())))  # weights_only, as the store reads
    files = [torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
             for i in range(n)]  # fmt: skip
    assert len(back) == len(recipes) == 18 and back.last_stage == 3
    assert all(torch.equal(back.image(i, files.__getitem__), recipes.image(i, files.__getitem__)) for i in range(n))
    for i in range(n):  # each file a sample needs is decoded once, and decodes() names them beforehand
        calls = []
        recipes.image(i, lambda j, calls=calls: (calls.append(j), files[j])[1])
        assert sorted(calls) == recipes.decodes(i) and len(set(calls)) == len(calls)
    with pytest.raises(CheckpointError, match="31"):
        MixRecipes(31).load_state_dict(recipes.state_dict())
    with pytest.raises(CheckpointError, match="ratio"):
        back.load_state_dict({**recipes.state_dict(), "ratio": recipes.ratio.double()})
    with pytest.raises(ValueError, match="after"):
        back.add(2, condense_three_times(n)[0])


@pytest.fixture
def small_imagenet(tmp_path):
    """The generated ImageFolder as the registry's ``imagenet``, read in the test process at 16x16."""
    root = tmp_path / "data"
    write_folder(root / "imagenet", random_pixels(1, size=lambda i: (12 + i % 3, 14 + i % 4)))  # sizes differ
    spec = dataclasses.replace(data.spec("imagenet"), image_size=SIDE, num_train=30, num_test=6,
                               load=lambda root, device: ImageNetData(root, device, workers=0, crop=SIDE))  # fmt: skip
    # One thread, as test_store's in-process runs: two threads of tiny steps on two shared cores spin for nothing.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with data.DATASETS.override("imagenet", spec):
        yield str(root)
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:the teacher")  # one epoch on 30 points: a teacher near chance, as meant
def test_kcd_with_augmentation_trains_on_files_and_resumes(small_imagenet, tmp_path, monkeypatch):
    teacher = teacher_config("imagenet", "resnet8", epochs=1)
    cfg = distill_config("imagenet", "resnet8", teacher=teacher, epochs=4, method="kcd",
                         method_options={"stage_epochs": 1})  # fmt: skip
    clean_store = RunStore(tmp_path / "clean", data_root=small_imagenet)
    clean_store.ensure(teacher, progress=False)
    copy_run(clean_store, teacher, tmp_path / "killed")
    mixed_reads = []
    image = MixRecipes.image
    monkeypatch.setattr(MixRecipes, "image", lambda self, i, *a: (mixed_reads.append(i), image(self, i, *a))[1])
    clean = clean_store.ensure(cfg, progress=False)
    sizes = condense.keep_schedule("paper", 30, 4, 1, 0.7)
    mixed = [0] + [a - b for a, b in zip(sizes, sizes[1:])]  # m = |K0| at each condensation
    assert [s["mixed"] for s in clean["stages"]] == mixed
    assert all(1 <= s["most_decodes"] <= 2 ** (s["stage"] - 1) for s in clean["stages"][1:])
    assert mixed_reads, "no epoch trained on a mixed point"

    # Interrupted before its third epoch, then resumed: the record of the uninterrupted run.
    train_epoch = Trainer.train_epoch

    def interrupted(self):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(self)

    killed = RunStore(tmp_path / "killed", data_root=small_imagenet)
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            killed.ensure(cfg, progress=False)
    run = killed.path(cfg)
    last = sorted(run.glob("checkpoint-e*.pt"))[-1]
    state = torch.load(last, weights_only=True)
    assert len(state["method"]["mix_recipes"]["target"]) == sum(mixed[:3]) and state.get("images_file") is None
    assert not list(run.glob("images-*.pt")), "recipes live in the checkpoint, not as image snapshots"
    assert stable(killed.ensure(cfg, progress=False)) == stable(clean)

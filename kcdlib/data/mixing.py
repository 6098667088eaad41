"""KCD's knowledge augmentation on a knowledge set decoded from files (ImageNet): the mixes as recipes.

In memory (digits, CIFAR-100), VAKS rewrites the run's own uint8 copy of the training images at each condensation
(:func:`kcdlib.condense.apply_mix`). 1.28M ImageNet files have no such copy, so the condensation's summary is kept
instead as **mix recipes**, one per mixed point and condensation, and the loader replays them on each point after
decoding it and before the random-resized crop. Every recipe is one row

    (stage, target, source, ratio)          x(target) ← ratio · x(target) + (1 − ratio) · x(source)

made at the condensation after stage ``stage`` (1-based) and applied from stage ``stage + 1`` on. The recipes
compound across stages exactly as the in-memory path does: the pixels of point ``i`` after the condensation of
stage ``k`` are those of its last recipe with ``stage ≤ k``, made from the pixels of the target *and* of the
source after stage ``stage − 1``; a point without a recipe is its decoded file. So a mixed point is mixed again at
later stages, a source that was itself mixed earlier contributes its mixed state of that time, and every mix goes
through the same :func:`kcdlib.condense.mix_pixels` (float32, truncated to uint8 after each stage's mix).

**Geometry (our extension).** The released code only ever mixes CIFAR tensors of one size. ImageNet's files differ
in size, so a source is brought to its target's ``H×W`` before each mix (:func:`fit`): bilinear interpolation with
antialiasing (close to PIL's bilinear resize) on the uint8 pixels read as float32, both axes stretched independently
(the whole source contributes, as on CIFAR), then rounded half to even and clamped to uint8. A point keeps the size
of its own file; where the sizes are equal nothing is resized, so the two paths agree bit for bit.

**Cost.** A point's pixels need the decodes of every point its recipes reach: each recipe needs two earlier states,
so after ``K`` condensations a point needs at most ``2^K`` decodes (ImageNet's paper schedule: 5 condensations, at
most 32 files for one sample) and ``2^K − 1`` mixes. :meth:`MixRecipes.image` memoises decodes and mixes within one
sample, and :meth:`MixRecipes.most_decodes` gives a run's actual worst case (KCD records it at each condensation).
Most points have no recipe and cost one decode, as without augmentation.

The recipes are small (28 bytes a row; the paper schedule's five condensations of ImageNet make 310,410 rows,
8.7 MB), so they live in the method's checkpointed state, never as image snapshots.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..condense import SummaryPlan, mix_pixels
from ..errors import CheckpointError

__all__ = ["MixRecipes", "MixedImageFolder", "fit"]

Decode = Callable[[int], torch.Tensor]


def fit(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``image`` (uint8 ``(C, H, W)``, any device) at ``size = (H', W')``: the geometry rule for a source mixed into a
    target of another size. Unchanged (the same tensor) when the sizes are equal; otherwise bilinear with antialiasing
    in float32, each axis stretched on its own, rounded half to even and clamped to ``[0, 255]``.
    (On CUDA the interpolation may differ from the CPU's in the last bit of a few pixels before rounding.)"""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None].to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


class MixRecipes:
    """VAKS's mixes on a knowledge set of ``num_points`` points decoded from files, as rows
    ``(stage, target, source, ratio)`` in the order they were made (the module docstring has the rules).

    :meth:`add` appends one condensation's plan; :meth:`image` gives a point's training pixels after any stage from a
    ``decode(index) -> uint8 (C, H, W)`` that reads the point's file: the one call a loader needs, on any device.
    """

    def __init__(self, num_points: int):
        self.num_points = int(num_points)
        self.stage = torch.zeros(0, dtype=torch.int64)
        self.target = torch.zeros(0, dtype=torch.int64)
        self.source = torch.zeros(0, dtype=torch.int64)
        self.ratio = torch.zeros(0, dtype=torch.float32)
        self._index = None  # (targets sorted, their rows): built on the first lookup, dropped by add()

    def __len__(self) -> int:
        return int(self.target.numel())

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_index": None}  # rebuilt where it is used (each DataLoader worker)

    @property
    def last_stage(self) -> int:
        """The stage of the latest recipe (0 when there is none): :meth:`image` applies up to it by default."""
        return int(self.stage[-1]) if len(self) else 0

    def add(self, stage: int, plan: SummaryPlan) -> None:
        """Append the mixes of the condensation after stage ``stage`` (``plan.mix_targets``, ``mix_sources``,
        ``mix_ratios``): they apply from stage ``stage + 1`` on. Stages only grow."""
        stage = int(stage)
        if stage < 1 or stage <= self.last_stage:
            raise ValueError(f"mix recipes of stage {stage} come after those of stage {self.last_stage}")
        targets, sources = plan.mix_targets.cpu().to(torch.int64), plan.mix_sources.cpu().to(torch.int64)
        ratios = plan.mix_ratios.cpu().to(torch.float32)
        if not targets.numel() == sources.numel() == ratios.numel():
            raise ValueError(f"a mixing plan needs as many targets, sources and ratios, got {targets.numel()}, "
                             f"{sources.numel()} and {ratios.numel()}")  # fmt: skip
        if torch.unique(targets).numel() != targets.numel():
            raise ValueError("a mixing plan must not mix the same target twice")
        both = torch.cat([targets, sources])
        if both.numel() and (int(both.min()) < 0 or int(both.max()) >= self.num_points):
            raise ValueError(f"a mixing plan names points outside [0, {self.num_points})")
        self.stage = torch.cat([self.stage, torch.full_like(targets, stage)])
        self.target = torch.cat([self.target, targets])
        self.source = torch.cat([self.source, sources])
        self.ratio = torch.cat([self.ratio, ratios])
        self._index = None

    def _last_row(self, index: int, stage: int) -> int:
        """The row of point ``index``'s last recipe with ``stage ≤ stage``, or -1 (its decoded file)."""
        if self._index is None:
            # Sorted by target, then stage (a stable sort of rows already in stage order).
            order = np.argsort(self.target.numpy(), kind="stable")
            self._index = (self.target.numpy()[order], order, self.stage.numpy()[order])
        targets, rows, stages = self._index
        lo, hi = np.searchsorted(targets, index, "left"), np.searchsorted(targets, index, "right")
        k = lo + int(np.searchsorted(stages[lo:hi], stage, "right")) - 1
        return int(rows[k]) if k >= lo else -1

    def is_mixed(self, index: int, stage: int | None = None) -> bool:
        """Whether point ``index`` differs from its file after stage ``stage`` (default: the latest)."""
        return self._last_row(int(index), self.last_stage if stage is None else int(stage)) >= 0

    def image(self, index: int, decode: Decode, stage: int | None = None) -> torch.Tensor:
        """The training pixels of point ``index`` after the condensation of stage ``stage`` (default: all recipes),
        before any crop or flip: uint8 ``(C, H, W)`` of the point's own file size, on ``decode``'s device.

        ``decode(i)`` returns point ``i``'s decoded file as uint8 ``(C, H, W)`` (on the CPU in DataLoader workers,
        or on the GPU after a batched decode); it is called at most once per point, at most ``2^K`` times in all
        after ``K`` condensations (:meth:`decodes` names them beforehand). A point without a recipe is
        ``decode(index)`` itself. Sources are brought to the target's size by :func:`fit` and mixed by
        :func:`~kcdlib.condense.mix_pixels`.
        """
        decoded: dict[int, torch.Tensor] = {}
        made: dict[int, torch.Tensor] = {}

        def pixels(i: int, k: int) -> torch.Tensor:
            row = self._last_row(i, k)
            if row < 0:
                if i not in decoded:
                    decoded[i] = _checked(decode(i), i)
                return decoded[i]
            if row not in made:
                s = int(self.stage[row])
                own = pixels(i, s - 1)
                partner = fit(pixels(int(self.source[row]), s - 1), own.shape[-2:])
                made[row] = mix_pixels(own, partner, self.ratio[row])
            return made[row]

        return pixels(int(index), self.last_stage if stage is None else int(stage))

    def decodes(self, index: int, stage: int | None = None) -> list[int]:
        """The points whose files :meth:`image` decodes for point ``index`` (ascending): for a batched decoder."""
        found: set[int] = set()
        seen: set[int] = set()

        def walk(i: int, k: int) -> None:
            row = self._last_row(i, k)
            if row < 0:
                found.add(i)
            elif row not in seen:
                seen.add(row)
                s = int(self.stage[row])
                walk(i, s - 1)
                walk(int(self.source[row]), s - 1)

        walk(int(index), self.last_stage if stage is None else int(stage))
        return sorted(found)

    def most_decodes(self) -> int:
        """The most decodes one point's pixels need after all recipes, counted without memoisation (an upper bound
        on what :meth:`image` does): 1 without recipes, at most ``2^K`` after ``K`` condensations."""
        count = torch.ones(self.num_points, dtype=torch.int64)
        for s in torch.unique(self.stage).tolist():
            rows = self.stage == s
            t, src = self.target[rows], self.source[rows]
            count[t] = count[t] + count[src]  # right side read before the write: every pair sees stage s − 1
        return int(count.max())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"num_points": torch.tensor(self.num_points), "stage": self.stage.clone(), "target": self.target.clone(),
                "source": self.source.clone(), "ratio": self.ratio.clone()}  # fmt: skip

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"stage": torch.int64, "target": torch.int64, "source": torch.int64, "ratio": torch.float32}
        missing = sorted((set(expected) | {"num_points"}) - set(state))
        if missing:
            raise CheckpointError(f"the mix recipes in the checkpoint lack {', '.join(missing)}")
        if int(state["num_points"]) != self.num_points:
            raise CheckpointError(f"the mix recipes in the checkpoint are for {int(state['num_points'])} knowledge "
                                  f"points, this run has {self.num_points}")  # fmt: skip
        rows = state["target"].numel()
        for name, dtype in expected.items():
            if state[name].shape != (rows,) or state[name].dtype != dtype:
                raise CheckpointError(f"the mix recipes' {name} in the checkpoint has shape "
                                      f"{tuple(state[name].shape)} and dtype {state[name].dtype}, expected "
                                      f"({rows},) and {dtype}")  # fmt: skip
        for name in expected:
            setattr(self, name, state[name].cpu().clone())
        self._index = None


def _checked(image: torch.Tensor, index: int) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"decode({index}) must give uint8 (C, H, W) pixels, got {image.dtype} {tuple(image.shape)}")
    return image


class MixedImageFolder(torch.utils.data.Dataset):
    """An ImageFolder whose points carry KCD's mixes: a point with a recipe is decoded (with its sources), mixed by
    ``recipes`` and only then given to the folder's transform (the random-resized crop and flip); any other point is
    the folder's own item, unchanged. The label is the target's. Picklable, for DataLoader workers.

    ``recipes`` are read up to their latest stage when this wrapper is made: KCD adds recipes only between epochs.
    """

    def __init__(self, folder, recipes: MixRecipes):
        self.folder, self.recipes, self.stage = folder, recipes, recipes.last_stage

    def __len__(self) -> int:
        return len(self.folder)

    def decode(self, index: int) -> torch.Tensor:
        """Point ``index``'s file as the folder decodes it (PIL, RGB), as uint8 ``(3, H, W)``."""
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(self.folder.loader(self.folder.samples[index][0]))

    def image(self, index: int) -> torch.Tensor:
        """The point's training pixels before the crop and flip: uint8 ``(3, H, W)``."""
        return self.recipes.image(index, self.decode, self.stage)

    def __getitem__(self, index: int):
        if not self.recipes.is_mixed(index, self.stage):
            return self.folder[index]
        from torchvision.transforms.functional import to_pil_image

        # Back to a PIL image (lossless), so the transform is exactly the one unmixed points go through.
        x = to_pil_image(self.image(index))
        if self.folder.transform is not None:
            x = self.folder.transform(x)
        y = self.folder.targets[index]
        if self.folder.target_transform is not None:
            y = self.folder.target_transform(y)
        return x, y

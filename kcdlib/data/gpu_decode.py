"""ImageNet decoded on the training device (``decode="gpu"``): CPU threads only read each file's bytes; a batch of
JPEGs is decoded at once by nvjpeg (torchvision's batched ``decode_jpeg(list, device="cuda")``), and torchvision's
``RandomResizedCrop(224)``, the horizontal flip and the normalisation run on the device.

The crop follows torchvision's rule (area fraction in ``SCALE``, aspect ratio log-uniform in ``RATIO``, ``TRIES``
tries, then the central-crop fallback), but its random numbers come from the epoch's generator, drawn up front
for the whole epoch as ``DRAWS`` uniforms per position of the epoch's order (:func:`crop_draws`): an epoch is the
same on any device, after a resume, and however its positions are cut into batches or shared among processes.
The crop is resized to 224 x 224 by ``F.interpolate`` (bilinear, no antialiasing) and kept in float (not rounded
to uint8, as PIL's would be). The test split is torchvision's ``Resize(256)`` (antialiased bilinear, rounded to
uint8 as PIL's is) and ``CenterCrop(224)``.

These are not PIL's pixels (nvjpeg's IDCT is not libjpeg's, a tensor resize is not PIL's), so the decode path is a
run option (:class:`kcdlib.identity.RunConfig`), not a speed setting. On a CPU device the same code runs with
torchvision's libjpeg-turbo decoder: that is how it is tested without a GPU.

Files nvjpeg cannot take (not JPEG, CMYK, or refused when decoded) are decoded on the CPU in RGB and moved to the
device; each epoch that had any says how many in a warning. Greyscale JPEGs are decoded to RGB by nvjpeg.

Knowledge augmentation on file-decoded data applies its mix recipes as the ``post_decode`` step of
:meth:`DeviceDecoder.train_batches` (:meth:`kcdlib.data.mixing.MixRecipes.image`): per sample, on the decoded uint8
``(3, H, W)`` image, before the crop.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

SIZE = 224  # the training crop's side
TEST_RESIZE = 256  # the test split's shorter side before its central 224 x 224
SCALE = (0.08, 1.0)  # RandomResizedCrop: the crop's share of the image's area
RATIO = (3 / 4, 4 / 3)  # ... and its aspect ratio (width / height), drawn log-uniformly
TRIES = 10  # ... draws before the central-crop fallback
# Uniforms per position of an epoch: (area, log-ratio) per try, the accepted crop's row and column, the flip.
DRAWS = 2 * TRIES + 3

# PostDecode(point, decode) -> uint8 (3, H, W): the image training point ``point`` shows in this epoch, given
# ``decode(j)``, point j's decoded image (on the device). The identity is ``decode(point)``.
PostDecode = Callable[[int, Callable[[int], torch.Tensor]], torch.Tensor]


def crop_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """The epoch's random numbers for ``n`` positions of its order: ``(n, DRAWS)`` uniforms in [0, 1)."""
    return torch.rand(n, DRAWS, generator=generator)


def resized_crop_params(heights: torch.Tensor, widths: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch, from ``draws`` (see :func:`crop_draws`).

    Try ``t`` takes the area ``H·W·(s0 + u·(s1 - s0))`` and the ratio ``exp(log r0 + u'·(log r1 - log r0))``,
    rounds ``w = sqrt(area·ratio)`` and ``h = sqrt(area / ratio)`` to whole pixels, and is accepted if the crop
    fits; the first accepted try is placed at row ``floor(u_i·(H - h + 1))`` and column ``floor(u_j·(W - w + 1))``
    (a uniform integer, as torch.randint draws). Without one, the central crop of the largest box of a ratio in
    ``RATIO``. Returns int64 ``(B, 4)``: top, left, height, width.
    """
    h_img = heights.to(torch.float64).view(-1, 1)
    w_img = widths.to(torch.float64).view(-1, 1)
    u = draws.to(torch.float64)
    area = h_img * w_img * (SCALE[0] + u[:, 0 : 2 * TRIES : 2] * (SCALE[1] - SCALE[0]))
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + u[:, 1 : 2 * TRIES : 2] * (hi - lo))
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    found = fits.any(dim=1)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    h_img, w_img = h_img.squeeze(1), w_img.squeeze(1)
    top = torch.floor(u[:, 2 * TRIES] * (h_img - h + 1)).clamp(max=h_img - h)
    left = torch.floor(u[:, 2 * TRIES + 1] * (w_img - w + 1)).clamp(max=w_img - w)
    # The fallback: the whole image cut to the nearest ratio inside RATIO, centred.
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > RATIO[1], torch.round(h_img * RATIO[1]), w_img)
    fh = torch.where(in_ratio < RATIO[0], torch.round(w_img / RATIO[0]), h_img)
    ftop, fleft = torch.div(h_img - fh, 2, rounding_mode="floor"), torch.div(w_img - fw, 2, rounding_mode="floor")
    out = torch.stack(
        [torch.where(found, top, ftop), torch.where(found, left, fleft), torch.where(found, h, fh),
         torch.where(found, w, fw)], dim=1,
    )  # fmt: skip
    return out.to(torch.int64)


def flips(draws: torch.Tensor) -> torch.Tensor:
    """RandomHorizontalFlip's coin for each position: bool ``(B,)``."""
    return draws[:, DRAWS - 1] < 0.5


def test_size(height: int, width: int) -> tuple[int, int]:
    """torchvision's ``Resize(256)``: the shorter side to 256, the longer one scaled and truncated."""
    if width <= height:
        return int(TEST_RESIZE * height / width), TEST_RESIZE
    return TEST_RESIZE, int(TEST_RESIZE * width / height)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor (``readinto`` releases the GIL: threads read files in parallel)."""
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(buf)
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


def jpeg_components(data: torch.Tensor) -> int:
    """The number of colour components in a JPEG's frame header (1 grey, 3 YCbCr, 4 CMYK/YCCK); 0 when ``data``
    is not a JPEG (or its header cannot be read)."""
    b = data[: min(int(data.numel()), 1 << 16)].numpy().tobytes()
    if b[:3] != b"\xff\xd8\xff":
        return 0
    pos = 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            return 0
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(b[pos + 2 : pos + 4], "big")
        # SOF0..SOF15 but DHT (C4), JPG (C8), DAC (CC): the frame header; its 10th byte is the component count.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return b[pos + 9] if pos + 9 < len(b) else 0
        if marker == 0xDA:  # start of scan before any frame header
            return 0
        pos += 2 + length
    return 0


@contextlib.contextmanager
def _quiet_decoders():
    # torchvision 0.29 deprecates its decoders (for TorchCodec) with a warning per call; 0.26 has none.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities", category=DeprecationWarning)
        yield


class CpuDecodeWarning(UserWarning):
    """Some images could not be decoded by nvjpeg and were decoded on the CPU (correct, but slower)."""


class DeviceDecoder:
    """Batches of ImageNet ``samples`` (ImageFolder's ``(path, label)`` list) decoded and augmented on ``device``.

    ``threads`` read the files; the next batch's files are read while the current one is decoded. On CUDA the
    JPEGs are decoded by nvjpeg; elsewhere by torchvision's CPU decoder (the same pixels libjpeg-turbo gives).
    """

    def __init__(
        self,
        device: str | torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        threads: int = 8,
    ):
        self.device = torch.device(device)
        self.threads = max(1, threads)
        self.cpu_decoded = 0  # images nvjpeg could not take, since the last warning
        self.nvjpeg = self.device.type == "cuda"  # the batched decode (with its fallbacks); else decode_image
        self._mean = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor([255.0 * s for s in std], device=self.device).view(1, 3, 1, 1)

    # -- decoding --------------------------------------------------------------------------------------------
    def decode(self, blobs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoded files -> uint8 ``(3, H, W)`` RGB images on the device."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(blobs)
        with _quiet_decoders():
            if self.nvjpeg:
                # CMYK/YCCK (4 components) and non-JPEG files go to the CPU decoder: nvjpeg's RGB output is for
                # 1- and 3-component JPEGs.
                take = [k for k, b in enumerate(blobs) if jpeg_components(b) in (1, 3)]
                if take:
                    try:
                        decoded = decode_jpeg([blobs[k] for k in take], mode=ImageReadMode.RGB, device=self.device)
                    except RuntimeError:  # the batch fails as a whole: find the files nvjpeg refuses one by one
                        decoded = [self._nvjpeg_one(blobs[k]) for k in take]
                    for k, image in zip(take, decoded):
                        out[k] = image
                self.cpu_decoded += sum(image is None for image in out)
            for k, image in enumerate(out):
                if image is None:
                    out[k] = decode_image(blobs[k], mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
        return out

    def _nvjpeg_one(self, blob: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _post(self, points: list[int], images: list[torch.Tensor], samples, post_decode) -> list[torch.Tensor]:
        """The per-sample step between decoding and cropping (knowledge augmentation's mix recipes)."""
        if post_decode is None:
            return images
        here = {p: k for k, p in enumerate(points)}

        def decode(j: int) -> torch.Tensor:
            return images[here[j]] if j in here else self.decode([read_bytes(samples[j][0])])[0]

        return [post_decode(p, decode) for p in points]

    # -- augmentation ----------------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """0..255 float ``(B, 3, H, W)`` -> standardised with the dataset's mean and std."""
        return (x - self._mean) / self._std

    def train_batch(self, images: list[torch.Tensor], draws: torch.Tensor) -> torch.Tensor:
        """Random-resized crop (224, bilinear, no antialiasing), flip and normalisation: float32 ``(B, 3, 224,
        224)``. ``draws`` are the batch's rows of :func:`crop_draws`."""
        heights = torch.tensor([im.shape[-2] for im in images])
        widths = torch.tensor([im.shape[-1] for im in images])
        boxes = resized_crop_params(heights, widths, draws).tolist()
        crops = [
            F.interpolate(im[None, :, t : t + h, l : l + w].float(), size=(SIZE, SIZE), mode="bilinear",
                          align_corners=False, antialias=False)
            for im, (t, l, h, w) in zip(images, boxes)
        ]  # fmt: skip
        x = torch.cat(crops)
        flip = flips(draws).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        return self.normalize(torch.where(flip, x.flip(3), x))

    def test_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``Resize(256)`` (antialiased bilinear, rounded to uint8 as PIL's), ``CenterCrop(224)``, normalised."""
        out = []
        for im in images:
            h, w = test_size(im.shape[-2], im.shape[-1])
            x = F.interpolate(im[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            top, left = int(round((h - SIZE) / 2.0)), int(round((w - SIZE) / 2.0))  # torchvision's CenterCrop
            out.append(x[:, :, top : top + SIZE, left : left + SIZE].round_().clamp_(0, 255))
        return self.normalize(torch.cat(out))

    # -- batches ---------------------------------------------------------------------------------------------
    def _read_ahead(self, samples, order: list[int], batch_size: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """``(start, bytes of order[start : start + batch_size])``, the next batch read while this one is used."""
        starts = range(0, len(order), batch_size)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="kcd-read") as pool:

            def submit(start):
                return [pool.submit(read_bytes, samples[i][0]) for i in order[start : start + batch_size]]

            pending = submit(0) if starts else []
            for k, start in enumerate(starts):
                current = pending
                if k + 1 < len(starts):
                    pending = submit(starts[k + 1])
                yield start, [f.result() for f in current]

    def train_batches(
        self,
        samples,
        labels: torch.Tensor,
        order: torch.Tensor,
        draws: torch.Tensor,
        batch_size: int,
        post_decode: PostDecode | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(images, labels, point_indices)`` over the points ``order`` (an epoch's order), position ``p``
        augmented with ``draws[p]``; ``post_decode`` (None: the identity) is where per-point mix recipes apply, see
        :data:`PostDecode`."""
        points = order.tolist()
        self.cpu_decoded = 0
        for start, blobs in self._read_ahead(samples, points, batch_size):
            batch = points[start : start + batch_size]
            images = self._post(batch, self.decode(blobs), samples, post_decode)
            x = self.train_batch(images, draws[start : start + len(batch)])
            idx = order[start : start + len(batch)]
            yield x, labels[idx].to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
        self._warn_cpu_decoded(len(points))

    def test_batches(self, samples, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.cpu_decoded = 0
        for start, blobs in self._read_ahead(samples, list(range(len(samples))), batch_size):
            labels = torch.tensor([label for _, label in samples[start : start + batch_size]])
            yield self.test_batch(self.decode(blobs)), labels.to(self.device, non_blocking=True)
        self._warn_cpu_decoded(len(samples))

    def _warn_cpu_decoded(self, total: int) -> None:
        if self.cpu_decoded:
            warnings.warn(
                f"{self.cpu_decoded} of {total} images were decoded on the CPU: nvjpeg does not take them (not "
                "JPEG, CMYK, or refused)", CpuDecodeWarning, stacklevel=3,
            )  # fmt: skip
            self.cpu_decoded = 0

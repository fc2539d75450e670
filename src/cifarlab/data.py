"""Datasets held as uint8 tensors on the training device, and batched on-device augmentation.

Every dataset (CIFAR-10/100, synthetic, an image folder) is loaded once into a ``(N, 3, H, W)`` uint8
tensor. Batches are gathered from it on the device; random crop, flip and normalisation run on the whole
batch at once. No per-sample PIL work, no worker processes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from cifarlab import datacache


class DataError(RuntimeError):
    """A dataset could not be found, downloaded or read; the message says what to do."""


# name → (archive, url, md5, extracted folder, train files, test file, label key, classes)
CIFAR = {
    "cifar10": dict(
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": dict(
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
        num_classes=100,
    ),
}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar(root: Path, name: str, download: bool = True, verify_checksum: bool = True) -> Path:
    """Make sure ``root/<folder>`` holds the extracted CIFAR python batches; return that folder.

    A file lock makes parallel trials wait for one download instead of racing each other.
    """
    root = Path(root)
    folder = root / CIFAR[name]["folder"]
    if not _missing_batches(folder, name):
        return folder  # extracted already: no lock needed, and the folder may be read-only (a shared copy)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f".{name}.lock"))
        lock.acquire()
    except OSError as err:
        raise DataError(
            f"data.data_dir={str(root)!r} is not allowed: cannot create {err.filename or root} or write there "
            f"({err.strerror or err}); allowed: a folder this user can write to"
        ) from None
    try:
        return _fetch_cifar(root, name, download, verify_checksum)
    finally:
        lock.release()


def _missing_batches(folder: Path, name: str) -> list[str]:
    """The python batch files of CIFAR ``name`` that ``folder`` lacks."""
    spec = CIFAR[name]
    return [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]


def _fetch_cifar(root: Path, name: str, download: bool, verify_checksum: bool) -> Path:
    """download_cifar's work, under its lock."""
    spec = CIFAR[name]
    folder = root / spec["folder"]
    if not _missing_batches(folder, name):  # another process extracted them while this one waited
        return folder
    archive = root / spec["archive"]
    if not archive.is_file():
        if not download:
            raise DataError(
                f"data={name}: {archive} not found and data.download=false; put {spec['archive']} "
                f"({spec['url']}) there by hand, or use data=synthetic"
            )
        from torchvision.datasets.utils import download_url

        try:
            download_url(spec["url"], str(root), spec["archive"], md5=None)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            archive.unlink(missing_ok=True)
            raise DataError(
                f"data={name}: could not download {spec['url']} ({type(err).__name__}: {err}); "
                f"put {spec['archive']} into {root}/ by hand, or use data=synthetic"
            ) from None
    if verify_checksum and (got := _md5(archive)) != spec["md5"]:
        raise DataError(
            f"data={name}: {archive} is corrupt or incomplete (md5 {got}, expected {spec['md5']}); "
            "delete it and run again, or put a good copy there by hand"
        )
    # Extract into a private folder, then move each batch into place with one atomic rename: download_cifar's
    # lock-free check (every batch file present) must never see a batch that is still being written, and a
    # run killed half-way must leave no truncated batch behind. Leftovers of such killed runs go first.
    for stale in root.glob(f".extract-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".extract-{name}-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(
                f"data={name}: {archive} is corrupt or incomplete ({err}); delete it and run again"
            ) from None
        missing = _missing_batches(staging / spec["folder"], name)
        if missing:
            raise DataError(f"data={name}: {archive} does not contain {folder.name}/{missing[0]}; delete it")
        folder.mkdir(exist_ok=True)
        for extracted in sorted((staging / spec["folder"]).iterdir()):
            os.replace(extracted, folder / extracted.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_batches(folder: Path, files: list[str], label_key: str, num_classes: int):
    """Unpickle CIFAR python batches into uint8 (N, 3, 32, 32) images and int64 labels (numpy arrays)."""
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8)
            target = np.asarray(batch[label_key], dtype=np.int64)
        except Exception as err:  # noqa: BLE001 - any unreadable batch gets the same advice
            raise DataError(
                f"{path} is corrupt ({type(err).__name__}: {err}); delete {folder} and run again"
            ) from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(target) != len(data):
            raise DataError(
                f"{path} is corrupt (data shape {data.shape}, {len(target)} labels); delete {folder}"
            )
        if len(target) and (target.min() < 0 or target.max() >= num_classes):
            raise DataError(f"{path} is corrupt (labels outside 0..{num_classes - 1}); delete {folder}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(target)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(
    root: Path,
    name: str,
    download: bool = True,
    verify_checksum: bool = True,
    cache_dir: Path | None = None,
):
    """Return ``(train_x, train_y, test_x, test_y)``: uint8 (N, 3, 32, 32) images and int64 labels.

    The python batches are read directly rather than through ``torchvision.datasets.CIFAR10``: that class
    builds a per-sample PIL dataset (the slow path this project avoids) and checks every batch against the
    official md5s, which would also reject the small archives the tests write in the same format. With a
    ``cache_dir`` the decoded arrays are memory-mapped from there after the first load (see datacache).
    """
    spec = CIFAR[name]
    folder = download_cifar(root, name, download, verify_checksum)
    files = spec["train"] + spec["test"]

    def decode():
        train_x, train_y = _read_batches(folder, spec["train"], spec["label_key"], spec["num_classes"])
        test_x, test_y = _read_batches(folder, spec["test"], spec["label_key"], spec["num_classes"])
        return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y), {}

    source = datacache.Source(name, folder, [str(folder / f) for f in files])
    arrays, _ = datacache.load_or_build(cache_dir, source, decode)
    return tuple(torch.from_numpy(arrays[k]) for k in ("train_x", "train_y", "test_x", "test_y"))


def make_synthetic(num_images: int, num_classes: int = 10, seed: int = 0, image_size: int = 32):
    """A deterministic CIFAR-shaped dataset: uint8 images (N, 3, H, W) and int64 labels (N,).

    Each class has a smooth random colour template; an image is its template, randomly shifted by up to
    four pixels, with random contrast and strong pixel noise. A working CNN learns it far above chance
    within an epoch or two; a broken one (e.g. no gradient flow) stays near 1/num_classes.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(
        coarse, size=(image_size + 8, image_size + 8), mode="bicubic", align_corners=False
    )
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    shifts = torch.randint(0, 81, (num_images,), generator=g)  # one of the 9x9 shifts of up to 4 pixels
    # Every class template at every shift, (classes * 81, 3, H, W); each image then is one row of it.
    bank = torch.stack(
        [templates[:, :, dy : dy + image_size, dx : dx + image_size] for dy in range(9) for dx in range(9)],
        dim=1,
    ).reshape(num_classes * 81, 3, image_size, image_size)
    rows = labels * 81 + shifts  # image i is bank[rows[i]]
    contrast = 0.5 + torch.rand(num_images, 1, 1, 1, generator=g)  # signal 0.3 vs noise 0.5: hard enough that
    # settings matter (≈70% after 60 Adam steps, ≈97% after 200; a sigmoid net with default init stays ≈10%)
    noise = torch.randn(num_images, 3, image_size, image_size, generator=g).mul_(0.5)
    gain = 0.3 * contrast
    # images = 0.5 + 0.3·contrast·(crop - 0.5) + noise, rounded to uint8: the same operations in the same
    # order (so the same bytes) as on whole tensors, but in place, chunk by chunk: no full-size temporaries
    # to allocate and fault in (12,000 images in ~0.5 s instead of ~1 s on 2 cores, at every start-up).
    images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, num_images, 4096):
        end = min(start + 4096, num_images)
        chunk = bank.index_select(0, rows[start:end]).sub_(0.5).mul_(gain[start:end]).add_(0.5)
        images[start:end] = chunk.add_(noise[start:end]).clamp_(0, 1).mul_(255).round_()
    return images, labels


def load_imagefolder(
    root: Path, image_size: int = 32, cache_dir: Path | None = None, classes: list[str] | None = None
):
    """Decode a folder of class sub-folders into uint8 (N, 3, S, S) images; return images, labels, classes.

    Files, classes and labels are listed by torchvision's own ``ImageFolder`` functions (sorted class
    folders, sorted files), each image is decoded once, on every core (``datacache.decode_images``), and
    with a ``cache_dir`` the result is memory-mapped from there after the first load. ``classes`` (the
    test folder's case): label by these names, the training folder's; a folder may lack some of them.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a folder; expected <root>/<class>/<image> files")
    settings: dict = {"image_size": image_size}
    try:
        found, class_to_idx = find_classes(str(root))
        if classes is not None:  # the labels are the training folder's: the same name, the same number
            if extra := [c for c in found if c not in classes]:
                shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
                raise DataError(
                    f"{root / extra[0]}: class folder {extra[0]!r} is not allowed in the test folder; allowed: "
                    f"the {len(classes)} class folders of data.root ({shown})"
                )
            class_to_idx, settings["classes"] = {c: i for i, c in enumerate(classes)}, list(classes)
        samples = make_dataset(
            str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=classes is not None
        )
        if not samples:
            raise FileNotFoundError(
                f"Found no image files; supported extensions: {', '.join(IMG_EXTENSIONS)}"
            )
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"data.root={str(root)!r}: {err}") from None
    paths = [path for path, _ in samples]

    def decode():
        images = datacache.decode_images(paths, image_size)
        labels = np.array([label for _, label in samples], dtype=np.int64)
        return {"images": images, "labels": labels}, {"classes": found}

    source = datacache.Source("imagefolder", root, paths, settings)
    try:
        arrays, _ = datacache.load_or_build(cache_dir, source, decode)
    except datacache.UndecodableImage as err:  # from decoding, or from a file that cannot even be stat'ed
        raise DataError(f"data.root={str(root)!r}: {err}; remove or replace that file") from None
    return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), classes or found


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units.

    From each channel's histogram of the 256 pixel values (one ``bincount``, then float64 sums over 256
    levels): exact, and ~8x faster than summing the pixels as floats (0.1 s instead of 0.9 s for CIFAR-10's
    45,000 training images, every start-up).
    """
    n = images.shape[0] * images.shape[2] * images.shape[3]
    levels = torch.arange(256, dtype=torch.float64, device=images.device) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        m = (counts * levels).sum() / n
        var = (counts * (levels - m) ** 2).sum() / n
        mean.append(float(m))
        std.append(float(var.clamp_min(1e-12).sqrt()))
    return mean, std


def crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip, per image.

    Draws each image's shift (dy, dx in 0..2·pad) and flip from ``generator``, then :func:`crop_flip_at`.
    """
    b, k = images.shape[0], 2 * pad + 1
    dy = torch.randint(0, k, (b,), device=images.device, generator=generator)
    dx = torch.randint(0, k, (b,), device=images.device, generator=generator)
    flip = torch.randint(0, 2, (b,), device=images.device, generator=generator)
    return crop_flip_at(images, dy, dx, flip, pad)


def crop_flip_at(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Crop each image at shift (dy, dx) of its ``pad``-padded self, flipped where ``flip`` is 1, in one gather.

    (B, C, H, W) uint8 and (B,) int64 draws → (B, C, H, W) uint8, in the memory layout of the input. One
    ``gather`` over the padded batch reads every output pixel from its source pixel (a flip reads the row
    backwards). On a CPU this is ~4x faster than advanced indexing with per-image row/column index tensors;
    on a GPU it is a handful of kernels with no host synchronisation (so it can be captured in a CUDA graph).
    """
    b, c, h, w = images.shape
    device = images.device
    hp, wp = h + 2 * pad, w + 2 * pad
    dy, dx, flip = dy.view(b, 1, 1), dx.view(b, 1, 1), flip.view(b, 1, 1).bool()
    cols = torch.arange(w, device=device).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols)  # flipping = reading the row backwards
    rows = torch.arange(h, device=device).view(1, h, 1)
    source = (dy + rows) * wp + dx + cols  # (B, H, W): flat index of each output pixel in its padded image
    padded = F.pad(images, (pad, pad, pad, pad))
    if c > 1 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        flat = padded.permute(0, 2, 3, 1).reshape(b, hp * wp * c)  # NHWC: channels innermost
        index = (source.view(b, h * w, 1) * c + torch.arange(c, device=device)).view(b, h * w * c)
        return flat.gather(1, index).view(b, h, w, c).permute(0, 3, 1, 2)
    flat = padded.reshape(b, c, hp * wp)
    return flat.gather(2, source.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


class DeviceBatches:
    """An iterable of ``(images, labels)`` batches gathered from uint8 tensors that live on one device.

    Each pass draws a fresh permutation seeded by ``seed`` and the epoch (so a resumed run sees the same
    order), and, with ``augment``, every image's crop shift and flip from the same generator; under DDP each
    rank takes its own equal-sized shard. An epoch is first a *plan*, a ``(4, N)`` int64 tensor whose columns
    are (image row, dy, dx, flip), and a batch is :meth:`gather` of ``B`` columns of it: the captured training
    step (:mod:`cifarlab.step`) receives the plan columns and gathers the batch inside its CUDA graph.
    ``max_batches`` cuts every epoch after that many batches (``trainer.limit_train_batches``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: list[float],
        std: list[float],
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
        max_batches: int | None = None,
        pad: int = 4,
        even_shards: bool = True,
    ) -> None:
        self.images, self.labels = images, labels
        # Under DDP: every rank the same number of images (training: each step all-reduces gradients, so every
        # rank must take as many steps; up to world_size - 1 images are left out per epoch), or every image on
        # some rank (evaluation: nothing is synchronised per batch; the sums are added over ranks at the end).
        self.even_shards = even_shards
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.channels_last, self.max_batches, self.pad = channels_last, max_batches, pad
        device = images.device
        # x_float = (x_uint8 / 255 - mean) / std  ==  x_uint8 * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std_t).view(1, -1, 1, 1)

    def _per_rank(self) -> int:
        n = len(self.labels)
        if self.world_size <= 1:
            return n
        return n // self.world_size if self.even_shards else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._per_rank()
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def plan(self) -> torch.Tensor:
        """This epoch's (4, N) int64 plan on the device: image rows in order, then dy, dx, flip per image."""
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + self.epoch())
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, device=device, generator=generator)
        else:
            order = torch.arange(n, device=device)
        if self.world_size > 1:
            order = order[self.rank :: self.world_size][: self._per_rank()]
        plan = torch.zeros(4, len(order), dtype=torch.int64, device=device)
        plan[0] = order
        if self.augment:  # all of the epoch's draws at once: 3 kernels per epoch instead of 3 per batch
            k = 2 * self.pad + 1
            for row, high in ((1, k), (2, k), (3, 2)):
                plan[row] = torch.randint(0, high, (len(order),), device=device, generator=generator)
        return plan

    def batch_plans(self) -> Iterator[torch.Tensor]:
        """The epoch's batches as (4, B) views of :meth:`plan`."""
        plan = self.plan()
        for i in range(len(self)):
            yield plan[:, i * self.batch_size : (i + 1) * self.batch_size]

    def gather(self, plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(4, B) plan → (B, 3, H, W) float images, augmented and normalised, and (B,) int64 labels."""
        idx = plan[0]
        # index_select on the NCHW uint8 store: plain row copies (advanced indexing x[idx] is ~8x slower
        # on a CPU). Crop/flip then run on uint8, so the float work below touches each pixel once.
        x = self.images.index_select(0, idx)
        if self.augment:
            x = crop_flip_at(x, plan[1], plan[2], plan[3], self.pad)
        # (x/255 - mean)/std as one multiply-add, in NCHW where the per-channel constants broadcast over
        # contiguous rows (in NHWC the inner dimension would be the 3 channels: ~2x slower on a CPU) ...
        x = x.float().mul_(self.scale).add_(self.shift)
        if self.channels_last:  # ... then one copy into the layout the channels_last model wants
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels.index_select(0, idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for plan in self.batch_plans():
            yield self.gather(plan)

    def chunks(self, steps: int) -> Chunks:
        """The same epoch as chunks of ``steps`` consecutive batches (one Lightning step each)."""
        return Chunks(self, steps)


class Chunk:
    """``len(plans)`` consecutive training batches, as (4, B) plans that ``source.gather`` turns into pixels.

    What one Lightning ``training_step`` receives when the module runs several optimizer steps per call
    (:class:`cifarlab.module.CifarModule`). A plain object, so Lightning passes it through untouched.
    """

    __slots__ = ("source", "plans")

    def __init__(self, source: DeviceBatches, plans: list[torch.Tensor]) -> None:
        self.source, self.plans = source, plans

    def __len__(self) -> int:
        return len(self.plans)

    @property
    def images(self) -> int:
        return sum(p.shape[1] for p in self.plans)


class Chunks:
    """An epoch of :class:`DeviceBatches` in chunks of ``steps`` batches (the last chunk may be shorter)."""

    def __init__(self, batches: DeviceBatches, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps per chunk must be >= 1, got {steps}")
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return -(-len(self.batches) // self.steps)

    def __iter__(self) -> Iterator[Chunk]:
        plans = list(self.batches.batch_plans())
        for i in range(0, len(plans), self.steps):
            yield Chunk(self.batches, plans[i : i + self.steps])


class CifarDataModule(L.LightningDataModule):
    """CIFAR-10/100, synthetic or image-folder data, split into train/val/test and served from the device."""

    def __init__(
        self,
        name: str = "cifar10",
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        augment: bool = True,
        normalize: bool = True,
        download: bool = True,
        verify_checksum: bool = True,
        num_classes: int | None = None,
        train_size: int = 20000,
        test_size: int = 5000,
        root: str | None = None,
        image_size: int = 32,
        split_seed: int = 0,
        seed: int = 0,
        channels_last: bool = True,
        cache_dir: str | Path | None = None,
        limit_train_batches: int | float | None = None,
    ) -> None:
        super().__init__()
        self.name, self.data_dir, self.root = name, Path(data_dir), root
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None  # None: decode every time
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.augment, self.normalize = val_size, augment, normalize
        self.download, self.verify_checksum = download, verify_checksum
        self.train_size, self.test_size, self.image_size = train_size, test_size, image_size
        self.split_seed, self.seed, self.channels_last = split_seed, seed, channels_last
        # Training batches per epoch: a count, a fraction, or None for all. Applied here rather than by
        # Lightning, which would count chunks of several batches (see train_dataloader).
        self.limit_train_batches = limit_train_batches
        from cifarlab.config import ConfigError, check_cifar_image_size

        if name in CIFAR:
            self.num_classes = CIFAR[name]["num_classes"]
            check_cifar_image_size(name, image_size)
        elif name == "imagefolder":
            classes = (
                [p for p in Path(root or ".").iterdir() if p.is_dir()] if root and Path(root).is_dir() else []
            )
            if num_classes is not None and num_classes < len(classes):  # labels past the model's outputs
                raise ConfigError(
                    f"data.num_classes={num_classes!r} is not allowed; allowed: null or >= {len(classes)} "
                    f"(the class folders of data.root={root!r})"
                )
            self.num_classes = num_classes or len(classes)
        else:
            self.num_classes = num_classes or 10
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean: list[float] = [0.0, 0.0, 0.0]
        self.std: list[float] = [1.0, 1.0, 1.0]
        self._prepared: tuple | None = None  # what prepare_data loaded, kept for setup in the same process

    def prepare_data(self) -> None:
        """Download CIFAR if it is missing and fill the decoded-data cache (Lightning calls this once per
        machine before any process loads, and again before testing; ``datacache.warm_cache`` calls it
        before a sweep)."""
        if self.name in CIFAR:
            download_cifar(self.data_dir, self.name, self.download, self.verify_checksum)
        if self.cache_dir is not None and self.name != "synthetic" and not self.splits and not self._prepared:
            self._prepared = self._read()

    def _load(self):
        if self._prepared is not None:  # read by prepare_data a moment ago: not again
            loaded, self._prepared = self._prepared, None
            return loaded
        return self._read()

    def _image_folders(self) -> list[Path]:
        """data.root, and its sibling test/ folder when there is one (the test split)."""
        test_dir = Path(self.root).parent / "test"
        own = test_dir.is_dir() and test_dir.resolve() != Path(self.root).resolve()  # root=.../test: none
        return [Path(self.root)] + ([test_dir] if own else [])

    def _read(self):
        if self.name in CIFAR:
            return load_cifar(self.data_dir, self.name, self.download, self.verify_checksum, self.cache_dir)
        if self.name == "synthetic":
            x, y = make_synthetic(
                self.train_size + self.test_size, self.num_classes, seed=1234, image_size=self.image_size
            )
            n = self.train_size
            return x[:n], y[:n], x[n:], y[n:]
        if self.name == "imagefolder":
            folders = self._image_folders()
            x, y, classes = load_imagefolder(folders[0], self.image_size, self.cache_dir)
            if len(folders) > 1:
                tx, ty, _ = load_imagefolder(folders[1], self.image_size, self.cache_dir, classes)
                return x, y, tx, ty
            n_test = min(self.test_size, len(y) // 5)
            if n_test < 1:  # an empty test split: testing would silently report nothing
                raise DataError(
                    f"data.root={self.root!r} has {len(y)} images, too few to hold out a test split (at most "
                    "a fifth of them); add images, or a sibling test/ folder with the same classes"
                )
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed + 1))
            return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]
        raise DataError(f"data.name={self.name!r} is not one of cifar10, cifar100, synthetic, imagefolder")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_x, train_y, test_x, test_y = self._load()
        if not 1 <= self.val_size < len(train_y):
            raise DataError(
                f"data.val_size={self.val_size} is out of range; allowed: 1 <= val_size < {len(train_y)}"
            )
        # A fixed split (split_seed, not the run's seed) so every trial of a sweep validates on the same images.
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        self.splits = {
            "train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
        }
        if self.normalize:
            self.mean, self.std = channel_stats(self.splits["train"][0])
        # else: pixels scaled to [0, 1] only (the course's ToTensor()).

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _batches(self, split: str, train: bool) -> DeviceBatches:
        self.setup()
        device = self._device()
        images, labels = self.splits[split]
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        if len(labels) < world:  # every device would get an empty shard, and the epoch no batch at all
            if split == "val":
                raise DataError(
                    f"data.val_size={self.val_size} is not allowed; allowed: val_size >= {world} (one "
                    f"validation image for each of the {world} devices)"
                )
            raise DataError(
                f"data: the {split} split has {len(labels)} images, fewer than the {world} devices that each "
                "take a shard of it; use more images or fewer devices (trainer.devices)"
            )
        if images.device != device:
            images, labels = images.to(device), labels.to(device)
            self.splits[split] = (images, labels)
        return DeviceBatches(
            images,
            labels,
            self.batch_size if train else self.eval_batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=train,
            augment=train and self.augment,
            drop_last=False,
            even_shards=train,  # evaluation: every image, on some rank
            seed=self.seed,
            epoch=(lambda: trainer.current_epoch) if trainer is not None else (lambda: 0),
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            channels_last=self.channels_last,
            max_batches=self._train_limit(split) if train else None,
        )

    def _train_limit(self, split: str) -> int | None:
        limit = self.limit_train_batches
        if limit is None or (isinstance(limit, float) and limit >= 1.0):
            return None
        if isinstance(limit, float):  # a fraction of the epoch, as Lightning reads it
            world = self.trainer.world_size if getattr(self, "trainer", None) is not None else 1
            per_rank = len(self.splits[split][1]) // max(1, world)
            batches = -(-per_rank // self.batch_size)
            if int(batches * limit) < 1:  # Lightning refuses this for the dataloaders it limits itself
                from cifarlab.config import ConfigError

                raise ConfigError(
                    f"trainer.limit_train_batches={limit!r} is not allowed; allowed: at least "
                    f"{1 / batches:.4g} (an epoch here is {batches} batches), or a number of batches >= 1"
                )
            return int(batches * limit)
        return int(limit)

    def train_steps_per_epoch(self) -> int:
        """Optimizer steps (batches) per training epoch on this rank, after ``limit_train_batches``."""
        return len(self._batches("train", train=True))

    def train_dataloader(self) -> DeviceBatches | Chunks:
        # A module that runs several optimizer steps per training_step (CifarModule) says how many with
        # ``steps_per_call``; it then receives chunks of that many batches (plans, gathered in its step).
        batches = self._batches("train", train=True)
        trainer = getattr(self, "trainer", None)
        steps = getattr(trainer.lightning_module, "steps_per_call", None) if trainer is not None else None
        return batches.chunks(steps) if steps else batches

    def val_dataloader(self) -> DeviceBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> DeviceBatches:
        return self._batches("test", train=False)

"""The decoded-data cache: hits equal the decoded source bit for bit and decode nothing; a stale or damaged
entry is rebuilt, never trusted; parallel processes build it once; image folders decode as ImageFolder."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import cifarlab.data as data
from cifarlab import datacache
from cifarlab.data import CifarDataModule, load_cifar, load_imagefolder
from tests.test_data import write_cifar_archive


def builds(cache_dir: Path) -> list[str]:
    log = cache_dir / datacache.BUILD_LOG
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def decodes(monkeypatch):
    """Counts the decoders' calls: CIFAR batch files unpickled, image files decoded (in this process)."""
    calls = {"batches": 0, "images": 0}
    read_batches, decode_image = data._read_batches, datacache.decode_image

    def counting_read(*args, **kwargs):
        calls["batches"] += 1
        return read_batches(*args, **kwargs)

    def counting_decode(*args, **kwargs):
        calls["images"] += 1
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(data, "_read_batches", counting_read)
    monkeypatch.setattr(datacache, "decode_image", counting_decode)
    return calls


def write_image_folder(root: Path, per_class: int = 4, seed: int = 0) -> None:
    """Real PNG and JPEG files: RGB, greyscale, RGBA and palette images, some of them not 32x32."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, cls in enumerate(("ship", "cat", "dog")):  # not in sorted order: ImageFolder sorts
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = ((32, 32), (40, 48), (20, 24))[(c + i) % 3]
            rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image = (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"))[i % 4]
            suffix = ".jpg" if i % 2 == 0 and image.mode in ("RGB", "L") else ".png"
            image.save(root / cls / f"{i:03d}{suffix}")
    (root / "cat" / "notes.txt").write_text("not an image: ImageFolder skips it")


def imagefolder_reference(root: Path, image_size: int):
    """The plain path: torchvision's ImageFolder with PILToTensor + Resize, one image at a time."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])
    dataset = ImageFolder(str(root), transform=transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.tensor(dataset.targets), dataset.classes


def test_cifar_cache_hit_equals_the_decoded_batches_and_decodes_nothing(tmp_path, decodes):
    write_cifar_archive(tmp_path)
    plain = load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)
    assert decodes["batches"] == 2  # train batches, test batch
    cache = tmp_path / "cache"
    first = load_cifar(tmp_path, "cifar10", download=False, cache_dir=cache)
    assert decodes["batches"] == 4 and len(builds(cache)) == 1
    second = load_cifar(tmp_path, "cifar10", download=False, cache_dir=cache)
    assert decodes["batches"] == 4 and len(builds(cache)) == 1  # mapped, not decoded
    for a, b, c in zip(plain, first, second, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c)
    # The hit is a memory map of the cache's .npy files, writable in this process only (copy-on-write).
    arrays, _ = datacache._read_entry(next(p for p in cache.iterdir() if p.is_dir()), _source(tmp_path))
    assert isinstance(arrays["train_x"], np.memmap) and arrays["train_x"].shape == (100, 3, 32, 32)
    second[0][0, 0, 0, 0] += 1
    assert torch.equal(load_cifar(tmp_path, "cifar10", download=False, cache_dir=cache)[0], plain[0])


def _source(root: Path) -> str:
    spec = data.CIFAR["cifar10"]
    folder = root / spec["folder"]
    files = [str(folder / f) for f in spec["train"] + spec["test"]]
    return datacache.Source("cifar10", folder, files).fingerprint()


def test_imagefolder_decodes_each_image_once_as_imagefolder_does(tmp_path, decodes):
    write_image_folder(tmp_path / "train")
    ref_x, ref_y, ref_classes = imagefolder_reference(tmp_path / "train", 32)
    cache = tmp_path / "cache"
    x, y, classes = load_imagefolder(tmp_path / "train", 32, cache)
    assert decodes["images"] == 12  # each image once
    assert classes == ref_classes == ["cat", "dog", "ship"]
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x)  # same order, labels and pixels
    x2, y2, classes2 = load_imagefolder(tmp_path / "train", 32, cache)
    assert decodes["images"] == 12 and len(builds(cache)) == 1
    assert torch.equal(x2, ref_x) and torch.equal(y2, ref_y) and classes2 == ref_classes
    # Another image size is another entry; the first one stays valid.
    x16, _, _ = load_imagefolder(tmp_path / "train", 16, cache)
    assert x16.shape == (12, 3, 16, 16) and torch.equal(x16, imagefolder_reference(tmp_path / "train", 16)[0])
    assert decodes["images"] == 24 and len(builds(cache)) == 2
    load_imagefolder(tmp_path / "train", 32, cache)
    assert decodes["images"] == 24


@pytest.mark.slow
def test_worker_processes_decode_the_same_pixels(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path / "train", per_class=6)
    paths = [str(p) for p in sorted((tmp_path / "train").rglob("*")) if p.suffix in (".png", ".jpg")]
    # 32x32 files only: resizing would import torch in every worker, seconds for the same code path.
    paths = [p for p in paths if Image.open(p).size == (32, 32)]
    assert len(paths) == 6
    serial = datacache.decode_images(paths, 32, workers=1)
    parallel = datacache.decode_images(paths, 32, workers=2, chunk=2)  # 3 tasks on 2 spawned processes
    assert np.array_equal(serial, parallel)


@pytest.mark.parametrize("change", ["touch", "rewrite", "add", "remove"])
def test_a_changed_source_rebuilds_the_entry(tmp_path, decodes, change, caplog):
    root, cache = tmp_path / "train", tmp_path / "cache"
    write_image_folder(root)
    load_imagefolder(root, 32, cache)
    target = root / "dog" / "001.png"
    if change == "touch":
        os.utime(target, ns=(time.time_ns(), target.stat().st_mtime_ns + 1_000_000))
    elif change == "rewrite":
        from PIL import Image

        Image.new("RGB", (32, 32), (200, 10, 10)).save(target)
    elif change == "add":
        (root / "dog" / "extra.png").write_bytes(target.read_bytes())
    else:
        target.unlink()
    caplog.set_level(logging.INFO, logger="cifarlab.datacache")
    x, y, _ = load_imagefolder(root, 32, cache)
    assert len(builds(cache)) == 2 and "stale (source files changed)" in caplog.text
    ref_x, ref_y, _ = imagefolder_reference(root, 32)
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # replaced in place, no leftovers


def test_a_changed_cifar_batch_rebuilds_the_entry(tmp_path):
    write_cifar_archive(tmp_path)
    cache = tmp_path / "cache"
    before = load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False, cache_dir=cache)
    batch_file = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch_file, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["data"] = 255 - batch["data"]  # same size, new pixels
    with open(batch_file, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    after = load_cifar(tmp_path, "cifar10", download=False, cache_dir=cache)
    assert len(builds(cache)) == 2 and not torch.equal(before[0], after[0])
    assert torch.equal(after[0], load_cifar(tmp_path, "cifar10", download=False)[0])


def _damage(entry: Path, how: str) -> None:
    images = entry / "images.npy"
    meta = entry / "meta.json"
    if how == "truncated array":
        images.write_bytes(images.read_bytes()[:-100])
    elif how == "flipped byte":
        raw = bytearray(images.read_bytes())
        raw[-5] ^= 0xFF
        images.write_bytes(bytes(raw))
    elif how == "wrong shape":
        np.save(images, np.zeros((11, 3, 32, 32), dtype=np.uint8))
    elif how == "missing array":
        images.unlink()
    elif how == "edited meta":
        m = json.loads(meta.read_text())
        m["arrays"]["images"]["crc32"] += 1
        meta.write_text(json.dumps(m))
    elif how == "garbage meta":
        meta.write_bytes(b"\x00garbage")
    elif how == "no meta":
        meta.unlink()


@pytest.mark.parametrize(
    "how",
    [
        "truncated array",
        "flipped byte",
        "wrong shape",
        "missing array",
        "edited meta",
        "garbage meta",
        "no meta",
    ],
)
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, decodes, how, caplog):
    root, cache = tmp_path / "train", tmp_path / "cache"
    write_image_folder(root)
    good, _, _ = load_imagefolder(root, 32, cache)
    entry = next(p for p in cache.iterdir() if p.is_dir())
    _damage(entry, how)
    x, _, _ = load_imagefolder(root, 32, cache)
    assert decodes["images"] == 24 and len(builds(cache)) == 2
    assert torch.equal(x, good)
    assert any(r.levelno == logging.WARNING and "is damaged" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert torch.equal(load_imagefolder(root, 32, cache)[0], good) and decodes["images"] == 24
    assert not caplog.records  # the rebuilt entry is valid


BUILDER = textwrap.dedent(
    """
    import os, sys, time
    from cifarlab import datacache

    root, cache, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    open(f"{cache}-ready-{os.getpid()}", "w").close()
    while not os.path.exists(f"{cache}-go"):  # start together
        time.sleep(0.01)

    def decode():
        time.sleep(0.5)  # a slow build: every other process asks for the entry meanwhile
        return {"images": datacache.decode_images(paths, 32, workers=1)}, {}

    asked = time.time()
    arrays, _ = datacache.load_or_build(cache, datacache.Source("imagefolder", root, paths), decode)
    print(asked, int(arrays["images"].astype("int64").sum()))
    """
)


@pytest.mark.slow
def test_parallel_processes_build_the_entry_once(tmp_path):
    from PIL import Image

    root, cache = tmp_path / "train", tmp_path / "cache"
    write_image_folder(root)
    paths = [str(p) for p in sorted(root.rglob("*")) if p.suffix in (".png", ".jpg")]
    paths = [p for p in paths if Image.open(p).size == (32, 32)]  # no resizing: no torch import
    env = {**os.environ, "PYTHONPATH": str(Path(datacache.__file__).parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, str(root), str(cache), *paths], stdout=subprocess.PIPE, env=env
        )
        for _ in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("cache-ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "cache-go").touch()
    outputs = [p.communicate(timeout=120)[0].decode().split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    lines = builds(cache)
    assert len(lines) == 1, lines  # built once ...
    assert len({total for _, total in outputs}) == 1  # ... and every process got the same arrays
    built_at = (cache / lines[0].split()[2]).stat().st_mtime
    assert all(float(asked) < built_at for asked, _ in outputs)  # all asked before it existed


def test_unusable_cache_folder_only_costs_the_caching(tmp_path, decodes, caplog):
    write_image_folder(tmp_path / "train")
    (tmp_path / "file").write_text("a file, not a folder")
    x, _, _ = load_imagefolder(tmp_path / "train", 32, tmp_path / "file" / "cache")
    assert decodes["images"] == 12 and "cannot be used" in caplog.text
    assert torch.equal(x, imagefolder_reference(tmp_path / "train", 32)[0])


def test_warm_cache_fills_the_cache_the_datamodule_maps(tmp_path, decodes):
    write_image_folder(tmp_path / "images" / "train")
    write_image_folder(tmp_path / "images" / "test", per_class=2, seed=1)
    cfg = OmegaConf.create(
        dict(
            name="imagefolder",
            data_dir=str(tmp_path / "data"),
            root=str(tmp_path / "images" / "train"),
            image_size=32,
            download=True,
            verify_checksum=True,
            cache=True,
            cache_dir=None,
        )
    )
    datacache.warm_cache(cfg)
    cache = tmp_path / "data" / "cache"
    assert len(builds(cache)) == 2 and decodes["images"] == 18  # train and the sibling test folder
    dm = CifarDataModule("imagefolder", root=cfg.root, val_size=3, cache_dir=datacache.cache_dir_for(cfg))
    dm.setup()
    assert decodes["images"] == 18 and len(dm.splits["test"][1]) == 6
    # data.cache=false: nothing written; synthetic: nothing to cache.
    off = OmegaConf.merge(cfg, {"cache": False, "data_dir": str(tmp_path / "other")})
    assert datacache.cache_dir_for(off) is None
    datacache.warm_cache(off)
    datacache.warm_cache(OmegaConf.merge(cfg, {"name": "synthetic", "data_dir": str(tmp_path / "other")}))
    assert not (tmp_path / "other").exists()


def test_cache_settings_compose_and_are_checked():
    from cifarlab.config import ConfigError, validate
    from tests.conftest import compose_train

    cfg = compose_train(["data=cifar10"])
    assert cfg.data.cache is True and datacache.cache_dir_for(cfg.data) == Path(cfg.data.data_dir) / "cache"
    cfg = compose_train(["data=imagefolder", "data.root=/x", "data.cache_dir=/tmp/c"])
    assert datacache.cache_dir_for(cfg.data) == Path("/tmp/c")
    with pytest.raises(ConfigError, match=r"data.cache_dir='' is not allowed; allowed: null"):
        validate(compose_train(["data.cache_dir=''"]))


def test_the_datamodule_reads_each_source_once_per_run(tmp_path, monkeypatch, decodes):
    """Lightning calls prepare_data before fitting and again before testing, setup on every stage."""
    write_image_folder(tmp_path / "images" / "train")
    write_image_folder(tmp_path / "images" / "test", per_class=2, seed=1)
    reads = []
    load_or_build = datacache.load_or_build
    monkeypatch.setattr(datacache, "load_or_build", lambda *a: reads.append(a[1].root) or load_or_build(*a))
    for run in range(2):
        root = str(tmp_path / "images" / "train")
        dm = CifarDataModule("imagefolder", root=root, val_size=3, cache_dir=tmp_path / "cache")
        for stage in ("fit", "test"):
            dm.prepare_data()
            dm.setup(stage)
        assert len(reads) == 2 * (run + 1)  # train/ and test/, once each
    assert decodes["images"] == 18 and len(builds(tmp_path / "cache")) == 2


def test_an_undecodable_image_is_named(tmp_path):
    write_image_folder(tmp_path / "train")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(
        data.DataError, match=r"dog/broken.jpg cannot be decoded .*remove or replace that file"
    ):
        load_imagefolder(tmp_path / "train", 32, tmp_path / "cache")
    assert not builds(tmp_path / "cache")


UNGUARDED = textwrap.dedent(
    """
    import sys
    from cifarlab import datacache

    paths = sys.argv[2:]
    source = datacache.Source("imagefolder", sys.argv[1], paths)
    decode = lambda: ({"images": datacache.decode_images(paths, 32, workers=2, chunk=1)}, {})
    datacache.load_or_build(sys.argv[1] + "/../cache", source, decode)  # no `if __name__ == "__main__":`
    """
)


@pytest.mark.slow
def test_a_script_without_a_main_guard_fails_instead_of_hanging(tmp_path):
    """Its decoding workers re-run the script, which would wait forever for the lock its parent holds."""
    from PIL import Image

    write_image_folder(tmp_path / "train")
    paths = [str(p) for p in sorted((tmp_path / "train").rglob("*")) if p.suffix in (".png", ".jpg")]
    paths = [p for p in paths if Image.open(p).size == (32, 32)]
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "train"), *paths], capture_output=True, timeout=120
    )
    assert result.returncode != 0
    assert "put that code under `if __name__ == '__main__':`" in result.stderr.decode()

"""Data: CIFAR archives in the exact python format, synthetic data, on-device batching and augmentation."""

from __future__ import annotations

import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import cifarlab.data as data
from cifarlab.data import (
    CIFAR,
    CifarDataModule,
    DataError,
    DeviceBatches,
    crop_flip,
    load_cifar,
    make_synthetic,
)


def write_cifar_archive(root: Path, name: str = "cifar10", per_batch: int = 20, seed: int = 0) -> Path:
    """Write ``<name>-python.tar.gz`` as the official one is laid out: pickled dicts of uint8 rows."""
    spec = CIFAR[name]
    rng = np.random.default_rng(seed)
    staging = root / "staging" / spec["folder"]
    staging.mkdir(parents=True)
    for file in spec["train"] + spec["test"]:
        n = per_batch * (5 if name == "cifar100" and file == "train" else 1)
        batch = {
            "batch_label": f"{file} of 1",
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            spec["label_key"]: rng.integers(0, spec["num_classes"], n).tolist(),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        if name == "cifar100":
            batch["coarse_labels"] = rng.integers(0, 20, n).tolist()
        with open(staging / file, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = "batches.meta" if name == "cifar10" else "meta"
    with open(staging / meta, "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(spec["num_classes"])]}, f, protocol=2)
    archive = root / spec["archive"]
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname=spec["folder"])
    return archive


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_is_extracted_and_read(tmp_path, name):
    root = tmp_path / "data"
    root.mkdir()
    write_cifar_archive(root, name)
    train_x, train_y, test_x, test_y = load_cifar(root, name, download=False, verify_checksum=False)
    n_train = 100
    assert train_x.shape == (n_train, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (20, 3, 32, 32) and train_y.dtype == torch.int64
    assert int(train_y.max()) < CIFAR[name]["num_classes"]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, row-major — as the official files.
    folder = root / CIFAR[name]["folder"]
    with open(folder / CIFAR[name]["train"][0], "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"][0]
    assert torch.equal(train_x[0, 1, 0, :5], torch.from_numpy(raw[1024:1029]))
    # A second load reads the extracted folder without needing the archive.
    (root / CIFAR[name]["archive"]).unlink()
    again = load_cifar(root, name, download=False)
    assert torch.equal(again[0], train_x)


def test_cifar_datamodule_through_the_cache_gives_the_same_splits(tmp_path):
    write_cifar_archive(tmp_path)
    kw = dict(data_dir=str(tmp_path), val_size=10, download=False, verify_checksum=False)
    plain = CifarDataModule("cifar10", **kw)
    plain.setup()
    cached = CifarDataModule("cifar10", cache_dir=tmp_path / "cache", **kw)
    cached.prepare_data()  # what Lightning (and a sweep's warm_cache) runs first: fills the cache
    assert (tmp_path / "cache" / "builds.log").is_file()
    cached.setup()
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(plain.splits[split], cached.splits[split], strict=True))
    assert plain.mean == cached.mean and plain.std == cached.std


def test_checksum_mismatch_is_reported(tmp_path):
    write_cifar_archive(tmp_path)
    with pytest.raises(
        DataError, match=r"cifar-10-python.tar.gz is corrupt or incomplete \(md5 .*expected c58f"
    ):
        load_cifar(tmp_path, "cifar10", download=False, verify_checksum=True)


def test_truncated_archive_is_reported(tmp_path):
    archive = write_cifar_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or incomplete.*delete it"):
        load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)


def test_corrupted_batch_file_is_reported(tmp_path):
    write_cifar_archive(tmp_path)
    load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        load_cifar(tmp_path, "cifar10", download=False)


def test_missing_archive_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10", download=False)
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message and "data=synthetic" in message


def test_a_data_dir_that_cannot_be_created_is_named(tmp_path):
    """data.data_dir under a file: one line naming the setting, not an OSError traceback; the lock is released
    after a normal load (a second load in the same process does not wait on it)."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"^data.data_dir='.*a_file/data' is not allowed: cannot create .*"):
        load_cifar(tmp_path / "a_file" / "data", "cifar10", download=False)
    write_cifar_archive(tmp_path / "ok")
    load_cifar(tmp_path / "ok", "cifar10", download=False, verify_checksum=False)
    from filelock import FileLock

    with FileLock(str(tmp_path / "ok" / ".cifar10.lock"), timeout=0):  # free again
        pass


def test_extracted_cifar_in_a_read_only_folder_loads(tmp_path, monkeypatch):
    """A shared, read-only copy of the extracted batches needs no lock file (root can write anywhere, so the lock is
    made to fail instead of the folder's mode)."""
    write_cifar_archive(tmp_path)
    load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)  # extracts
    import cifarlab.data

    def no_lock(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".cifar10.lock"))

    monkeypatch.setattr(cifarlab.data, "FileLock", no_lock)
    train_x, *_ = load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)
    assert len(train_x) > 0


def test_no_network_says_where_to_put_the_archive(tmp_path, monkeypatch):
    # A closed local port: the download fails at once, like a machine without network.
    monkeypatch.setitem(CIFAR["cifar10"], "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10", download=True)
    message = str(info.value)
    assert "could not download" in message and "cifar-10-python.tar.gz" in message
    assert "data=synthetic" in message and "\n" not in message
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_parallel_loaders_extract_once(tmp_path, monkeypatch):
    """The file lock makes concurrent trials wait for one extraction instead of racing."""
    write_cifar_archive(tmp_path)
    calls = []
    real_open = tarfile.open
    monkeypatch.setattr(data.tarfile, "open", lambda *a, **k: calls.append(1) or real_open(*a, **k))
    results, errors = [], []

    def load():
        try:
            results.append(load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False)[0])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and len(calls) == 1
    assert all(torch.equal(r, results[0]) for r in results)


def test_a_batch_being_extracted_is_never_visible_to_a_lock_free_reader(tmp_path, monkeypatch):
    """download_cifar takes the folder without its lock once every batch file is there. So while one loader is
    half-way through writing the last batch, the folder must still look incomplete, or a concurrent trial reads a
    truncated batch (a CI run once failed so). A killed extraction's leftovers are cleared by the next one."""
    write_cifar_archive(tmp_path)
    stale = tmp_path / ".extract-cifar10-killed"
    (stale / "cifar-10-batches-py").mkdir(parents=True)
    halfway, resume = threading.Event(), threading.Event()
    real_makefile = tarfile.TarFile.makefile

    def slow_makefile(self, tarinfo, targetpath):
        if tarinfo.name.endswith("test_batch"):  # the last member: every other batch is out already
            with open(targetpath, "wb") as f:
                f.write(b"half a batch")
            halfway.set()
            assert resume.wait(30)
        real_makefile(self, tarinfo, targetpath)

    monkeypatch.setattr(tarfile.TarFile, "makefile", slow_makefile)
    results = []
    loader = threading.Thread(
        target=lambda: results.append(load_cifar(tmp_path, "cifar10", download=False, verify_checksum=False))
    )
    loader.start()
    try:
        assert halfway.wait(30)
        folder = tmp_path / "cifar-10-batches-py"
        assert data._missing_batches(folder, "cifar10"), (
            "a half-written batch is visible to lock-free readers"
        )
    finally:
        resume.set()
        loader.join()
    assert len(results) == 1 and len(results[0][3]) == 20
    assert not data._missing_batches(folder, "cifar10")
    assert not list(tmp_path.glob(".extract-*"))  # neither this run's staging folder nor the killed run's


def test_synthetic_is_deterministic_and_balanced():
    x1, y1 = make_synthetic(500, seed=3)
    x2, y2 = make_synthetic(500, seed=3)
    x3, _ = make_synthetic(500, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (500, 3, 32, 32) and x1.dtype == torch.uint8
    assert torch.bincount(y1, minlength=10).min() > 25


def test_crop_flip_matches_a_per_image_reference():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = crop_flip(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = shifts = 0
    for i in range(64):
        # Every output image is one of the 81 crops of its padded input, possibly flipped.
        crops = {(dy, dx): padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
        found = [
            (dy, dx, f)
            for (dy, dx), c in crops.items()
            for f in (False, True)
            if torch.equal(out[i], c.flip(2) if f else c)
        ]
        assert found, f"image {i} is not a crop of its input"
        dy, dx, f = found[0]
        flips += f
        shifts += (dy, dx) != (4, 4)
    assert 16 < flips < 48 and shifts > 48  # different random draws per image


def _batches(n=103, batch=10, **kw):
    x, y = make_synthetic(n, seed=0)
    return DeviceBatches(x, y, batch, mean=[0.5] * 3, std=[0.25] * 3, **kw)


def test_batches_normalise_and_cover_the_split():
    b = _batches()
    assert len(b) == 11
    seen = torch.cat([y for _, y in b])
    assert len(seen) == 103
    x, _ = next(iter(b))
    raw = make_synthetic(103, seed=0)[0][:10].float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_each_epoch_a_fresh_permutation_and_ddp_shards():
    epoch = {"n": 0}
    b = _batches(shuffle=True, seed=7, epoch=lambda: epoch["n"])
    order0 = torch.cat([y for _, y in b])
    again = torch.cat([y for _, y in b])
    epoch["n"] = 1
    order1 = torch.cat([y for _, y in b])
    assert torch.equal(order0, again) and not torch.equal(order0, order1)
    # Two ranks: disjoint shards of equal size drawn from the same permutation.
    xs = []
    for rank in (0, 1):
        shard = _batches(n=100, shuffle=True, seed=7, rank=rank, world_size=2)
        assert len(shard) == 5
        xs.append(torch.cat([x for x, _ in shard]))
    flat = [tuple(v.flatten()[:64].tolist()) for v in torch.cat(xs)]
    assert len(set(flat)) == 100


def test_datamodule_splits_without_touching_test(tmp_path):
    dm = CifarDataModule("synthetic", data_dir=str(tmp_path), val_size=100, train_size=500, test_size=50)
    dm.setup()
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [400, 100, 50]
    other = CifarDataModule(
        "synthetic", data_dir=str(tmp_path), val_size=100, train_size=500, test_size=50, seed=99
    )
    other.setup()
    assert torch.equal(dm.splits["val"][1], other.splits["val"][1])  # same val split whatever the run seed
    assert all(abs(m - 0.5) < 0.1 for m in dm.mean)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog", "ship"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    dm = CifarDataModule("imagefolder", root=str(tmp_path / "train"), val_size=6, image_size=32)
    assert dm.num_classes == 3
    dm.setup()
    x, y = dm.splits["train"]
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8
    assert len(dm.splits["test"][1]) == 12
    # Through the decoded-data cache: the same splits, built on the first setup, mapped on the second.
    for _ in range(2):
        cached = CifarDataModule(
            "imagefolder", root=str(tmp_path / "train"), val_size=6, cache_dir=tmp_path / "cache"
        )
        cached.setup()
        assert all(
            torch.equal(a, b) for s in dm.splits for a, b in zip(dm.splits[s], cached.splits[s], strict=True)
        )
    assert len((tmp_path / "cache" / "builds.log").read_text().splitlines()) == 2  # train/ and test/
    with pytest.raises(DataError, match="data.root="):
        CifarDataModule("imagefolder", root=str(tmp_path / "missing")).setup()

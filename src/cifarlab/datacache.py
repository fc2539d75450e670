"""Decoded datasets kept on disk as uint8 arrays, memory-mapped by every later load.

Decoding is the slow part of loading data: a folder of 50,000 CIFAR JPEGs took 34 s through torchvision's
ImageFolder (12.6 s with ``decode_images``), CIFAR-10's pickled batches 2-3 s, and every trial of a sweep
paid it again. The first load writes the decoded arrays into ``<cache_dir>/<entry>/`` as plain ``.npy``
files plus a ``meta.json``; later loads map them: CIFAR-10 in 0.05-0.09 s, the 50,000-JPEG folder in
0.4 s (most of it one ``stat`` per source file). (2-core AMD EPYC shared with other jobs.)

An entry is named by what it caches: the dataset kind, the resolved source folder and the decoding
settings (image size). Its ``meta.json`` records the source's fingerprint (every source file's relative
path, size and modification time), the format version, each array's shape, dtype and CRC-32, and a
checksum of itself. A load trusts an entry only when all of these match; otherwise it rebuilds it (a
warning when the entry was damaged, an info line when the source changed). Builds hold a file lock per
entry, so parallel trials build once and the others wait and map the result; an entry is written into a
temporary folder and renamed into place, so no reader ever sees half of one. ``builds.log`` in the cache
folder lists every build. Delete the folder to clear the cache; ``data.cache=false`` turns it off.

Only numpy, PIL and filelock are imported here (torch only to resize images), so the decoding worker
processes start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

FORMAT_VERSION = 2  # bump when the layout or the decoding changes: every older entry is then rebuilt
BUILD_LOG = "builds.log"
log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class UndecodableImage(ValueError):
    """An image file could not be read or decoded; the message names the file."""


@dataclass(frozen=True)
class Source:
    """What an entry caches: a kind of dataset, decoded from ``files`` under ``root`` with ``settings``."""

    kind: str  # cifar10, cifar100, imagefolder
    root: Path  # the folder the files are in
    files: Sequence[str]  # every file the arrays are decoded from, in order
    settings: dict[str, Any] = field(default_factory=dict)  # decoding settings that change the arrays

    @property
    def entry_name(self) -> str:
        identity = [self.kind, str(Path(self.root).resolve()), sorted(self.settings.items())]
        return f"{self.kind}-{_digest(identity)[:16]}"

    def fingerprint(self) -> str:
        """A digest of every file's path (relative to root), size and modification time, in order.

        One ``stat`` per file and plain string work: for 50,000 files ~0.2 s of CPU on an AMD EPYC core
        (``os.path.relpath`` alone took 4x that).
        """
        digest = hashlib.sha256(_digest([self.entry_name, sorted(self.settings.items())]).encode())
        prefix = os.path.join(str(self.root), "")
        for path in map(str, self.files):
            try:
                st = os.stat(path)
            except OSError as err:  # e.g. a link to a file that is not there (git-annex, DVC, unmounted)
                raise UndecodableImage(f"{path} cannot be read ({type(err).__name__}: {err})") from None
            relative = path[len(prefix) :] if path.startswith(prefix) else path
            digest.update(f"{relative}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def cache_dir_for(data_cfg: Any, data_dir: str | None = None) -> Path | None:
    """The cache folder a ``cfg.data`` node asks for: ``data.cache_dir``, else ``<data_dir>/cache``; None
    when ``data.cache`` is false."""
    if not data_cfg.get("cache", True):
        return None
    return Path(data_cfg.get("cache_dir") or Path(data_dir or data_cfg.data_dir) / "cache")


def warm_cache(data_cfg: Any) -> None:
    """Download and decode the dataset of a ``cfg.data`` node into the cache now, so that the runs that
    follow (the trials of a sweep) only map it. A no-op for synthetic data."""
    from cifarlab.data import CifarDataModule

    if data_cfg.name == "synthetic":
        return
    CifarDataModule(
        name=data_cfg.name,
        data_dir=data_cfg.data_dir,
        download=data_cfg.download,
        verify_checksum=data_cfg.verify_checksum,
        root=data_cfg.root,
        image_size=data_cfg.image_size,
        cache_dir=cache_dir_for(data_cfg),
    ).prepare_data()


def load_or_build(
    cache_dir: Path | None, source: Source, decode: Callable[[], tuple[Arrays, dict]]
) -> tuple[Arrays, dict]:
    """The decoded arrays of ``source`` and their info dict (JSON-able, e.g. class names).

    Memory-mapped from a valid cache entry when there is one; otherwise ``decode()`` runs (once, under the
    entry's lock, however many processes ask at the same time) and its result is written to the cache.
    ``cache_dir=None``: always decode. A cache folder that cannot be written only costs the caching.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A decoding worker is re-running a script that loads data at its top level: it would wait
        # forever on the lock its parent holds. Fail at once, with the fix (the check multiprocessing
        # itself makes before starting a process).
        raise RuntimeError(
            "cifarlab loads data at the top level of a script that its decoding worker processes re-import;"
            " put that code under `if __name__ == '__main__':`"
        )
    if cache_dir is None:
        return decode()
    cache_dir = Path(cache_dir)
    asked = time.perf_counter()
    fingerprint = source.fingerprint()
    entry = cache_dir / source.entry_name
    try:
        found = _read_entry(entry, fingerprint)
        log.info("data: %s mapped from %s in %.2f s", source.root, entry, time.perf_counter() - asked)
        return found
    except _Miss:
        pass  # built (or found built by another process) under the lock
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_dir / f".{entry.name}.lock"))
        lock.acquire()
    except OSError as err:
        log.warning("data cache %s cannot be used (%s); decoding without it", cache_dir, err)
        return decode()
    try:
        try:
            found = _read_entry(entry, fingerprint)
            log.info("data: %s mapped from %s in %.2f s", source.root, entry, time.perf_counter() - asked)
            return found
        except _Miss as miss:
            reason = miss.reason
            if miss.damaged:
                log.warning("data cache %s is damaged (%s); rebuilding it", entry, miss.reason)
            elif entry.exists():
                log.info("data cache %s is stale (%s); rebuilding it", entry, miss.reason)
        start = time.perf_counter()
        arrays, info = decode()
        seconds = time.perf_counter() - start
        try:
            _write_entry(entry, source, fingerprint, arrays, info, seconds)
        except OSError as err:
            log.warning("data cache %s could not be written (%s); continuing without it", entry, err)
            return arrays, info
        sizes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in arrays.items())
        log.info("data: %s decoded in %.1f s, cached in %s", source.root, seconds, entry)
        with open(cache_dir / BUILD_LOG, "a") as f:
            f.write(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} built {entry.name} ({reason}) from {source.root} "
                f"in {seconds:.1f} s: {sizes}; pid {os.getpid()}\n"
            )
        return arrays, info
    finally:
        lock.release()


class _Miss(Exception):
    def __init__(self, reason: str, damaged: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.damaged = reason, damaged


def _read_entry(entry: Path, fingerprint: str) -> tuple[Arrays, dict]:
    """Map a valid entry's arrays, or raise _Miss saying why it cannot be trusted."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        raise _Miss("missing", damaged=entry.exists())
    try:
        meta = json.loads(meta_path.read_text())
        checksum = meta.pop("checksum")
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise _Miss(f"meta.json unreadable: {err}", damaged=True) from None
    if checksum != _digest(meta):
        raise _Miss("meta.json checksum mismatch", damaged=True)
    if meta.get("format") != FORMAT_VERSION:
        raise _Miss(f"format {meta.get('format')}, expected {FORMAT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise _Miss("source files changed")
    arrays = {}
    for name, spec in meta["arrays"].items():
        path = entry / f"{name}.npy"
        try:
            # Copy-on-write mapping: the tensors made from it are writable without a warning, and a write
            # would stay in this process; nothing is read until used.
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise _Miss(f"{path.name} unreadable: {err}", damaged=True) from None
        if list(array.shape) != spec["shape"] or array.dtype.str != spec["dtype"]:
            raise _Miss(
                f"{path.name} is {array.dtype.str} {list(array.shape)}, expected {spec}", damaged=True
            )
        if os.path.getsize(path) != array.offset + array.nbytes:
            raise _Miss(f"{path.name} has {os.path.getsize(path)} bytes", damaged=True)
        # The full CRC-32 costs ~0.06 s per 150 MB (CIFAR-10) on a 2-core AMD EPYC: the price of never
        # trusting a corrupted file (sha256 took 0.08 s, md5 0.20 s).
        if _crc32(array) != spec["crc32"]:
            raise _Miss(f"{path.name} checksum mismatch", damaged=True)
        arrays[name] = array
    return arrays, meta.get("info", {})


def _write_entry(
    entry: Path, source: Source, fingerprint: str, arrays: Arrays, info: dict, seconds: float
) -> None:
    """Write the entry into a temporary folder, then rename it into place (the caller holds the lock)."""
    cache_dir = entry.parent
    for leftover in cache_dir.glob(f".*-{entry.name}-*"):  # from a builder that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tag = f"{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = cache_dir / f".tmp-{tag}", cache_dir / f".old-{tag}"
    tmp.mkdir()
    try:
        specs = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            specs[name] = {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": _crc32(array)}
        meta = {
            "format": FORMAT_VERSION,
            "kind": source.kind,
            "root": str(Path(source.root).resolve()),
            "settings": source.settings,
            "files": len(source.files),
            "fingerprint": fingerprint,
            "arrays": specs,
            "info": info,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "decode_s": round(seconds, 3),
        }
        meta["checksum"] = _digest(meta)
        # No fsync: after a crash a file that lost its data fails its CRC and is rebuilt.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            os.replace(entry, old)  # readers that mapped the old files keep them until they let go
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(array.reshape(-1).view(np.uint8))


# ---- decoding image files on every core ----

CHUNK = 500  # images per task: ~0.15 s of decoding, so scheduling and pickling stay negligible


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_images(paths: Sequence[str], image_size: int, workers: int | None = None, chunk: int = CHUNK):
    """Decode image files into one ``(N, 3, S, S)`` uint8 array, on every available core.

    Each file is read as torchvision's ``ImageFolder`` reads it (PIL, converted to RGB), then resized as
    ``v2.Resize((S, S), antialias=True)`` resizes its tensor, so the pixels are the ones the plain path
    gives. Worker processes, not threads: decoding a 32x32 JPEG is mostly PIL's Python code (marker
    parsing, ``load``), which holds the GIL; the C decoder that releases it is ~15% of the time (profile
    of 3,000 CIFAR JPEGs), so threads could not go much past one core while processes scale with free
    cores. On this 2-core AMD EPYC, shared with other jobs (load ~4, no core free), 50,000 CIFAR JPEGs
    took 12.6 s in one process, 11.5 s on 2 threads, 12.6 s on 2 processes: nothing to gain there; the
    pool's start-up costs ~0.4 s. Spawned, not forked: the caller may run threads (Lightning, W&B) that a
    fork would copy mid-flight; a spawned worker imports only this module (and torch only to resize).
    """
    n = len(paths)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    starts = range(0, n, chunk)
    blocks = [list(paths[s : s + chunk]) for s in starts]
    workers = min(workers or available_cores(), len(blocks))
    if workers <= 1:
        results = map(_decode_block, blocks, repeat(image_size))
        for s, block in zip(starts, results, strict=True):
            out[s : s + len(block)] = block
        return out
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for s, block in zip(starts, pool.map(_decode_block, blocks, repeat(image_size)), strict=True):
            out[s : s + len(block)] = block
    return out


def _decode_block(paths: list[str], image_size: int) -> np.ndarray:
    return np.stack([decode_image(p, image_size) for p in paths])


def decode_image(path: str, image_size: int) -> np.ndarray:
    """One image file → ``(3, S, S)`` uint8, as ImageFolder + PILToTensor + v2.Resize(antialias) give it.

    Except where ImageFolder's ``convert("RGB")`` clips pixels above 255: 16-bit greyscale keeps its high
    byte, and 32-bit integer or float pixels outside 0..255 raise :class:`UndecodableImage`.
    """
    from PIL import Image

    wide = None  # pixels beyond 8 bits that convert("RGB") would clip at 255: a whiter image, silently
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode.startswith("I;16"):  # 16-bit greyscale: the high byte, as PIL reads 16-bit RGB
                image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
            elif image.mode in ("I", "F"):  # 32-bit integer or float: fine only when within 0..255
                values = np.asarray(image)
                if values.size and not 0 <= values.min() <= values.max() <= 255:
                    wide = f"{image.mode} pixels from {values.min():g} to {values.max():g}"
            if wide is None:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3), as ImageFolder's pil_loader
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UndecodableImage(f"{path} cannot be decoded ({type(err).__name__}: {err})") from None
    if wide is not None:
        raise UndecodableImage(f"{path} cannot be decoded ({wide}, outside 0..255); save it as 8-bit")
    if pixels.shape[:2] == (image_size, image_size):
        return pixels.transpose(2, 0, 1)
    import torch
    from torchvision.transforms.v2 import functional as TF

    chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (PIL's array is read-only)
    resized = TF.resize(chw, [image_size, image_size], antialias=True)
    return resized.numpy()

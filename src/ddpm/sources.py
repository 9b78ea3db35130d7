"""Data sources: where data.source's images come from, what identifies their content, and how
the data stage turns them into the dataset every later stage reads (ddpm.dataset).

data.source is a name of SOURCES (`cifar10`) or else a path or http(s) URL of a folder of
images or of an archive of one (ddpm.imagefolder). A new source is one class here.

Two functions per source, one per stage:
- listing(): the `source` stage's record of the content (DVC cannot follow a path that a
  param names, so that stage runs every time and its file changes only when the content does);
- prepare(): the data stage's conversion into ddpm.dataset's arrays, with its report.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ddpm import data as cifar, dataset, imagefolder
from ddpm.errors import ParamsError, PipelineError
from ddpm.files import download, file_digest, io_workers
from ddpm.locations import check_location, is_url, local_path, mask, shown
from ddpm.params import DataParams

T, R = TypeVar("T"), TypeVar("R")
CHANNELS = 3  # every source is converted to RGB (imagefolder.to_rgb)
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # the official archive: the default data.md5
MAX_DOWNLOAD = 64 << 30  # bytes of an image archive fetched by URL


class Cifar10:
    """CIFAR-10's python archive (data.url, data.md5): 50,000 train and 10,000 test images."""

    def __init__(self, data: DataParams):
        self.data = data

    def check(self) -> None:
        if not self.data.md5:
            raise ParamsError("data.md5 = '': CIFAR-10's archive is always checked: give its md5 "
                              f"({CIFAR10_MD5} for the official file)")
        check_location("data.url", self.data.url)

    def listing(self) -> dict[str, Any]:
        return {"source": "cifar10", "url": self.data.url, "md5": self.data.md5}

    def prepare(self, out: Path, resolution: int, listed: dict[str, Any]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".batches.") as tmp:
            batches = Path(tmp) / "cifar10"
            cifar.download_cifar10(self.data.url, self.data.md5, batches)
            classes = cifar.class_names(batches)
            splits = {}
            for split in cifar.SPLITS:
                images, labels = cifar.load_cifar10(batches, split, labels=True)
                if resolution != cifar.SHAPE[1]:
                    images = np.stack([imagefolder.centre_crop(
                        Image.fromarray(image.transpose(1, 2, 0)), resolution)
                        for image in images]).transpose(0, 3, 1, 2)
                dataset.save_split(out, split, images, labels)
                splits[split] = dataset.split_counts(labels, classes, len(images))
        dataset.write_meta(out, "cifar10", (CHANNELS, resolution, resolution), classes, splits)
        return {"source": "cifar10", "resolution": resolution, "classes": classes,
                "splits": splits}


class ImageFolder:
    """A folder of images, or a .zip / .tar / .tar.gz of one, local or at an http(s) URL."""

    def __init__(self, data: DataParams):
        self.data, self.source = data, data.source
        self.path = None if is_url(self.source) else local_path(self.source)

    @property
    def md5(self) -> str:
        """data.md5 where it was given for this source: CIFAR-10's own md5 is the default's, which
        no image archive can have, so it counts as not given."""
        return "" if self.data.md5 == CIFAR10_MD5 else self.data.md5

    def check(self) -> None:
        """What check_params can know: a URL parses and names an archive; a path is a folder or
        a regular file named as an archive (ddpm.locations: one line naming data.source)."""
        what = "a folder of images, an archive of one (.zip, .tar, .tar.gz) or cifar10"
        check_location("data.source", self.source, folder=True)
        if self.path is None:
            if not imagefolder.is_archive(urlsplit(self.source).path):
                raise ParamsError(f"data.source = {shown(self.source)}: a URL must name an "
                                  f"archive ({', '.join(imagefolder.ARCHIVES)})")
        elif not self.path.is_dir() and not imagefolder.is_archive(self.path.name):
            raise ParamsError(f"data.source = {shown(self.source)}: not a folder and not an "
                              f"archive ({', '.join(imagefolder.ARCHIVES)}); expected {what}")

    def listing(self) -> dict[str, Any]:
        """The content's digest: the archive's sha256, or, for a folder, its images' names and
        contents and the names of the rest (which the report counts); a URL by itself and md5."""
        if self.path is None:
            return {"source": self.source, "md5": self.md5}
        self.check_md5(self.path)
        if not self.path.is_dir():
            return {"source": self.source, "sha256": file_digest(self.path, "sha256")}
        found = imagefolder.layout(self.path)
        with ThreadPoolExecutor(io_workers()) as pool:
            hashes = list(pool.map(lambda e: hashlib.sha256(e.read()).hexdigest(), found.images))
        return {"source": self.source, "images": len(found.images),
                "sha256": folder_digest(found, hashes)}

    def check_md5(self, path: Path) -> None:
        if self.md5 and path.is_file() and (got := file_digest(path, "md5")) != self.md5:
            raise PipelineError(f"{mask(self.source)}: md5 {got} does not match data.md5 "
                                f"{self.md5}: "
                                "the archive is corrupt, incomplete or another one (set "
                                "data.md5 to its md5, or to '' to check none)")

    def prepare(self, out: Path, resolution: int, listed: dict[str, Any]) -> dict[str, Any]:
        if self.path is not None:
            return self._prepare(self.path, out, resolution, listed)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".download.") as tmp:
            archive = Path(tmp) / Path(urlsplit(self.source).path).name
            try:
                download(self.source, archive, MAX_DOWNLOAD)
            except OSError as e:
                raise PipelineError(f"could not download {mask(self.source)} "
                                    f"({mask(str(e), self.source)}): without a network, fetch it "
                                    "elsewhere and set data.source to its path") from None
            self.check_md5(archive)
            return self._prepare(archive, out, resolution, listed)

    def _prepare(self, path: Path, out: Path, resolution: int,
                 listed: dict[str, Any]) -> dict[str, Any]:
        found = imagefolder.layout(path)
        images = np.lib.format.open_memmap(out / "train.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(found.images), CHANNELS, resolution,
                                                  resolution))

        def convert(item: tuple[int, Callable[[], bytes]]) -> tuple[int, str, str]:
            i, read = item
            data = read()
            images[i], mode = imagefolder.convert(f"{mask(self.source)}/{found.images[i].name}",
                                                  data, resolution)
            return i, hashlib.sha256(data).hexdigest(), mode

        hashes, modes = [""] * len(found.images), [""] * len(found.images)
        for i, digest, mode in bounded_map(convert, imagefolder.contents(found), io_workers()):
            hashes[i], modes[i] = digest, mode
        images.flush()
        if self.path is not None and self.path.is_dir() and listed.get("sha256") != \
                folder_digest(found, hashes):
            raise PipelineError(f"{mask(self.source)}: its files changed while the data stage read "
                                "them (or since the source stage listed them): run it again")
        labels = None if found.labels is None else np.array(found.labels, dtype=np.int64)
        if labels is not None:
            np.save(out / "train_labels.npy", labels)
        splits = {"train": dataset.split_counts(labels, found.classes, len(found.images))}
        dataset.write_meta(out, self.source, (CHANNELS, resolution, resolution), found.classes,
                           splits)
        return {"source": self.source, "resolution": resolution, "classes": found.classes,
                "splits": splits, "modes": {m: modes.count(m) for m in sorted(set(modes))},
                "ignored_files": len(found.ignored), "ignored_examples": found.ignored[:5]}


SOURCES: dict[str, type] = {"cifar10": Cifar10}


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items in a pool of `workers` threads, results in the items' order, with at most
    2 x workers items in flight: items may be bytes read lazily (a tar's members), so memory
    stays bounded whatever the source's size."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def source_of(data: DataParams) -> Cifar10 | ImageFolder:
    """The source that data.source names: one of SOURCES, else a folder or archive."""
    return SOURCES.get(data.source, ImageFolder)(data)


def folder_digest(found: imagefolder.Layout, hashes: list[str]) -> str:
    """sha256 over the images' names and content hashes, the other files' names (which the report
    counts) and the class names."""
    record = {"images": [[e.name, h] for e, h in zip(found.images, hashes)],
              "ignored": found.ignored, "classes": found.classes}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def check(data: DataParams) -> None:
    """check_params: a source that cannot be used, as a ParamsError, before anything runs."""
    if data.source != "cifar10" and data.real_split == "test":
        raise ParamsError(f"data.real_split = 'test': data.source = {shown(data.source)} has no "
                          "test split (a folder's images all train): use train")
    source_of(data).check()


def listing(data: DataParams) -> dict[str, Any]:
    return source_of(data).listing()


def prepare(data: DataParams, out: Path, listed: dict[str, Any]) -> dict[str, Any]:
    """The dataset of data.source at data.resolution into `out` (an empty folder), checked
    against the source stage's listing; returns the data stage's report."""
    if listed.get("source") != data.source:
        raise PipelineError(f"the source listing is of {shown(str(listed.get('source')))}, not "
                            f"data.source = {shown(data.source)}: run the source stage first "
                            "(dvc repro source)")
    return source_of(data).prepare(out, data.resolution, listed)

"""A folder of images, or an archive of one: its files, their classes, and each image made
RGB and resolution x resolution once.

Layout: every file with an image suffix (DECODERS) below the folder, at any depth, sorted by path.
When the folder's first level holds two or more subfolders, their sorted names are the classes
(torchvision's ImageFolder convention) and every image must lie in one of them; otherwise the
images are unlabelled. Names that start with a dot and macOS's __MACOSX folders are skipped;
other files are ignored and counted.

Conversion (docs/own_images.md): EXIF orientation applied; 16-bit samples keep their high byte;
alpha composited over white; palette, grayscale, CMYK and the rest through Pillow's conversion to
RGB (no ICC profile applied); then ADM's centre crop (guided-diffusion's image_datasets.py, which
EDM's dataset_tool.py calls center-crop-dhariwal): halve with a box filter while the shorter side
is at least twice the resolution, resize the shorter side to the resolution (bicubic), crop the
centre.
"""
from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from ddpm.errors import PipelineError

MAX_FILE = 256 << 20      # bytes of one image file (a 50-megapixel PNG is about 150 MB)
MAX_PIXELS = 1 << 26      # pixels of one image (8192 x 8192), checked from the header
MAX_ASPECT = 4            # longer side / shorter side: the centre crop keeps at least a quarter
MAX_FILES = 10_000_000    # entries of one folder or archive
MAX_DEPTH = 64            # folders below the top
SKIPPED_FOLDERS = ("__MACOSX",)
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


def pil_decoder(fmt: str) -> Callable[[bytes], Image.Image]:
    """A decoder that lets Pillow parse `fmt` only: a file named .png cannot reach the EPS or
    any other of Pillow's parsers, whatever its bytes say."""
    def decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data), formats=[fmt])
    decode.format = fmt  # what FORMATS names
    return decode


# suffix -> a function from the file's bytes to a PIL image (not yet decoded: the size is checked
# first). A new format is one entry here.
DECODERS: dict[str, Callable[[bytes], Image.Image]] = {
    ".png": pil_decoder("PNG"), ".jpg": pil_decoder("JPEG"), ".jpeg": pil_decoder("JPEG"),
    ".webp": pil_decoder("WEBP"), ".bmp": pil_decoder("BMP"),
}
FORMATS = ", ".join(dict.fromkeys(getattr(decode, "format", suffix)
                                  for suffix, decode in DECODERS.items()))  # PNG, JPEG, ...


@dataclass(frozen=True)
class Entry:
    """One file or folder of the source: its path below the top (posix), its size in bytes
    (-1 for a folder), how to read it."""
    name: str
    size: int
    read: Callable[[], bytes]

    @property
    def is_dir(self) -> bool:
        return self.size < 0


def _no_bytes() -> bytes:
    return b""


def _streamed() -> bytes:
    raise RuntimeError("a tar member's bytes are read in archive order: imagefolder.contents")


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVES)


def is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in DECODERS


def skipped(name: str) -> bool:
    """Hidden files and folders, and the AppleDouble folders of zips made on a Mac."""
    return any(part.startswith(".") or part in SKIPPED_FOLDERS
               for part in PurePosixPath(name).parts)


# -- reading the files --------------------------------------------------------------------------

def _read_file(path: Path, size: int) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read(size + 1)
        except OSError as e:
            raise PipelineError(f"{path}: cannot be read ({e.strerror}): fix its permissions "
                                "or remove it") from None
    return read


def folder_entries(top: Path) -> Iterator[Entry]:
    """The regular files below `top`, links followed. A link that leads back into a folder it is
    in would loop forever: it is an error naming it. FIFOs, sockets and devices are never opened
    (opening a FIFO waits for a writer)."""
    count = 0

    def walk(folder: Path, ancestors: tuple[tuple[int, int], ...]) -> Iterator[Entry]:
        nonlocal count
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise PipelineError(f"{folder}: cannot be listed ({e.strerror}): fix its "
                                "permissions or remove it") from None
        for name in names:
            if skipped(name):
                continue
            path = folder / name
            count += 1
            if count > MAX_FILES:
                raise PipelineError(f"{top}: more than {MAX_FILES:,} files: not an image folder")
            try:
                st = path.stat()
            except OSError as e:  # a dangling link, or a link loop (ELOOP)
                raise PipelineError(f"{path}: cannot be read ({e.strerror}): fix or remove it"
                                    ) from None
            rel = path.relative_to(top).as_posix()
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise PipelineError(f"{path}: a link back to a folder that contains it (a "
                                        "loop): remove the link")
                if len(ancestors) > MAX_DEPTH:
                    raise PipelineError(f"{path}: more than {MAX_DEPTH} folders deep")
                yield Entry(rel, -1, _no_bytes)
                yield from walk(path, (*ancestors, key))
            elif stat.S_ISREG(st.st_mode):
                yield Entry(rel, st.st_size, _read_file(path, min(st.st_size, MAX_FILE)))

    top_stat = top.stat()
    yield from walk(top, ((top_stat.st_dev, top_stat.st_ino),))


def _member_name(archive: Path, name: str) -> str:
    """A member's path, refused when it could point outside the folder it unpacks to."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts[:1] and ":" in path.parts[0]):
        raise PipelineError(f"{archive}: member {name!r} has a path outside the folder: refused "
                            "(nothing was read); rebuild the archive from the folder itself")
    return path.as_posix()


def zip_entries(archive: Path) -> Iterator[Entry]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise PipelineError(f"{archive}: more than {MAX_FILES:,} members")
        for info in infos:
            name = _member_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PipelineError(f"{archive}: member {info.filename!r} is a link: refused "
                                    "(nothing was read); archive the files themselves")
            if info.is_dir():
                yield Entry(name.rstrip("/"), -1, _no_bytes)
                continue

            def read(info=info) -> bytes:
                try:
                    with zipfile.ZipFile(archive) as z, z.open(info) as f:
                        return f.read(MAX_FILE + 1)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise PipelineError(f"{archive}: member {info.filename!r} cannot be read "
                                        f"({e}): the archive is damaged") from None
            yield Entry(name, info.file_size, read)


def tar_entries(archive: Path) -> Iterator[Entry]:
    """Members in archive order, their bytes unread: a tar (gzipped or not) reads only forwards,
    so contents() reads them in one more pass."""
    with tarfile.open(archive, "r:*") as tar:
        for count, member in enumerate(tar, 1):
            tar.members = []  # tarfile keeps every header it read: ~1 KB an empty member
            if count > MAX_FILES:
                raise PipelineError(f"{archive}: more than {MAX_FILES:,} members")
            name = _member_name(archive, member.name)
            if member.issym() or member.islnk():
                raise PipelineError(f"{archive}: member {member.name!r} is a link: refused "
                                    "(nothing was read); archive the files themselves")
            if member.isdir():
                yield Entry(name, -1, _no_bytes)
            elif member.isfile():
                yield Entry(name, member.size, _streamed)


def is_zip(source: Path) -> bool:
    return source.name.lower().endswith(".zip")


def entries(source: Path) -> tuple[Iterable[Entry], str]:
    """The files and folders of a folder or of a .zip / .tar / .tar.gz archive of one, and the
    prefix of the folder that an archive's names carry: an archive whose files all lie in one
    folder is that folder (as if unpacked and pointed at), pets.zip holding pets/cat/1.png."""
    if source.is_dir():
        return folder_entries(source), ""
    try:
        found = list(zip_entries(source) if is_zip(source) else tar_entries(source))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise PipelineError(f"{source}: not a readable archive ({type(e).__name__}: {e})"
                            ) from None
    kept = [e for e in found if not skipped(e.name) and e.name not in ("", ".")]
    tops = {PurePosixPath(e.name).parts[0] for e in kept}
    if not (len(tops) == 1 and all("/" in e.name for e in kept if not e.is_dir)):
        return kept, ""
    prefix = f"{tops.pop()}/"
    return [Entry(e.name[len(prefix):], e.size, e.read) for e in kept
            if e.name.startswith(prefix)], prefix


def _too_large(archive: Path, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def refuse() -> bytes:
        raise PipelineError(f"{archive}: member {member.name!r} holds {member.size:,} bytes, over "
                            f"the {MAX_FILE >> 20} MiB accepted for one image (not read): shrink "
                            "it or remove it")
    return refuse


def contents(found: Layout) -> Iterator[tuple[int, Callable[[], bytes]]]:
    """(index in found.images, how to read its bytes) of every image, in the order that reads
    the source once: a tar archive in its own order, its members read here one at a time (at
    most MAX_FILE bytes of each: a larger one is refused unread), the rest sorted."""
    if found.source.is_dir() or is_zip(found.source):
        yield from enumerate(entry.read for entry in found.images)
        return
    index = {found.prefix + entry.name: i for i, entry in enumerate(found.images)}
    try:
        with tarfile.open(found.source, "r:*") as tar:
            for member in tar:
                tar.members = []  # as in tar_entries: no header kept past its member
                i = index.get(_member_name(found.source, member.name))
                if i is None or not member.isfile():
                    continue
                if member.size > MAX_FILE:
                    yield i, _too_large(found.source, member)
                    continue
                data = tar.extractfile(member).read(MAX_FILE + 1)
                yield i, lambda data=data: data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise PipelineError(f"{found.source}: not a readable archive ({type(e).__name__}: "
                            f"{e})") from None


# -- the layout ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    source: Path              # the folder or archive
    prefix: str               # the folder an archive's names start with ("" or "pets/")
    images: list[Entry]       # sorted by name
    labels: list[int] | None  # class index of each image, or None (unlabelled)
    classes: list[str]        # sorted class folder names ([] when unlabelled)
    ignored: list[str]        # names of the files that are not images (non-hidden)


def layout(source: Path) -> Layout:
    """The images of the source, their classes, and what was ignored; the errors that make the
    folder unusable, each one line naming a file and what to do."""
    images, ignored, folders = [], [], set()
    listed, prefix = entries(source)
    for entry in listed:
        if skipped(entry.name):
            continue
        parts = PurePosixPath(entry.name).parts
        if len(parts) > 1 or entry.is_dir:
            folders.add(parts[0])
        if not entry.is_dir:
            (images if is_image(entry.name) else ignored).append(entry)
    images.sort(key=lambda e: e.name)
    if not images:
        raise PipelineError(f"{source}: no images ({FORMATS}) in it{_ignored(ignored)}: put "
                            "the images there, in class subfolders if they have classes")
    classes = sorted(folders) if len(folders) >= 2 else []
    labels = None
    if classes:
        loose = [e.name for e in images if "/" not in e.name]
        if loose:
            raise PipelineError(f"{source}: {len(loose)} image(s) beside the class folders "
                                f"(first: {loose[0]}): move them into a class folder or remove "
                                "them")
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[e.name.split("/", 1)[0]] for e in images]
        empty = sorted(set(classes) - {e.name.split("/", 1)[0] for e in images})
        if empty:
            raise PipelineError(f"{source}/{empty[0]}: a class folder with no images ({FORMATS}"
                                "): add images or remove the folder")
    return Layout(source, prefix, images, labels, classes, sorted(e.name for e in ignored))


def _ignored(ignored: list[Entry]) -> str:
    return (f" ({len(ignored)} other file(s) ignored, e.g. {ignored[0].name})" if ignored
            else "")


# -- one image ----------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """The stated rule: EXIF orientation applied; 16-bit samples keep their high byte; alpha (or
    a palette's transparency) composited over white; every other mode through Pillow's RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        gray = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def centre_crop(img: Image.Image, resolution: int) -> Image.Image:
    """ADM's rule (guided-diffusion image_datasets.py center_crop_arr): box-halve while the
    shorter side is at least 2 x resolution, bicubic to a shorter side of `resolution`, then the
    centre resolution x resolution."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    top, left = (img.height - resolution) // 2, (img.width - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def convert(where: str, data: bytes, resolution: int) -> tuple[np.ndarray, str]:
    """One image file's bytes -> ((3, resolution, resolution) uint8, its original mode)."""
    if len(data) > MAX_FILE:
        raise PipelineError(f"{where}: over {MAX_FILE >> 20} MiB: not accepted as one image; "
                            "shrink it or remove it")
    decode = DECODERS[PurePosixPath(where).suffix.lower()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with decode(data) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise PipelineError(f"{where}: {width} x {height} pixels, over the "
                                        f"{MAX_PIXELS:,} accepted (a decompression bomb, or a "
                                        "very large image): shrink it or remove it")
                if max(width, height) > MAX_ASPECT * min(width, height):
                    raise PipelineError(f"{where}: {width} x {height} pixels, more than "
                                        f"{MAX_ASPECT}:1, so a centre crop would keep little of "
                                        "it: crop it yourself or remove it")
                mode = img.mode
                img.load()  # decodes: a truncated or corrupt file raises here
                out = centre_crop(to_rgb(img), resolution)
    except PipelineError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PipelineError(f"{where}: {e} (Pillow's bound): remove it") from None
    except Exception as e:  # noqa: BLE001  untrusted bytes: whatever Pillow raises for them
        message = (str(e).splitlines() or [""])[0][:160]
        raise PipelineError(f"{where}: not a readable {PurePosixPath(where).suffix} image "
                            f"({type(e).__name__}: {message}): re-save or remove it") from None
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1), mode

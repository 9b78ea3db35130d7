"""A folder of one's own images through the data stage (ddpm.imagefolder, ddpm.sources): the
layout and class rule, the stated RGB and resize rules against independent truths, and every
hostile or careless folder as one line, exit code 1, and the dataset left as it was."""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm import dataset, imagefolder
from ddpm.errors import PipelineError
from fakes import run_data_stages, run_stage

RNG = np.random.default_rng(0)


def image(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    """A random image of (width, height)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = RNG.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def save(img: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    return path


def classes_folder(root: Path, per_class: int = 3, names=("cat", "dog", "fox")) -> Path:
    """root/<class>/<i>.png and .jpg (half each), random 32 x 32 images."""
    for name in names:
        for i in range(per_class):
            save(image(), root / name / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


def prepared(tmp_path: Path, source: Path, **overrides) -> tuple[Path, dict]:
    """The source and data stages on `source`: (the dataset folder, the report)."""
    result = run_data_stages(tmp_path, data__source=str(source), **overrides)
    assert result.returncode == 0, result.stderr
    return tmp_path / "dataset", json.loads((tmp_path / "data.json").read_text())


# --- the layout ----------------------------------------------------------------------------------

def test_class_folders_are_labels_and_the_report_counts_them(tmp_path):
    """Two or more first-level folders: their sorted names are the classes (ImageFolder's rule);
    images in dataset order sorted by path; other files ignored and counted; hidden ones skipped."""
    root = classes_folder(tmp_path / "pets", names=("dog", "cat", "fox"))
    save(image(), root / "dog" / "deeper" / "x.png")  # any depth, under its class
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0" * 10)
    save(image(), root / "cat" / ".hidden.png")  # skipped, as a dot file is
    data, report = prepared(tmp_path, root)
    assert report["classes"] == ["cat", "dog", "fox"]
    assert report["splits"] == {"train": {"images": 10, "classes": {"cat": 3, "dog": 4,
                                                                    "fox": 3}}}
    assert report["ignored_files"] == 1 and report["ignored_examples"] == ["dog/notes.txt"]
    images, labels = dataset.load(data, "train", labels=True)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    with Image.open(root / "cat" / "0.png") as first:  # PNG: lossless, 32 x 32: unchanged
        assert np.array_equal(images[0].transpose(1, 2, 0), np.asarray(first))
    with Image.open(root / "dog" / "deeper" / "x.png") as deep:  # sorted: dog/0, 1, 2, deeper/x
        assert np.array_equal(images[6].transpose(1, 2, 0), np.asarray(deep))


@pytest.mark.parametrize("layout", [["a.png", "b.jpg"], ["only/a.png", "only/b/c.png"]])
def test_without_two_class_folders_the_images_are_unlabelled(tmp_path, layout):
    for name in layout:
        save(image(), tmp_path / "src" / name)
    data, report = prepared(tmp_path, tmp_path / "src")
    assert report["classes"] == [] and report["splits"] == {"train": {"images": 2}}
    images, labels = dataset.load(data, "train", labels=True)
    assert images.shape == (2, 3, 32, 32) and labels is None


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_an_archive_of_a_folder_is_that_folder(tmp_path, kind):
    """pets.zip holding pets/<class>/... gives what the folder pets gives, byte for byte."""
    root = classes_folder(tmp_path / "pets")
    (tmp_path / "a").mkdir()
    folder_data, folder_report = prepared(tmp_path / "a", root)
    archive = tmp_path / f"pets.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, path.relative_to(tmp_path).as_posix())
    else:
        with tarfile.open(archive, "w:gz" if kind == "tar.gz" else "w") as tar:
            tar.add(root, arcname="pets")
    (tmp_path / "b").mkdir()
    data, report = prepared(tmp_path / "b", archive)
    assert report["classes"] == folder_report["classes"]
    assert report["splits"] == folder_report["splits"]
    for name in ("train.npy", "train_labels.npy"):
        assert (data / name).read_bytes() == (folder_data / name).read_bytes()


def test_the_cifar10_md5_counts_as_not_given_for_an_archive_and_another_is_checked(tmp_path):
    root = classes_folder(tmp_path / "pets")
    archive = tmp_path / "pets.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="pets")
    (tmp_path / "a").mkdir()
    prepared(tmp_path / "a", archive)  # params.yaml's data.md5 is CIFAR-10's
    result = run_data_stages(tmp_path, data__source=str(archive), data__md5="0" * 32)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"{archive}: md5 " in result.stderr and "does not match data.md5" in result.stderr


# --- the stated conversion rules -----------------------------------------------------------------

def converted(img: Image.Image, fmt: str = "PNG", resolution: int = 32, **options) -> np.ndarray:
    """imagefolder.convert of img saved as fmt: (H, W, 3) uint8."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    out, _ = imagefolder.convert(f"x.{fmt.lower()}", buffer.getvalue(), resolution)
    return out.transpose(1, 2, 0)


def test_grayscale_palette_and_cmyk_become_rgb_by_the_stated_rules():
    gray = image(mode="L")
    assert np.array_equal(converted(gray), np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    rgb = image()
    palette = rgb.quantize(16)
    assert np.array_equal(converted(palette), np.asarray(palette.convert("RGB")))
    cmyk = Image.new("CMYK", (32, 32), (0, 0, 0, 0))
    cmyk.paste((0, 0, 0, 255), (0, 0, 16, 32))  # left half: full black ink
    out = converted(cmyk, "JPEG", quality=100)
    assert out[:, :14].max() <= 2 and out[:, 18:].min() >= 253  # Pillow's naive CMYK -> RGB


def test_alpha_is_composited_over_white():
    """out = alpha c + (1 - alpha) 255, per channel, rounded."""
    rgba = image(mode="RGBA")
    pixels = np.asarray(rgba).astype(np.float64)
    alpha = pixels[..., 3:] / 255
    expected = pixels[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(converted(rgba).astype(int) - expected).max() <= 1
    transparent = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    assert (converted(transparent) == 255).all()


def test_16_bit_samples_keep_their_high_byte():
    values = RNG.integers(0, 65536, (32, 32), dtype=np.uint16)
    img = Image.fromarray(values.astype(np.int32), "I").convert("I;16")
    assert np.array_equal(converted(img)[..., 0], (values >> 8).astype(np.uint8))


def test_exif_orientation_is_applied():
    """Orientation 6 (stored rotated: display turns it 90 degrees clockwise)."""
    img = image((32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    got = converted(img, "PNG", exif=exif.tobytes())
    assert np.array_equal(got, np.asarray(img.transpose(Image.Transpose.ROTATE_270)))


def test_the_resize_rule_is_adms_box_halving_then_the_centre():
    """A 128 x 64 image whose 2 x 2 blocks are constant: one box halving gives exactly the
    64 x 32 image of the blocks (the shorter side 64 is 2 x 32), no bicubic step is needed
    (the shorter side is then 32), and the centre crop keeps columns 16..47."""
    blocks = RNG.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    big = Image.fromarray(blocks.repeat(2, axis=0).repeat(2, axis=1))
    assert big.size == (128, 64)
    assert np.array_equal(converted(big), blocks[:, 16:48])


def test_upscaling_is_bicubic_to_the_resolution_and_an_exact_size_passes_unchanged():
    img = image((32, 32))
    assert np.array_equal(converted(img), np.asarray(img))
    up = converted(img, resolution=64)
    assert np.array_equal(up, np.asarray(img.resize((64, 64), Image.BICUBIC)))
    wide = image((48, 32))  # shorter side already 32: only the centre 32 columns
    assert np.array_equal(converted(wide), np.asarray(wide)[:, 8:40])


def test_a_folder_at_64_pixels(tmp_path):
    root = classes_folder(tmp_path / "pets")
    data, report = prepared(tmp_path, root, data__resolution=64)
    assert report["resolution"] == 64 and dataset.image_shape(data) == (3, 64, 64)
    with Image.open(root / "cat" / "0.png") as first:
        expected = np.asarray(first.resize((64, 64), Image.BICUBIC))
    assert np.array_equal(dataset.load(data, "train")[0].transpose(1, 2, 0), expected)


# --- hostile and careless folders: one line, exit code 1, the last dataset kept -----------------

def png_claiming(width: int, height: int) -> bytes:
    """A valid 1 x 1 PNG whose header says width x height: a few bytes that would decode into
    width x height pixels (a decompression bomb), caught from the header."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def truncated(fmt: str) -> bytes:
    buffer = io.BytesIO()
    image((64, 64)).save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def loop(root: Path) -> None:
    (root / "cat" / "back").symlink_to(root, target_is_directory=True)


def file_loop(root: Path) -> None:
    (root / "cat" / "a.png").symlink_to(root / "cat" / "b.png")
    (root / "cat" / "b.png").symlink_to(root / "cat" / "a.png")


def unreadable(root: Path) -> None:
    """A file that no one can read, root included: /proc/self/mem at offset 0 is EIO."""
    if os.geteuid() == 0:
        (root / "cat" / "x.png").symlink_to("/proc/self/mem")
    else:
        save(image(), root / "cat" / "x.png").chmod(0)


CASES = {  # what is done to a good class folder tree -> the start of the error line
    "an empty folder": (lambda root: [p.unlink() for p in sorted(root.rglob("*.*"))],
                        "{root}: no images (PNG, JPEG, WEBP, BMP) in it"),
    "a truncated JPEG": (lambda root: (root / "cat" / "t.jpg").write_bytes(truncated("JPEG")),
                         "{root}/cat/t.jpg: not a readable .jpg image"),
    "a corrupt PNG": (lambda root: (root / "dog" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\nxx"),
                      "{root}/dog/c.png: not a readable .png image"),
    "a truncated PNG": (lambda root: (root / "dog" / "t.png").write_bytes(truncated("PNG")),
                        "{root}/dog/t.png: not a readable .png image"),
    "a decompression bomb": (lambda root: (root / "dog" / "b.png").write_bytes(
        png_claiming(100_000, 100_000)), "{root}/dog/b.png: Image size (10000000000 pixels) "
                                         "exceeds limit of 178956970 pixels"),
    "an image over our pixel bound": (lambda root: (root / "dog" / "b.png").write_bytes(
        png_claiming(9000, 9000)), "{root}/dog/b.png: 9000 x 9000 pixels, over the 67,108,864"),
    "a 1 x 1000 image": (lambda root: save(image((1, 1000)), root / "fox" / "line.png"),
                         "{root}/fox/line.png: 1 x 1000 pixels, more than 4:1"),
    "a symlink loop": (loop, "{root}/cat/back: a link back to a folder that contains it"),
    "a file link loop": (file_loop, "{root}/cat/a.png: cannot be read (Too many levels of "
                                    "symbolic links)"),
    "an unreadable file": (unreadable, "{root}/cat/x.png: cannot be read ("),
    "a class folder with no images": (lambda root: (root / "emu").mkdir(),
                                      "{root}/emu: a class folder with no images"),
    "an image beside the class folders": (lambda root: save(image(), root / "stray.png"),
                                          "{root}: 1 image(s) beside the class folders"),
    "a non-image file named .png": (lambda root: (root / "fox" / "n.png").write_text("hello"),
                                    "{root}/fox/n.png: not a readable .png image"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_or_careless_folder_is_one_line_and_keeps_the_dataset(tmp_path, case):
    root = classes_folder(tmp_path / "pets")
    data, _ = prepared(tmp_path, root)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    damage, message = CASES[case]
    damage(root)
    result = run_data_stages(tmp_path, data__source=str(root))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: " + message.format(root=root)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def member_archive(path: Path, kind: str, name: str, link: bool = False) -> Path:
    """A .zip or .tar.gz of one good image pets/cat/0.png plus the member `name` (a link to
    /etc/passwd with link=True)."""
    good = io.BytesIO()
    image().save(good, "PNG")
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("pets/cat/0.png", good.getvalue())
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd" if link else good.getvalue())
    else:
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("pets/cat/0.png")
            info.size = len(good.getvalue())
            tar.addfile(info, io.BytesIO(good.getvalue()))
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(good.getvalue())
                tar.addfile(info, io.BytesIO(good.getvalue()))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("name, link, problem", [
    ("../escape.png", False, "has a path outside the folder"),
    ("/abs/escape.png", False, "has a path outside the folder"),
    ("pets/cat/passwd.png", True, "is a link"),
])
def test_an_archive_member_outside_the_folder_or_a_link_is_refused(tmp_path, kind, name, link,
                                                                   problem):
    archive = member_archive(tmp_path / f"pets.{kind}", kind, name, link)
    result = run_data_stages(tmp_path, data__source=str(archive))
    assert result.returncode == 1
    assert result.stderr == f"error: {archive}: member {name!r} {problem}: refused " \
                            f"(nothing was read); {result.stderr.split('; ', 1)[1]}"
    assert result.stderr.count("\n") == 1 and not (tmp_path / "dataset").exists()
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()


def test_a_tar_member_over_256_mib_is_refused_unread(tmp_path):
    """260 KB of gzip that would inflate to one 256 MiB + 1 image: refused from its header."""
    import hostile
    good = io.BytesIO()
    image().save(good, "PNG")
    archive = hostile.tar_gz(tmp_path / "pets.tar.gz", [
        ("pets/cat/0.png", good.getvalue()), ("pets/cat/big.png", imagefolder.MAX_FILE + 1)])
    result = run_data_stages(tmp_path, data__source=str(archive))
    assert result.returncode == 1
    assert result.stderr == (f"error: {archive}: member 'pets/cat/big.png' holds 268,435,457 "
                             "bytes, over the 256 MiB accepted for one image (not read): shrink "
                             "it or remove it\n")
    assert not (tmp_path / "dataset").exists()


def test_fewer_images_than_one_batch_stop_train_in_one_line(tmp_path):
    root = classes_folder(tmp_path / "pets", per_class=2)  # 6 images, a batch of 16
    prepared(tmp_path, root)
    result = run_stage("train.py", tmp_path, "--data", "dataset", "--checkpoints", "ckpt",
                       "--runs", "runs", "--ema", "ema.pt", "--metrics", "m.json", "--report",
                       "r.json", "--loss", "loss.tsv", "--samples", "previews", "--real-stats",
                       "none.npz", "--fid", "fid.tsv", "--curves", "curves",
                       data__source=str(root), train__batch_size=16, device="cpu")
    assert result.returncode == 1
    assert result.stderr == (f"error: 6 training images in dataset (of {root}) cannot fill one "
                             "optimizer step of 16 images (train.batch_size): add images, raise "
                             "data.limit or lower train.batch_size\n")
    assert not (tmp_path / "ema.pt").exists()


@pytest.mark.parametrize("source, message", [
    ("cifar10", "data.md5 = '': CIFAR-10's archive is always checked: give its md5"),
    ("nowhere", "data.source = 'nowhere': no such folder or file here"),
    ("params.yaml", "data.source = 'params.yaml': not a folder and not an archive"),
    ("https://example.com/pets", "data.source = 'https://example.com/pets': a URL must name an "
                                 "archive"),
])
def test_a_source_that_cannot_be_used_stops_check_params(tmp_path, source, message):
    result = run_stage("check_params.py", tmp_path, "--out", "ok", data__source=source,
                       data__md5="")
    assert result.returncode == 2
    assert result.stderr == f"error: params.yaml: {message}" + result.stderr.split(message)[1]
    assert result.stderr.count("\n") == 1 and not (tmp_path / "ok").exists()


def test_a_crafted_object_array_runs_nothing(tmp_path):
    """A dataset array that `dvc pull` could bring: np.load(allow_pickle=True) would run it;
    ddpm.dataset refuses it unread, in one line."""
    import hostile
    from fakes import make_cifar_archive  # noqa: F401  (fakes first on sys.path)
    root = classes_folder(tmp_path / "pets")
    data, _ = prepared(tmp_path, root)
    marker = tmp_path / "created_by_the_pickle"
    crafted = hostile.object_array(marker)
    np.load(io.BytesIO(crafted), allow_pickle=True)  # the unsafe way does harm
    assert marker.exists()
    marker.unlink()
    (data / "train.npy").write_bytes(crafted)
    with pytest.raises(PipelineError) as error:
        dataset.load(data, "train")
    assert str(error.value).startswith(f"{data / 'train.npy'}: not a readable array (ValueError")
    assert "Python objects" in str(error.value) and not marker.exists()

"""Every loader's failure is one line (issue #30): a damaged models/ema.pt, a PNG whose pixels do
not decode behind valid checksums, an empty training set and a metrics file that cannot be
written, each through the real stage script or `python -m ddpm sample`: exit 1 and exactly one
`error:` line naming the file, no traceback."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import checkpoint, networks
from ddpm.images import write_pngs
from ddpm.params import parse_params, run_config
from fakes import make_cifar_archive, python_m_ddpm, run_data_stages, run_stage

SAMPLE_ARGS = ("--ema", "ema.pt", "--out", "samples", "--metrics", "metrics/sample.json",
               "--report", "report.json", "--grid", "grid.png")


def one_error(done: subprocess.CompletedProcess, names: str, code: int = 1) -> str:
    """The single `error:` line of a failed run, which must name `names`; no traceback."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert names in errors[0], errors[0]
    return errors[0]


def python_m_ddpm_sample(cwd: Path, model: Path) -> subprocess.CompletedProcess:
    return python_m_ddpm(cwd, "sample", model, "--out", "out", "--num-images", "2", "--steps", "2",
                         "--device", "cpu")


@pytest.fixture(scope="module")
def good_state(tiny) -> dict:
    params = parse_params(tiny)
    return {"ema": networks.build(params.model, (3, 32, 32)).state_dict(),
            "config": run_config(params), "image_shape": [3, 32, 32]}


def wrong_shape(state: dict) -> dict:
    first = next(iter(state["ema"]))
    return dict(state, ema={**state["ema"], first: torch.zeros(3)})


DAMAGES = {  # name: (damage, what the line says)
    "a list": (lambda state: [1, 2, 3], "a list, not a dict"),
    "no ema": (lambda state: {k: v for k, v in state.items() if k != "ema"}, "no 'ema' weights"),
    "ema a list": (lambda state: dict(state, ema=[1.0]), "'ema' weights are a list"),
    "floats": (lambda state: dict(state, ema={k: 0.5 for k in state["ema"]}),
               "not a dense tensor"),
    "int keys": (lambda state: dict(state, ema=dict(enumerate(state["ema"].values()))),
                 "not a parameter name"),
    "wrong shape": (wrong_shape, "size mismatch for"),
    "config a list": (lambda state: dict(state, config=["model"]), "recorded config"),
}
# `python -m ddpm sample` reads the file by ddpm.model_file: the cases where its code differs
COMMAND = ("a list", "floats", "int keys", "wrong shape")


@pytest.mark.parametrize("reader, case", [*(("stage", case) for case in DAMAGES),
                                          *(("python -m ddpm sample", case) for case in COMMAND)])
def test_a_malformed_ema_file_is_one_line(tiny, tmp_path, good_state, reader, case):
    damage, says = DAMAGES[case]
    torch.save(damage(good_state), tmp_path / "ema.pt")  # loads with weights_only=True
    if reader == "stage":
        done = run_stage("sample.py", tmp_path, *SAMPLE_ARGS, **tiny)
    else:
        done = python_m_ddpm_sample(tmp_path, tmp_path / "ema.pt")
    line = one_error(done, "ema.pt")
    assert says in line, line
    assert not (tmp_path / "samples").exists() and not (tmp_path / "out").exists()


def corrupt_idat(path: Path) -> None:
    """Ruin the deflate stream of the first IDAT chunk and give the chunk its matching CRC: every
    checksum of the file is valid, its pixels do not decode."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    body = start + 8
    data[body + 2:body + length] = b"\xff" * (length - 2)  # the zlib header stays
    crc = zlib.crc32(bytes(data[start + 4:body + length]))
    data[body + length:body + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_a_png_with_valid_checksums_and_broken_pixels_is_caught_before_pytorch_fid(tmp_path):
    """The fixture does harm the unsafe way: Pillow's verify() (checksums) passes, decoding (what
    pytorch-fid's loader does) raises."""
    write_pngs(np.full((1, 32, 32, 3), 7, np.uint8), tmp_path)
    corrupt_idat(tmp_path / "0.png")
    with Image.open(tmp_path / "0.png") as img:
        img.verify()
    with pytest.raises(OSError), Image.open(tmp_path / "0.png") as img:
        img.convert("RGB")


def pngs(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_pngs(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), folder)


@pytest.mark.parametrize("stage", ["fid", "real_stats"])
def test_a_png_whose_pixels_do_not_decode_is_one_line(tiny, tmp_path, stage):
    folder = tmp_path / "data" / ("samples" if stage == "fid" else "real_png")
    folder.mkdir(parents=True)
    pngs(folder)
    corrupt_idat(folder / "3.png")
    if stage == "fid":
        np.savez(tmp_path / "real_stats.npz", mu=np.zeros(64), sigma=np.eye(64), num_images=6)
        done = run_stage("fid.py", tmp_path, "--images", "data/samples", "--real-stats",
                         "real_stats.npz", "--metrics", "fid.json", "--report", "report.json",
                         **tiny)
    else:
        done = run_stage("real_stats.py", tmp_path, "--images", "data/real_png", "--out",
                         "real_stats.npz", **tiny)
    line = one_error(done, "3.png")
    assert "dvc checkout data/" in line and "pytorch" not in done.stderr.lower(), line
    assert not (tmp_path / ("fid.json" if stage == "fid" else "real_stats.npz")).exists()


def test_a_png_of_another_size_is_one_line(tiny, tmp_path):
    folder = tmp_path / "real_png"
    pngs(folder)
    Image.new("RGB", (16, 16)).save(folder / "2.png")
    done = run_stage("real_stats.py", tmp_path, "--images", "real_png", "--out", "s.npz", **tiny)
    assert "expected a 32x32 RGB PNG" in one_error(done, "2.png")


def test_an_empty_training_set_is_one_line_in_the_data_stage(tiny, tmp_path):
    """Five empty train batches (and an empty test batch): the data stage refuses the dataset,
    which no later stage could read, and keeps the one it had (export_real would otherwise say
    only that dataset.json is not of its format)."""
    archive = tmp_path / "empty" / "cifar-10-python.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=0)
    data = {**tiny["data"], "url": str(archive), "md5": md5, "limit": 0}
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "kept").write_text("the previous dataset\n")
    line = one_error(run_data_stages(tmp_path, data=data), "data.source = cifar10")
    assert "train and test splits hold no images" in line and "dvc repro download" in line, line
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["kept"]


@pytest.mark.parametrize("how", ["read-only folder", "parent is a file"])
def test_metrics_that_cannot_be_written_after_sampling_is_one_line(tiny, tmp_path, good_state,
                                                                    how):
    """The images are drawn and in place; the line says so, names the metrics file and why."""
    checkpoint.save(good_state, tmp_path / "ema.pt")
    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o500 folder (the 'parent is a file' case runs)")
        (tmp_path / "metrics").mkdir()
        (tmp_path / "metrics").chmod(0o500)
    else:
        (tmp_path / "metrics").write_text("a file where the folder should be\n")
    try:
        done = run_stage("sample.py", tmp_path, *SAMPLE_ARGS,
                         **{**tiny, "sample": {**tiny["sample"], "num_images": 3, "steps": 2}})
    finally:
        if (tmp_path / "metrics").is_dir():
            (tmp_path / "metrics").chmod(0o700)
    line = one_error(done, "metrics")
    assert "the 3 images are in samples" in line, line
    assert "could not be written" in line, line
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["0.png", "1.png", "2.png"]
    shutil.rmtree(tmp_path / "samples")

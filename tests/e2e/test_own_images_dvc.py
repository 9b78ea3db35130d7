"""Your own images through the real dvc CLI: real CIFAR-10 images exported as a folder a user
might have (ten class folders, PNG and JPEG, a few of other sizes), brought in with `dvc add`
and trained on with `dvc exp run -S data.source=data/<name>`, at 32 and at 64 pixels; one
changed image re-runs the pipeline from the data stage, and nothing re-runs when nothing
changed; the folder as a zip brought in by `dvc import-url`."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from dvc_repo import commit, dvc, make_repo, sh
from real_data import REAL_ARCHIVE, real_folder, require

pytestmark = pytest.mark.e2e

PER_CLASS = 5  # 50 images: 3 optimizer steps of 16 an epoch
FOLDER = "data/cifar_folder"


def ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


@pytest.fixture(scope="module")
def own(tmp_path_factory, tiny):
    """(repo, the class counts, the output of `dvc exp run -S data.source=data/cifar_folder`)."""
    require(REAL_ARCHIVE)
    repo = make_repo(tmp_path_factory.mktemp("own") / "repo", tiny)
    counts = real_folder(repo / FOLDER, PER_CLASS)
    dvc(repo, "add", FOLDER)
    sh(repo, "git", "add", f"{FOLDER}.dvc", "data/.gitignore")
    commit(repo, "my images, tracked by DVC")
    out = dvc(repo, "exp", "run", "-S", f"data.source={FOLDER}", "-S", "data.limit=0").stdout
    return repo, counts, out


def test_a_folder_trains_samples_and_scores_and_the_report_names_its_classes(own):
    repo, counts, out = own
    assert ran(out) == ["check_params", "source", "download", "export_real", "real_stats",
                        "train", "sample", "fid"]
    report = json.loads((repo / "reports/data.json").read_text())
    assert report["source"] == FOLDER and report["resolution"] == 32
    assert report["classes"] == sorted(counts)  # airplane ... truck
    assert report["splits"]["train"] == {"images": 10 * PER_CLASS, "classes": counts}
    assert report["modes"] == {"RGB": 10 * PER_CLASS} and report["ignored_files"] == 0
    assert len(list((repo / "data/real_png").iterdir())) == 10 * PER_CLASS
    train = json.loads((repo / "reports/train.json").read_text())
    assert train["steps"] == 2 * (10 * PER_CLASS // 16)
    with Image.open(repo / "data/samples/0.png") as sample:
        assert sample.size == (32, 32) and sample.mode == "RGB"
    assert json.loads((repo / "metrics/fid.json").read_text())["fid"] > 0


def test_one_changed_image_reruns_from_the_data_stage_and_nothing_else_reruns(own):
    repo, _, _ = own
    out = dvc(repo, "repro").stdout
    assert ran(out) == ["source"], out  # nothing changed: only the listing, always
    first = sorted((repo / FOLDER / "cat").iterdir())[0]
    with Image.open(first) as img:
        img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(first)
    out = dvc(repo, "repro").stdout
    assert ran(out) == ["source", "download", "export_real", "real_stats", "train", "sample",
                        "fid"], out
    out = dvc(repo, "repro").stdout
    assert ran(out) == ["source"], out


def test_an_archive_brought_in_by_dvc_import_url_at_64_pixels(own, tmp_path):
    """The folder zipped elsewhere and brought in as the docs say (`dvc import-url`, here from a
    local path), trained at 64 px (its 32 px images upscaled)."""
    repo, counts, _ = own
    archive = shutil.make_archive(str(tmp_path / "cifar_folder"), "zip", repo / "data",
                                  "cifar_folder")
    dvc(repo, "import-url", archive, f"{FOLDER}.zip")
    sh(repo, "git", "add", f"{FOLDER}.zip.dvc", "data/.gitignore")
    commit(repo, "my images as an archive")
    # data.md5 is the tests' CIFAR archive's: set to '' (checks nothing), as DVC tracks the zip
    out = dvc(repo, "exp", "run", "-S", f"data.source={FOLDER}.zip", "-S", "data.md5=''",
              "-S", "data.limit=0", "-S", "data.resolution=64",
              "-S", "model.attention_resolutions=[32]").stdout
    assert "Running stage 'download'" in out and "Running stage 'fid'" in out, out
    report = json.loads((repo / "reports/data.json").read_text())
    assert report["source"] == f"{FOLDER}.zip" and report["resolution"] == 64
    assert report["classes"] == sorted(counts) and report["splits"]["train"]["classes"] == counts
    for folder in ("data/real_png", "data/samples"):
        with Image.open(repo / folder / "0.png") as image:
            assert image.size == (64, 64), folder
    with Image.open(repo / "plots/sample_grid.png") as grid:
        assert grid.size[0] > 4 * 64
    assert json.loads((repo / "metrics/fid.json").read_text())["fid"] > 0

"""Links and non-regular files where the train and sample stages write (issue #30): nothing is
followed out of the repository (the file or folder a link points to is byte for byte as it was),
a staging or output folder that is a link is refused in one line, not emptied, and a FIFO where a
lock, a staging manifest, a checkpoint or an output is expected never makes a stage wait."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddpm import checkpoint, networks
from ddpm.diffusion import Schedule
from ddpm.errors import PipelineError
from ddpm.files import atomic_file, sweep_temporaries, write_json
from ddpm.generate import MANIFEST, generate_folder, sample_manifest, staging_folder
from ddpm.params import parse_params
from ddpm.runs import RunFolders
from ddpm.runtime import World
from ddpm.train import Trainer
from fakes import ROOT, train_paths

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)


@contextlib.contextmanager
def within(seconds: float):
    """Fail, instead of hanging, if the block takes longer than `seconds` (a FIFO being read)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(path: Path) -> dict:
    """Every name under `path` (or the file itself) with its bytes, or its kind."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "folder"
            for p in sorted(path.rglob("*"))}


def outside_folder(root: Path, name: str = "outside") -> Path:
    """A folder outside the 'repository', holding what a careless delete would take."""
    folder = root / name
    (folder / "keep").mkdir(parents=True)
    (folder / "keep" / "thesis.tex").write_text("years of work")
    (folder / "notes.txt").write_text("precious")
    (folder / "0.png").write_bytes(b"\x89PNG not ours")
    return folder


def one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


# -- training: the lock, the run folders, the published checkpoint ------------------------------

def trainer(tiny: dict, root: Path, data: Path, **train) -> Trainer:
    raw = copy.deepcopy(tiny)
    raw["train"].update(dict(epochs=1, sample_every=0), **train)
    return Trainer(parse_params(raw), train_paths(root, data), World(), CPU)


def test_the_lock_is_not_followed_through_a_link(tmp_path):
    """models/runs/<id>/lock -> a file outside: refused in one line; the file is untouched
    (open("a+") and truncate followed the link and left the trainer's pid in it)."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    folders = RunFolders(tmp_path / "repo" / "checkpoints", tmp_path / "repo" / "runs" / "abc")
    folders.work.mkdir(parents=True)
    (folders.work / "lock").symlink_to(outside)
    with pytest.raises(PipelineError) as info:
        folders.lock()
    one_line(info, f"{folders.work / 'lock'} is a link (to {outside})", "rm ")
    assert outside.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_lock_that_is_no_regular_file_is_refused_at_once(tmp_path, kind):
    folders = RunFolders(tmp_path / "checkpoints", tmp_path / "runs" / "abc")
    folders.work.mkdir(parents=True)
    lock = folders.work / "lock"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        import socket
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(lock))
    with within(10), pytest.raises(PipelineError) as info:
        folders.lock()
    one_line(info, f"{lock} is a {'FIFO' if kind == 'fifo' else 'socket'}, not a regular file")


@pytest.mark.parametrize("where", ["runs", "work", "previews", "checkpoints",
                                   "checkpoints/previews", "samples", "curves"])
def test_a_training_folder_that_is_a_link_is_refused_before_anything_is_written(
        tiny, dataset_dir, tmp_path, where):
    """A folder train writes in, empties or moves (models/runs, the run folder, its previews,
    models/checkpoints, plots/samples, plots/curves) as a link to a folder outside: one line
    naming it, and the folder outside is as it was."""
    repo = tmp_path / "repo"
    run = trainer(tiny, repo, dataset_dir)
    target = {"runs": run.folders.work.parent, "work": run.folders.work,
              "previews": run.folders.previews, "checkpoints": run.folders.published,
              "checkpoints/previews": run.folders.published / "previews",
              "samples": run.paths.samples, "curves": run.paths.curves}[where]
    outside = outside_folder(tmp_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(PipelineError) as info:
        run.run()
    one_line(info, f"{target} is a link (to {outside})")
    assert snapshot(outside) == before
    assert not (repo / "ema.pt").exists()


def test_a_published_checkpoint_that_is_a_link_is_read_but_never_written_through(
        tiny, dataset_dir, tmp_path, capsys):
    """models/checkpoints/last.pt -> a file outside (here not a checkpoint): named and not
    resumed; the finished run's checkpoint replaces the link, and the file outside is as it
    was."""
    repo = tmp_path / "repo"
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"someone else's file")
    (repo / "checkpoints").mkdir(parents=True)
    (repo / "checkpoints" / "last.pt").symlink_to(outside)
    trainer(tiny, repo, dataset_dir).run()
    assert "last.pt: not a readable checkpoint" in capsys.readouterr().err
    assert outside.read_bytes() == b"someone else's file"
    published = repo / "checkpoints" / "last.pt"
    assert not published.is_symlink() and checkpoint.load(published)["progress"]["epoch"] == 1


def test_a_fifo_where_a_checkpoint_is_is_passed_over_at_once(tiny, dataset_dir, tmp_path,
                                                             capsys):
    run = trainer(tiny, tmp_path, dataset_dir)
    run.folders.work.mkdir(parents=True)
    os.mkfifo(run.folders.work / "last.pt")
    (tmp_path / "checkpoints").mkdir()
    os.mkfifo(tmp_path / "checkpoints" / "last.pt")
    with within(60):
        run.run()
    err = capsys.readouterr().err
    assert f"{run.folders.work / 'last.pt'} is a FIFO, not a checkpoint file: not resumed" in err
    assert f"{tmp_path / 'checkpoints' / 'last.pt'} is a FIFO, not a checkpoint file" in err
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["progress"]["epoch"] == 1


def test_the_train_stage_meets_a_linked_lock_in_one_line(tiny, dataset_dir, tmp_path):
    """Through stages/train.py: exit code 1, one error line, no traceback, the file outside
    untouched."""
    repo = tmp_path / "repo"
    repo.mkdir()
    work = trainer(tiny, repo, dataset_dir).folders.work  # the run's id, as the stage computes it
    work.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (work / "lock").symlink_to(outside)
    raw = copy.deepcopy(tiny)
    raw["train"].update(epochs=1, sample_every=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    args = [f"--{key.replace('_', '-')}={value}"
            for key, value in vars(train_paths(repo, dataset_dir)).items()]
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), *args], cwd=repo,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: {work / 'lock'} is a link (to {outside}): outputs are not written through "
        f"links. Remove the link (rm {work / 'lock'}) and run again")
    assert outside.read_text() == "precious\n"


# -- sampling: the staging folder and data/samples ----------------------------------------------

@pytest.fixture
def sampling(tiny, tmp_path):
    """Tiny params, an EMA file, its network and schedule, and the manifest of a run."""
    params = parse_params(dict(tiny, model=dict(tiny["model"], arch="seed")))
    torch.manual_seed(0)
    model = networks.build(params.model, SHAPE).eval()
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    checkpoint.save({"ema": model.state_dict(), "config": params.to_dict()},
                    repo / "models" / "ema.pt")
    sched = Schedule(**params.to_dict()["diffusion"])
    wanted = sample_manifest(repo / "models" / "ema.pt", params, "fp32", CPU, World())
    return params, repo, model, sched, wanted


def draw(sampling, out: Path) -> int:
    params, _, model, sched, wanted = sampling
    return generate_folder(model, sched, SHAPE, params, "fp32", out, World(), wanted)


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "without-manifest"])
def test_a_staging_folder_that_is_a_link_is_refused_not_emptied(sampling, tmp_path, manifest):
    """data/.samples.partial -> a folder outside holding (or not) the run's manifest: one line;
    the folder outside keeps its files and subfolders, gets no PNG, and data/samples does not
    become the link."""
    _, repo, _, _, wanted = sampling
    outside = outside_folder(tmp_path)
    if manifest:
        (outside / MANIFEST).write_text(json.dumps(wanted))
    out = repo / "data" / "samples"
    out.parent.mkdir()
    staging_folder(out).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(PipelineError) as info:
        draw(sampling, out)
    one_line(info, f"{staging_folder(out)} is a link (to {outside})")
    assert snapshot(outside) == before
    assert not out.exists() and not out.is_symlink()


def test_an_output_folder_that_is_a_link_is_refused(sampling, tmp_path):
    _, repo, _, _, _ = sampling
    outside = outside_folder(tmp_path)
    out = repo / "data" / "samples"
    out.parent.mkdir()
    out.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(PipelineError) as info:
        draw(sampling, out)
    one_line(info, f"{out} is a link (to {outside})")
    assert snapshot(outside) == before
    assert not staging_folder(out).exists()


@pytest.mark.parametrize("where", ["out", "staging"])
def test_a_fifo_where_a_sample_folder_is_is_refused_at_once(sampling, where):
    _, repo, _, _, _ = sampling
    out = repo / "data" / "samples"
    out.parent.mkdir()
    fifo = out if where == "out" else staging_folder(out)
    os.mkfifo(fifo)
    with within(10), pytest.raises(PipelineError) as info:
        draw(sampling, out)
    one_line(info, f"{fifo} is a FIFO, not a folder")


def test_a_fifo_or_a_link_as_the_manifest_is_no_manifest(sampling, tmp_path, capsys):
    """A FIFO where the staging manifest is is not waited on, and a link to the right manifest
    outside is not followed: the images there are discarded, all are drawn, and the files the
    staging folder linked to are untouched."""
    _, repo, _, _, wanted = sampling
    out = repo / "data" / "samples"
    staging = staging_folder(out)
    outside = outside_folder(tmp_path)
    (outside / MANIFEST).write_text(json.dumps(wanted))
    before = snapshot(outside)
    for manifest in ("fifo", "link"):
        staging.mkdir(parents=True)
        (staging / "0.png").symlink_to(outside / "0.png")
        (staging / "sub").symlink_to(outside / "keep", target_is_directory=True)
        if manifest == "fifo":
            os.mkfifo(staging / MANIFEST)
        else:
            (staging / MANIFEST).symlink_to(outside / MANIFEST)
        with within(120):
            assert draw(sampling, out) == 0
        assert "no readable record of the weights and params" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == sorted(
            f"{i}.png" for i in range(sampling[0].sample.num_images))
        assert not any(p.is_symlink() for p in out.iterdir())
        assert snapshot(outside) == before


def test_kept_images_are_regular_files_only(sampling, tmp_path, capsys):
    """With the right manifest, a PNG that is a link (to a PNG outside) or a FIFO is removed, not
    read or kept; a linked folder is removed as a link: what it points to stays."""
    params, repo, _, _, wanted = sampling
    out = repo / "data" / "samples"
    staging = staging_folder(out)
    staging.mkdir(parents=True)
    write_json(staging / MANIFEST, wanted)
    outside = outside_folder(tmp_path)
    (staging / "0.png").symlink_to(outside / "0.png")
    os.mkfifo(staging / "1.png")
    (staging / "keep").symlink_to(outside / "keep", target_is_directory=True)
    before = snapshot(outside)
    with within(120):
        assert draw(sampling, out) == 0
    assert len(list(out.iterdir())) == params.sample.num_images
    assert snapshot(outside) == before


def test_the_sample_stage_refuses_a_linked_output_in_one_line(sampling, tiny, tmp_path):
    params, repo, _, _, _ = sampling
    outside = outside_folder(tmp_path)
    before = snapshot(outside)
    (repo / "data").mkdir()
    (repo / "data" / "samples").symlink_to(outside, target_is_directory=True)
    raw = dict(tiny, model=dict(tiny["model"], arch="seed"))
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "sample.py"), "--ema", "models/ema.pt",
         "--out", "data/samples", "--metrics", "metrics/sample.json", "--report",
         "reports/sample.json", "--grid", "plots/grid.png"],
        cwd=repo, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: data/samples is a link (to {outside}): outputs are not written through links. "
        "Remove the link (rm data/samples) and run again")
    assert snapshot(outside) == before


# -- files.py: temporaries, atomic writes, sweeps ----------------------------------------------

def test_an_output_whose_folder_is_a_link_is_not_written(tmp_path):
    outside = outside_folder(tmp_path)
    before = snapshot(outside)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "metrics").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PipelineError) as info:
        write_json(tmp_path / "repo" / "metrics" / "notes.txt", {"loss": 1})
    one_line(info, "metrics is a link")
    assert snapshot(outside) == before


def test_an_output_that_is_a_link_is_replaced_not_written_through(tmp_path):
    """The link itself is replaced; the second name kept of it (previous.pt) is the link, not a
    hard link to the file outside."""
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"precious")
    (tmp_path / "repo").mkdir()
    dest = tmp_path / "repo" / "last.pt"
    dest.symlink_to(outside)
    with atomic_file(dest, keep=tmp_path / "repo" / "previous.pt") as tmp:
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new" and not dest.is_symlink()
    assert (tmp_path / "repo" / "previous.pt").is_symlink()
    assert outside.read_bytes() == b"precious" and outside.stat().st_nlink == 1


def test_sweeping_temporaries_follows_no_link(tmp_path):
    """A swept folder that is a link is not swept; a stale temporary that is a link to a folder
    is removed as a link."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    outside = outside_folder(tmp_path)
    (outside / f".ema.pt.{dead}.x1.tmp").write_bytes(b"not ours")
    before = snapshot(outside)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "plots").symlink_to(outside, target_is_directory=True)
    stale = repo / f".real_png.{dead}.x2.tmp"
    stale.symlink_to(outside / "keep", target_is_directory=True)
    assert sweep_temporaries(repo / "plots", repo) == [stale]
    assert not stale.is_symlink() and snapshot(outside) == before

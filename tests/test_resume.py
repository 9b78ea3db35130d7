"""Which checkpoint a run resumes (ddpm.runs.RunFolders.resumable): none beyond train.epochs, the
most advanced of those that match, and the published run's preview grids with its checkpoint."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from fakes import train_paths

from ddpm import checkpoint
from ddpm.params import parse_params
from ddpm.runtime import World
from ddpm.train import Trainer

CPU = torch.device("cpu")
TRAIN = dict(sample_every=1, checkpoint_every=1)


def trainer(tiny: dict, root: Path, cifar: Path, epochs: int) -> Trainer:
    raw = copy.deepcopy(tiny)
    raw["train"].update(TRAIN, epochs=epochs)
    return Trainer(parse_params(raw), train_paths(root, cifar), World(), CPU)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny, dataset_dir) -> tuple[Path, Path]:
    """(root, snapshot): root holds a finished run of 2 epochs, trained as 1 epoch then resumed
    to 2; snapshot, a copy of its published folder (last.pt, previews/) after the first."""
    root = tmp_path_factory.mktemp("finished")
    trainer(tiny, root, dataset_dir, 1).run()
    snapshot = root.parent / "epoch1"
    shutil.copytree(root / "checkpoints", snapshot)
    trainer(tiny, root, dataset_dir, 2).run()
    return root, snapshot


def copy_of(finished, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(finished[0], root)
    return root


def ema_weights(path: Path) -> dict:
    return checkpoint.load(path)["ema"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_beyond_train_epochs_is_not_resumed_and_says_so(finished, tiny, dataset_dir,
                                                                   tmp_path, capsys):
    """The published checkpoint is at epoch 2; with train.epochs 1 the run starts fresh, says
    why, and ends with the weights of the fresh 1-epoch run (the snapshot), bitwise."""
    root = copy_of(finished, tmp_path)
    assert checkpoint.load(root / "checkpoints/last.pt")["progress"]["epoch"] == 2
    capsys.readouterr()
    again = trainer(tiny, root, dataset_dir, 1)
    again.run()
    err = capsys.readouterr().err
    assert (f"train: {root}/checkpoints/last.pt is at epoch 2, beyond train.epochs; starting "
            "fresh; ") in err
    assert again.state.progress.step == again.steps_per_epoch
    assert_same(again.state.ema.state_dict(), ema_weights(finished[1] / "last.pt"))
    assert checkpoint.load(root / "checkpoints/last.pt")["progress"]["epoch"] == 1


@pytest.mark.parametrize("newer", ["published", "work"])
def test_the_more_advanced_of_two_matching_checkpoints_is_resumed(finished, tiny, dataset_dir,
                                                                  tmp_path, newer):
    """The run's own last.pt (models/runs/<id>) and the published one of the same config, one at
    epoch 1 and the other at epoch 2, in either place: the run resumes the epoch-2 one, whichever
    is found first, with its weights."""
    root = copy_of(finished, tmp_path)
    t = trainer(tiny, root, dataset_dir, 3)
    published, work = root / "checkpoints/last.pt", t.folders.work / "last.pt"
    work.parent.mkdir(parents=True)
    epoch2 = checkpoint.load(published)
    if newer == "published":
        shutil.copyfile(finished[1] / "last.pt", work)
    else:
        shutil.copyfile(published, work)
        shutil.copyfile(finished[1] / "last.pt", published)
    chosen = published if newer == "published" else work
    assert t.resume() == f"resuming from {chosen} at epoch 2"
    assert t.state.progress.epoch == 2 and t.state.progress.step == 2 * t.steps_per_epoch
    assert_same(t.state.model.state_dict(), epoch2["model"])
    assert_same(t.state.ema.state_dict(), epoch2["ema"])


def test_resuming_the_published_checkpoint_adopts_its_preview_grids(finished, tiny, dataset_dir,
                                                                    tmp_path):
    """2 epochs published with their grids, then train.epochs 3: the run resumes the published
    checkpoint, takes its grids as its own, and publishes the grids of all 3 epochs, those of
    epochs 1 and 2 byte for byte the earlier ones."""
    root = copy_of(finished, tmp_path)
    previews = root / "checkpoints/previews"
    before = {p.name: p.read_bytes() for p in previews.iterdir()}
    assert sorted(before) == ["epoch_0001.png", "epoch_0002.png"]
    t = trainer(tiny, root, dataset_dir, 3)
    assert t.resume() == f"resuming from {root}/checkpoints/last.pt at epoch 2"
    assert {p.name: p.read_bytes() for p in t.folders.previews.iterdir()} == before
    trainer(tiny, root, dataset_dir, 3).run()
    after = {p.name: p.read_bytes() for p in previews.iterdir()}
    assert sorted(after) == ["epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    assert {name: after[name] for name in before} == before
    assert sorted(p.name for p in (root / "samples").iterdir()) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png", "progression.png"]

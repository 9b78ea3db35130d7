"""Training checkpoints that load but are not a state of the run (issue #30): each is refused
before anything is trained from it, in one line naming the file and why; the run falls back to
previous.pt, naming it, or starts fresh. Nothing is trained from a bad checkpoint, and
models/ema.pt is never written from one."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ddpm import checkpoint
from ddpm.params import parse_params
from ddpm.runtime import World
from ddpm.train import Trainer
from fakes import train_paths

CPU = torch.device("cpu")
EPOCHS = 3


def make(tiny: dict, root: Path, data: Path, **train) -> Trainer:
    raw = copy.deepcopy(tiny)
    raw["train"].update(dict(epochs=EPOCHS, sample_every=0), **train)
    return Trainer(parse_params(raw), train_paths(root, data), World(), CPU)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tiny, dataset_dir, tmp_path_factory):
    """An uninterrupted run of 3 epochs, and a run stopped in epoch 3: its folder holds last.pt
    (epoch 2) and previous.pt (epoch 1)."""
    root = tmp_path_factory.mktemp("hostile_checkpoints")
    straight = make(tiny, root / "straight", dataset_dir)
    straight.run()

    stopped = make(tiny, root / "stopped", dataset_dir)
    real_epoch = stopped.epoch

    def epoch(index, bar):
        if index == 2:
            raise KeyboardInterrupt
        return real_epoch(index, bar)

    stopped.epoch = epoch
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    work, = (root / "stopped" / "runs").iterdir()
    assert checkpoint.load(work / "last.pt")["progress"]["epoch"] == 2
    assert checkpoint.load(work / "previous.pt")["progress"]["epoch"] == 1
    return root, straight, work


def first_weight(state: dict, part: str) -> str:
    return next(name for name, t in state[part].items() if t.is_floating_point() and t.dim())


def no_step(state):
    del state["progress"]["step"]
    return "its progress lacks step"


def epoch_minus_5(state):
    state["progress"]["epoch"] = -5
    return "its progress.epoch is -5, not a count of epochs (0 or more)"


def epoch_beyond(state):
    state["progress"].update(epoch=99, step=99 * 3)
    return "is at epoch 99, beyond train.epochs"


def step_not_of_epoch(state):
    state["progress"]["step"] = 5
    return "its progress.step 5 is not its epoch 2 x 3 steps per epoch"


def nan_model(state):
    name = first_weight(state, "model")
    state["model"][name].view(-1)[0] = math.nan
    return f"its model weights hold NaN or infinite values ({name})"


def inf_ema(state):
    name = first_weight(state, "ema")
    state["ema"][name].view(-1)[-1] = math.inf
    return f"its ema weights hold NaN or infinite values ({name})"


def no_optimizer(state):
    del state["optimizer"]
    return "no optimizer state in it"


def wrong_size(state):
    name = first_weight(state, "model")
    shape = tuple(state["model"][name].shape)
    state["model"][name] = torch.zeros(shape[0] + 1, *shape[1:])
    return f"its model weights do not fit this network: {name} is ({shape[0] + 1}, "


def missing_tensor(state):
    name = first_weight(state, "ema")
    del state["ema"][name]
    return f"its ema weights lack {name}"


def wrong_moment(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(7)
    return "its optimizer state does not fit this network: parameter 0's exp_avg is (7,)"


def nan_moment(state):
    state["optimizer"]["state"][1]["exp_avg_sq"].view(-1)[0] = math.nan
    return "its optimizer state holds NaN or infinite values (parameter 1's exp_avg_sq)"


def string_epoch(state):
    state["progress"]["epoch"] = "2"
    return "its progress.epoch is 2, not a count of epochs"


def fid_row_of_five(state):
    state["progress"]["fid_rows"] = [[1, 3, 300.0, 5.0, 0.1]]  # neither before KID (4) nor now (6)
    return "its progress.fid_rows is not a list of rows of 4 or 6 numbers"


BAD = [no_step, epoch_minus_5, epoch_beyond, step_not_of_epoch, nan_model, inf_ema, no_optimizer,
       wrong_size, missing_tensor, wrong_moment, nan_moment, string_epoch, fid_row_of_five]


@pytest.mark.parametrize("spoil", BAD, ids=lambda f: f.__name__)
def test_a_bad_last_checkpoint_falls_back_to_the_one_before_and_says_why(
        runs, tiny, dataset_dir, tmp_path, capsys, spoil):
    """last.pt with the run's config but a body that is not the run's: the log names it and
    why it was refused, then previous.pt, which the run resumes from at epoch 1; the run ends
    bitwise where the uninterrupted one did (nothing was trained from the bad file)."""
    root, straight, work = runs
    mine = tmp_path / "runs" / work.name
    shutil.copytree(work, mine)
    state = checkpoint.load(mine / "last.pt")
    why = spoil(state)
    torch.save(state, mine / "last.pt")
    capsys.readouterr()
    trainer = make(tiny, tmp_path, dataset_dir)
    trainer.run()
    err = capsys.readouterr().err
    line, = [line for line in err.splitlines() if "resuming from" in line]
    refused = f"{mine / 'last.pt'}"
    used = f"resuming from {mine / 'previous.pt'} at epoch 1;"
    assert refused in line and why in line and used in line, line
    assert line.index(refused) < line.index(why) < line.index(used), line
    assert "Traceback" not in err
    assert trainer.state.progress.epoch == EPOCHS
    assert trainer.state.progress.step == EPOCHS * trainer.steps_per_epoch
    assert same_weights(straight.state.ema.state_dict(), trainer.state.ema.state_dict())
    assert same_weights(checkpoint.load(root / "straight" / "ema.pt")["ema"],
                        checkpoint.load(tmp_path / "ema.pt")["ema"])


@pytest.mark.parametrize("spoil", [no_step, nan_model, no_optimizer, wrong_size],
                         ids=lambda f: f.__name__)
def test_a_bad_published_checkpoint_of_a_finished_run_is_not_resumed_nor_published(
        runs, tiny, dataset_dir, tmp_path, capsys, spoil):
    """A finished run's models/checkpoints/last.pt, spoiled: the rerun does not call it a run of
    0 steps and loss nan, nor rewrite models/ema.pt from it: it says why, trains afresh, and
    models/ema.pt is the uninterrupted run's."""
    root, straight, _ = runs
    (tmp_path / "checkpoints").mkdir()
    state = checkpoint.load(root / "straight" / "checkpoints" / "last.pt")
    why = spoil(state)
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    capsys.readouterr()
    trainer = make(tiny, tmp_path, dataset_dir)
    trainer.run()
    err = capsys.readouterr().err
    assert f"train: {tmp_path / 'checkpoints' / 'last.pt'}: {why}" in err
    assert "not resumed; starting fresh;" in err
    assert "0 steps, loss nan" not in err
    assert json.loads((tmp_path / "train_report.json").read_text())["steps"] == \
        EPOCHS * trainer.steps_per_epoch
    ema = checkpoint.load(tmp_path / "ema.pt")["ema"]
    assert not checkpoint.non_finite(ema)
    assert same_weights(checkpoint.load(root / "straight" / "ema.pt")["ema"], ema)


def test_a_non_finite_checkpoint_is_never_resumed_nor_called_good(runs, tiny, dataset_dir,
                                                                  tmp_path, capsys):
    """Both of the run's checkpoints NaN: neither is resumed; the run starts fresh, and a later
    stop names no NaN file as 'the last good checkpoint'."""
    _, straight, work = runs
    mine = tmp_path / "runs" / work.name
    shutil.copytree(work, mine)
    for name in ("last.pt", "previous.pt"):
        state = checkpoint.load(mine / name)
        nan_model(state)
        torch.save(state, mine / name)
    capsys.readouterr()
    trainer = make(tiny, tmp_path, dataset_dir)
    trainer.run()
    err = capsys.readouterr().err
    assert f"{mine / 'last.pt'}: its model weights hold NaN" in err
    assert f"{mine / 'previous.pt'}: its model weights hold NaN" in err
    assert "starting fresh" in err
    assert same_weights(straight.state.ema.state_dict(), trainer.state.ema.state_dict())


def test_load_state_dict_refuses_before_loading_anything(runs, tiny, dataset_dir, tmp_path):
    """TrainState.load_state_dict itself checks: a bad state is a ValueError saying why, and the
    state it was called on is unchanged."""
    _, _, work = runs
    trainer = make(tiny, tmp_path, dataset_dir)
    before = copy.deepcopy(trainer.state.model.state_dict())
    state = checkpoint.load(work / "last.pt")
    wrong_moment(state)
    with pytest.raises(ValueError, match="not a training state of this run: its optimizer"):
        trainer.state.load_state_dict(state, trainer.steps_per_epoch)
    assert same_weights(before, trainer.state.model.state_dict())
    good = checkpoint.load(work / "last.pt")
    assert trainer.state.refusal(good, trainer.steps_per_epoch) is None

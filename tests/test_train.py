"""The training loop: EMA, checkpoints, exact resume, failure handling, data parallelism."""
from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from ddpm import batches, checkpoint, evaluate, losses, train
from ddpm.errors import PipelineError
from ddpm.ema import EMA
from ddpm.params import parse_params
from ddpm.runtime import World, resolve_precision
from ddpm.train import Trainer
from fakes import make_cifar_archive, prepare_dataset, record_draws, train_paths

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def make(tiny: dict, root: Path, cifar: Path, arch: str = "seed", dtype=torch.float32,
         dropout: float | None = None, **train_overrides) -> Trainer:
    raw = copy.deepcopy(tiny)
    raw["model"]["arch"] = arch
    if dropout is not None:
        raw["model"]["dropout"] = dropout
    raw["train"].update(train_overrides)
    return Trainer(parse_params(raw), train_paths(root, cifar), World(), torch.device("cpu"),
                   dtype=dtype)


def run(*args, **kwargs) -> Trainer:
    trainer = make(*args, **kwargs)
    trainer.run()
    return trainer


def interrupted(*args, **kwargs) -> str:
    """Run until the KeyboardInterrupt that a test arranged; the line the stage then prints."""
    trainer = make(*args, **kwargs)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return f"train: interrupted{trainer.where()}"


def ctrl_c_in_epoch(monkeypatch, number: int) -> None:
    """Trainer.epoch raises KeyboardInterrupt as epoch `number` (1-based) starts; the epochs
    before it run as usual. monkeypatch.undo() restores it."""
    real_epoch = Trainer.epoch

    def epoch(self, index, bar):
        if index == number - 1:
            raise KeyboardInterrupt
        return real_epoch(self, index, bar)

    monkeypatch.setattr(Trainer, "epoch", epoch)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ema_is_the_closed_form_average():
    """After n updates towards fixed weights w, ema = w + decay^n (ema0 - w)."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema.update(model)
    for e, p, s in zip(ema.model.parameters(), model.parameters(), start):
        torch.testing.assert_close(e, p + 0.9**5 * (s - p))
        assert not e.requires_grad


def test_ema_warmup_ramps_the_decay_from_0_1_to_the_configured_decay():
    """With warmup, update k (k steps before it) uses min(decay, (1 + k) / (10 + k)): after n
    updates towards fixed weights w, ema - w = prod_k decay_k (ema0 - w)."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=True)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    decays = [min(0.9, (1 + k) / (10 + k)) for k in range(100)]
    assert decays[0] == 0.1 and decays[-1] == 0.9 and decays[50] == pytest.approx(51 / 60)
    for k in range(100):
        ema.update(model, step=k)
    remaining = math.prod(decays)
    for e, p, s in zip(ema.model.parameters(), model.parameters(), start):
        torch.testing.assert_close(e, p + remaining * (s - p))


@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny, dataset_dir, tmp_path, arch):
    """Stopping after epoch 1 and resuming gives the same weights, EMA and loss log as no stop."""
    straight = run(tiny, tmp_path / "a", dataset_dir, arch, epochs=3, sample_every=0)
    run(tiny, tmp_path / "b", dataset_dir, arch, epochs=1, sample_every=0)
    resumed = run(tiny, tmp_path / "b", dataset_dir, arch, epochs=3, sample_every=0)
    assert (resumed.state.progress.step == straight.state.progress.step
            == 3 * straight.steps_per_epoch)
    assert_same_weights(straight.state.model.state_dict(), resumed.state.model.state_dict())
    assert_same_weights(checkpoint.load(tmp_path / "a" / "ema.pt")["ema"],
                        checkpoint.load(tmp_path / "b" / "ema.pt")["ema"])
    def losses(folder):  # step and loss columns (the third, images/s, is a timing)
        return [row.split("\t")[:2] for row in (folder / "loss.tsv").read_text().splitlines()]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_an_interrupted_run_resumes_from_its_own_folder_whatever_dvc_put_back(
        tiny, dataset_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 ends in one line; then models/checkpoints is replaced by
    another run's published checkpoint (what `dvc exp run` restores from dvc.lock). The run
    resumes from models/runs/<id> at epoch 1 and ends bitwise where an uninterrupted run does;
    its folder then moves into models/checkpoints."""
    straight = run(tiny, tmp_path / "a", dataset_dir, epochs=3, sample_every=1)
    other = run(tiny, tmp_path / "b", dataset_dir, epochs=1, sample_every=1, lr=1e-3)
    ctrl_c_in_epoch(monkeypatch, 2)
    message = interrupted(tiny, tmp_path / "b", dataset_dir, epochs=3, sample_every=1)
    assert "\n" not in message and message.startswith("train: interrupted in epoch 2 of 3;")
    assert "(epoch 1), is kept" in message and "Run the same command again" in message
    monkeypatch.undo()
    assert other.state.progress.epoch == 1  # its checkpoint is the published one, another config
    capsys.readouterr()
    resumed = run(tiny, tmp_path / "b", dataset_dir, epochs=3, sample_every=1)
    assert "/runs/" in capsys.readouterr().err.split("resuming from ")[1].split(" at epoch 1")[0]
    assert_same_weights(straight.state.ema.state_dict(), resumed.state.ema.state_dict())
    assert not list((tmp_path / "b" / "runs").iterdir())  # finished: moved, not copied
    published = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert published["progress"]["epoch"] == 3
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "previews").iterdir()) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]


def test_unfinished_runs_of_other_configs_are_named_with_their_size(tiny, dataset_dir, tmp_path,
                                                                    capsys, monkeypatch):
    """Another config's folder in models/runs (its checkpoint, and 3 MiB more here) is named
    with the bytes of all its files, in MiB, when a run of this config starts."""
    def checkpoint_then_ctrl_c(self):
        self.save_checkpoint()
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "end_of_epoch", checkpoint_then_ctrl_c)
    interrupted(tiny, tmp_path, dataset_dir, epochs=2, sample_every=0, lr=1e-3)
    monkeypatch.undo()
    other, = (tmp_path / "runs").iterdir()
    (other / "previews").mkdir()
    (other / "previews" / "epoch_0001.png").write_bytes(b"\0" * 3 * 2**20)
    size = sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(other) for name in names)
    assert size > 3.5 * 2**20  # the checkpoint counts too
    capsys.readouterr()
    run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0)
    err = capsys.readouterr().err
    assert (f"train: {other} holds an unfinished run of another config ({size / 2**20:.0f} MiB; "
            "resumed if that config runs again, else rm -r it)\n") in err


def test_a_changed_config_starts_fresh_and_says_why(tiny, dataset_dir, tmp_path, capsys):
    """lr 1e-3 after a finished run of lr 2e-4: the checkpoint is named as another run's and the
    run ends bitwise where a run of lr 1e-3 in an empty folder ends."""
    fresh = run(tiny, tmp_path / "fresh", dataset_dir, epochs=1, sample_every=0, lr=1e-3)
    run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0)
    capsys.readouterr()
    again = run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0, lr=1e-3)
    err = capsys.readouterr().err
    assert (f"train: {tmp_path}/checkpoints/last.pt is from another run (train.lr differ); "
            "starting fresh;") in err
    assert again.state.progress.step == again.steps_per_epoch
    assert_same_weights(fresh.state.ema.state_dict(), again.state.ema.state_dict())


@pytest.mark.parametrize("step, expected", [(0, 0.0), (50, 1e-4), (100, 2e-4), (5000, 2e-4)])
def test_warmup_ramps_the_learning_rate_linearly(step, expected):
    """Ho et al.'s code: lr * min(step / warmup, 1), step = optimizer steps already taken."""
    assert train.learning_rate(2e-4, 100, step) == pytest.approx(expected, abs=1e-15)
    assert train.learning_rate(2e-4, 0, step) == 2e-4  # 0 = no warmup, the seed's


def test_the_trainer_steps_adam_with_the_warmup_learning_rate(tiny, dataset_dir, tmp_path,
                                                             monkeypatch):
    """Three steps into a warmup of 4: Adam steps at lr x 0, 1/4, 2/4; and a checkpoint of
    another warmup is another run (the learning rates differ)."""
    used = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    trainer = run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0, warmup_steps=4)
    lr = tiny["train"]["lr"]
    assert trainer.steps_per_epoch == 3 and used == pytest.approx([0.0, lr / 4, lr / 2])
    again = Trainer(parse_params(dict(tiny, train=dict(tiny["train"], warmup_steps=8))),
                    train_paths(tmp_path, dataset_dir), World(), torch.device("cpu"))
    assert "train.warmup_steps differ" in again.resume()


def test_more_epochs_resume_a_finished_run(tiny, dataset_dir, tmp_path, capsys):
    """train.epochs is not part of the config a checkpoint must match: 1 -> 2 epochs continues.
    The bar counts the whole stage's images, resumed ones included (48 of 96, then 96 of 96,
    with its rate: img/s, or s/img below one image per second), and the epochs out of
    train.epochs."""
    run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0)
    capsys.readouterr()
    run(tiny, tmp_path, dataset_dir, epochs=2, sample_every=0)
    err = capsys.readouterr().err
    assert "resuming" in err
    assert "48/96 [" in err and "epoch=2/2" in err
    assert re.search(r"96/96 \[[^]]*(img/s|s/img)", err)


def test_the_hardware_keys_are_not_part_of_the_run(tiny, dataset_dir, tmp_path):
    """train.gpus, batch_gpu and compile leave the resume config and the run folder's id alone."""
    configs = []
    for overrides in ({}, dict(gpus=2, batch_gpu=4, compile=True)):
        raw = copy.deepcopy(tiny)
        raw["train"].update(overrides)
        trainer = Trainer(parse_params(raw), train_paths(tmp_path, dataset_dir), World(),
                          torch.device("cpu"))
        configs.append((trainer.config, trainer.folders.work))
    assert configs[0] == configs[1]
    assert not {"gpus", "batch_gpu", "compile"} & configs[0][0]["train"].keys()
    assert "world_size" not in configs[0][0]


def test_a_corrupt_checkpoint_is_named_and_training_starts_fresh(tiny, dataset_dir, tmp_path,
                                                                capsys):
    """Garbage as the published last.pt: named, not resumed, and the run is a fresh one (bitwise
    the run of an empty folder)."""
    fresh = run(tiny, tmp_path / "fresh", dataset_dir, epochs=1, sample_every=0)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    trainer = run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0)
    assert (f"train: {tmp_path}/checkpoints/last.pt: not a readable checkpoint (" in
            capsys.readouterr().err)
    assert trainer.state.progress.step == trainer.steps_per_epoch
    assert_same_weights(fresh.state.ema.state_dict(), trainer.state.ema.state_dict())


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, dataset_dir, tmp_path,
                                                                    monkeypatch):
    real_loss, calls = losses.Loss.__call__, []

    def loss_that_diverges(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return value * float("nan") if len(calls) > 2 * 3 * 2 else value  # in epoch 3

    monkeypatch.setattr(losses.Loss, "__call__", loss_that_diverges)
    with pytest.raises(PipelineError, match="non-finite|nan"):
        run(tiny, tmp_path, dataset_dir, epochs=4, sample_every=0)
    unfinished, = (tmp_path / "runs").glob("*/last.pt")  # kept where the next run resumes it
    state = checkpoint.load(unfinished)
    assert state["progress"]["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "ema.pt").exists()


def test_outputs_hold_the_metrics_report_loss_log_and_previews(tiny, dataset_dir, tmp_path):
    """metrics/train.json holds what experiments compare; reports/train.json what the run was."""
    trainer = run(tiny, tmp_path, dataset_dir, epochs=2, sample_every=1)
    import json
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics.keys() == {"loss", "epochs", "seconds", "images_per_second", "peak_memory_mb"}
    assert metrics["epochs"] == 2 and metrics["peak_memory_mb"] > 0
    images, seconds = 2 * trainer.steps_per_epoch * 16, metrics["seconds"]  # to the ms
    assert images / (seconds + 5e-4) - 1e-3 <= metrics["images_per_second"] <= (
        images / (seconds - 5e-4) + 1e-3)
    report = json.loads((tmp_path / "train_report.json").read_text())
    parameters = sum(p.numel() for p in trainer.state.model.parameters())
    assert report == {"arch": "seed", "objective": "eps-prediction MSE", "parameters": parameters,
                      "steps": 2 * trainer.steps_per_epoch,
                      "batch_size": 16, "batch_gpu": 8, "rounds": 2, "processes": 1,
                      "precision": resolve_precision(tiny["train"]["precision"], CPU),
                      "device": "cpu", "device_name": report["device_name"],
                      "compile": "eager",
                      "fid_seconds": 0}
    rows = (tmp_path / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss\timages_per_second"
    assert [int(r.split("\t")[0]) for r in rows[1:]] == list(range(1, report["steps"] + 1))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "epoch_0001.png", "epoch_0002.png", "progression.png"]
    ema = checkpoint.load(tmp_path / "ema.pt")
    assert ema["config"]["model"]["channels"] == [16, 32, 32] and ema["epochs"] == 2


def test_every_checkpoint_of_a_run_is_on_the_disk_before_its_name(tiny, dataset_dir, tmp_path,
                                                                   monkeypatch):
    """Through the trainer (issue 29: removing the fsyncs failed no test): each rename onto a
    checkpoint's name (last.pt each epoch, models/ema.pt, and last.pt published into
    models/checkpoints as the run finishes) moves data already fsynced, and its folder is fsynced
    after it, so a power loss leaves the old file or the new one under every name."""
    calls: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run(tiny, tmp_path, dataset_dir, epochs=2, sample_every=0)
    monkeypatch.undo()
    renames = [(i, call[1], call[2]) for i, call in enumerate(calls)
               if call[0] == "replace" and call[2].endswith(".pt")]
    on_disk = set()  # the names whose data is on the disk
    for i, src, dst in renames:
        assert ("fsync", src) in calls[:i] or src in on_disk, (src, dst, calls[:i])
        assert ("fsync", str(Path(dst).parent)) in calls[i + 1:], (dst, calls[i + 1:])
        on_disk.add(dst)
    work, = {Path(dst).parent for _, _, dst in renames} - {tmp_path, tmp_path / "checkpoints"}
    assert work.parent == tmp_path / "runs" and not work.exists()
    assert on_disk == {str(work / "last.pt"), str(tmp_path / "ema.pt"),
                       str(tmp_path / "checkpoints" / "last.pt")}


def test_too_few_images_for_one_step_is_a_clear_error(tiny, dataset_dir, tmp_path):
    """check_params refuses a data.limit below the batch; a data set that is itself smaller than
    one batch (10 images for 16) stops the trainer with the keys to change."""
    raw = copy.deepcopy(tiny)
    raw["data"]["limit"] = 0
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(PipelineError, match="10 training images cannot fill one optimizer step of "
                                            "16 images .* add images, raise data.limit or lower "
                                            "train.batch_size"):
        Trainer(parse_params(raw), train_paths(tmp_path, dataset_dir), World(), torch.device("cpu"),
                images=images)


def test_two_processes_end_with_identical_weights(tiny, dataset_dir, tmp_path):
    """Data-parallel training (torchrun, gloo): every rank holds the same model and EMA."""
    import yaml
    raw = copy.deepcopy(tiny)
    raw["train"].update(gpus=2, batch_size=16, batch_gpu=4, sample_every=0)  # 2 x 2 x 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", str(ROOT / "tests" / "ddp_worker.py"),
                    str(tmp_path / "params.yaml"), str(dataset_dir), str(tmp_path)],
                   check=True, env=env, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0["model"], rank1["model"])
    assert_same_weights(rank0["ema"], rank1["ema"])
    assert rank0["steps"] == 2 * (48 // 16)
    start = torch.load(tmp_path / "rank0.pt", weights_only=True)["init"]
    assert any(not torch.equal(start[k], rank0["model"][k]) for k in start)  # it did train


def test_out_of_memory_says_which_params_to_change(tiny, dataset_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "step", out_of_memory)
    trainer = make(tiny, tmp_path, dataset_dir, epochs=1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        trainer.run()
    sys.path.insert(0, str(ROOT / "stages"))
    from train import out_of_memory as advice  # the stage's message
    message = advice(trainer.micro, trainer.params.train)
    assert "with 8 images per forward pass (train.batch_gpu = 8)" in message
    assert "train.batch_size = 16 alone defines it" in message
    assert message.endswith("dvc exp run -S train.batch_gpu=4")


# -- the batch: EDM's semantics -------------------------------------------------------------

BATCH = 128  # one optimizer step of 128 images, as in the seed (32 x 4)


@pytest.fixture(scope="module")
def cifar_128(tmp_path_factory) -> Path:
    """The dataset of a fake CIFAR-10 with 130 training images: one step of 128."""
    archive = tmp_path_factory.mktemp("cifar128") / "cifar-10-python.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=26)
    return prepare_dataset(archive, md5, archive.parent / "dataset")


def one_step_params(tiny: dict, batch_gpu: int, gpus: int = 1) -> dict:
    """One optimizer step of 128 images, no dropout, fp32 arithmetic (float64 weights)."""
    raw = copy.deepcopy(tiny)
    raw["data"]["limit"] = BATCH
    raw["model"]["dropout"] = 0.0
    raw["train"].update(batch_size=BATCH, batch_gpu=batch_gpu, gpus=gpus, precision="fp32",
                        sample_every=0, epochs=1)
    return raw


def one_step(tiny: dict, cifar: Path, root: Path, batch_gpu: int) -> tuple[Trainer, dict]:
    trainer = Trainer(parse_params(one_step_params(tiny, batch_gpu)), train_paths(root, cifar),
                      World(), torch.device("cpu"), dtype=torch.float64)
    seen = record_draws(trainer)
    trainer.epoch(0, tqdm(disable=True))
    return trainer, {key: torch.cat(values) for key, values in seen.items()}


def assert_same_step(reference: dict, other: dict, start: dict) -> None:
    """Equal to float64 rounding, where one Adam step moved every weight by about lr."""
    moved = max((reference[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-5  # it did step
    for key in reference:
        torch.testing.assert_close(other[key], reference[key], rtol=0, atol=1e-12, msg=key)


def test_one_step_is_the_same_whatever_the_micro_batch(tiny, cifar_128, tmp_path):
    """batch_gpu 32, 64 and 128 (4, 2 and 1 accumulation rounds): the same images in the same
    order with the same flips, t and noise, and the same weights and EMA after the step."""
    runs = {}
    for batch_gpu in (128, 64, 32):
        trainer, seen = one_step(tiny, cifar_128, tmp_path / str(batch_gpu), batch_gpu)
        assert (trainer.micro, trainer.rounds) == (batch_gpu, BATCH // batch_gpu)
        assert (trainer.state.progress.step == 1
                and sorted(seen["idx"].tolist()) == list(range(BATCH)))
        runs[batch_gpu] = trainer, seen
    start = Trainer(parse_params(one_step_params(tiny, 128)), train_paths(tmp_path, cifar_128),
                    World(), torch.device("cpu"), dtype=torch.float64).state.model.state_dict()
    reference, reference_seen = runs[128]
    for batch_gpu in (64, 32):
        trainer, seen = runs[batch_gpu]
        for key in ("idx", "flip", "t", "noise"):
            assert torch.equal(seen[key], reference_seen[key]), key
        torch.testing.assert_close(seen["loss"], reference_seen["loss"], rtol=1e-13, atol=0)
        assert_same_step(reference.state.model.state_dict(), trainer.state.model.state_dict(),
                         start)
        assert_same_step(reference.state.ema.state_dict(), trainer.state.ema.state_dict(), start)


def test_one_and_two_processes_take_the_same_step(tiny, cifar_128, tmp_path):
    """gloo, 2 processes x 2 rounds x 32 against 1 process x 1 round x 128: the ranks' shares are
    the two halves of the same batch, and both end with the single process's weights."""
    import yaml
    single, single_seen = one_step(tiny, cifar_128, tmp_path / "single", 128)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(one_step_params(tiny, 32, gpus=2)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", str(ROOT / "tests" / "ddp_worker.py"),
                    str(tmp_path / "params.yaml"), str(cifar_128), str(tmp_path), "one-step"],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("idx", "flip", "t", "noise"):  # rank 0 took images 0..63 of the batch, 1 the rest
        assert torch.equal(torch.cat([torch.cat(r["seen"][key]) for r in ranks]),
                           single_seen[key]), key
    mean = (ranks[0]["seen"]["loss"][0] + ranks[1]["seen"]["loss"][0]) / 2  # each its share's
    torch.testing.assert_close(mean, single_seen["loss"], rtol=1e-13, atol=0)
    for rank in ranks:
        assert len(rank["seen"]["idx"]) == 1 and rank["steps"] == 1
        assert_same_step(single.state.model.state_dict(), rank["model"], rank["init"])
        assert_same_step(single.state.ema.state_dict(), rank["ema"], rank["init"])


def test_resume_across_a_batch_gpu_change_continues_the_run(tiny, dataset_dir, tmp_path, capsys):
    """A checkpoint written with batch_gpu 8 (2 rounds) resumes with batch_gpu 16 (1 round) and
    ends where an uninterrupted run does (float64, no dropout: equal to rounding)."""
    common = dict(dtype=torch.float64, dropout=0.0, sample_every=0, precision="fp32")
    straight = run(tiny, tmp_path / "a", dataset_dir, epochs=2, batch_gpu=16, **common)
    run(tiny, tmp_path / "b", dataset_dir, epochs=1, batch_gpu=8, **common)
    capsys.readouterr()
    resumed = run(tiny, tmp_path / "b", dataset_dir, epochs=2, batch_gpu=16, **common)
    assert "resuming from" in capsys.readouterr().err and resumed.rounds == 1
    assert resumed.state.progress.step == straight.state.progress.step == 2 * 3
    start = Trainer(parse_params(dict(tiny, model=dict(tiny["model"], dropout=0.0))),
                    train_paths(tmp_path / "c", dataset_dir), World(), torch.device("cpu"),
                    dtype=torch.float64).state.model.state_dict()
    assert_same_step(straight.state.model.state_dict(), resumed.state.model.state_dict(), start)


@pytest.mark.parametrize("share, fitting, tried, chosen, on_cpu", [
    (128, 128, [128], 128, 32),          # the whole share fits: no accumulation
    (128, 40, [128, 64, 32], 32, 32),    # the largest power-of-two divisor that fits
    (96, 40, [96, 32], 32, 32),          # a share that is no power of two: then its divisors
    (24, 10, [24, 8], 8, 24),            # on a CPU, a share of at most 32 is taken whole
    (40, 40, [40], 40, 8),               # 40 > 32 on a CPU: its largest power-of-two divisor
])
def test_batch_gpu_auto_probes_down_from_the_share_on_a_gpu(share, fitting, tried, chosen, on_cpu):
    calls = []

    def fits(images):
        calls.append(images)
        return images <= fitting

    assert batches.resolve_batch_gpu("auto", share, torch.device("cuda", 0), fits) == chosen
    assert calls == tried
    assert batches.resolve_batch_gpu("auto", share, torch.device("cpu"), fits) == on_cpu
    assert calls == tried  # no probing on a CPU
    assert batches.resolve_batch_gpu(48, share, torch.device("cuda", 0), fits) == min(48, share)
    with pytest.raises(PipelineError, match="single image"):
        batches.resolve_batch_gpu("auto", share, torch.device("cuda", 0), lambda images: False)


def test_the_oom_probe_runs_forward_and_backward_and_leaves_no_trace(tiny, dataset_dir, tmp_path):
    """The trainer's probe on a network whose forward raises CUDA's OOM above 32 images (faked on
    the CPU): auto then picks 32 of a share of 128; no gradients and no random draws remain."""
    raw = copy.deepcopy(tiny)
    trainer = Trainer(parse_params(raw), train_paths(tmp_path, dataset_dir), World(),
                      torch.device("cpu"))
    real_forward, sizes = trainer.state.model.forward, []

    def forward(x, t):
        sizes.append(len(x))
        if len(x) > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real_forward(x, t)

    trainer.state.model.forward = forward
    before = torch.get_rng_state()
    fits = batches.probe(trainer.state.model, trainer.sched.timesteps, trainer.shape, "fp32",
                         torch.device("cpu"))
    assert batches.resolve_batch_gpu("auto", 128, torch.device("cuda", 0), fits) == 32
    assert sizes == [128, 64, 32]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in trainer.state.model.parameters())


# -- FID during training ------------------------------------------------------------------------

def test_fid_during_training_is_the_fid_stage_on_the_same_images(tiny, dataset_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """fid_every=1 over 2 epochs: one fid.tsv row per epoch; the metrics hold the last and best;
    and each FID and KID equals what stages/fid.py computes from the very images (kept here as
    they pass to the Inception network) against the same real statistics and features."""
    import json
    from ddpm.fid import folder_features, save_statistics, statistics
    from ddpm.images import write_pngs
    from fakes import cifar_images, run_stage
    real = tmp_path / "real_png"
    real.mkdir()
    write_pngs(cifar_images("train", per_batch=16)[:48].transpose(0, 2, 3, 1), real)
    fid = tiny["fid"]
    features = folder_features(real, fid["dims"], fid["batch_size"], fid["weights"],
                               torch.device("cpu"))
    save_statistics(tmp_path / "real_stats.npz", *statistics(features), len(features),
                    features=features.astype(np.float16))  # as real_stats keeps them
    kept, real_features = [], evaluate.folder_features

    def keeping(folder, *args, **kwargs):
        kept.append(tmp_path / f"kept{len(kept)}")
        shutil.copytree(folder, kept[-1])
        return real_features(folder, *args, **kwargs)

    monkeypatch.setattr(evaluate, "folder_features", keeping)
    trainer = run(tiny, tmp_path, dataset_dir, epochs=2, sample_every=0, fid_every=1,
                  fid_images=6, fid_steps=4)
    assert "train: epoch 2: FID" in capsys.readouterr().err
    rows = [r.split("\t") for r in (tmp_path / "fid.tsv").read_text().splitlines()]
    assert rows[0] == ["epoch", "step", "fid", "seconds", "kid", "kid_std"]
    assert [(int(r[0]), int(r[1])) for r in rows[1:]] == [(1, 3), (2, 6)]
    assert [len(list(folder.iterdir())) for folder in kept] == [6, 6]
    metrics = json.loads((tmp_path / "train.json").read_text())
    values = [row[2] for row in trainer.state.progress.fid_rows]
    assert metrics["fid_last"] == values[-1] and metrics["fid_best"] == min(values)
    assert metrics["fid_best_epoch"] == 1 + values.index(min(values))
    kids = [row[4] for row in trainer.state.progress.fid_rows]
    assert metrics["kid_last"] == kids[-1] and [float(r[4]) for r in rows[1:]] == pytest.approx(
        kids, rel=1e-5)  # the TSV's 6 significant digits
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert 0 < report["fid_seconds"] and metrics["seconds"] > 0
    for folder, value, kid in zip(kept, values, kids):
        done = run_stage("fid.py", tmp_path, "--images", str(folder), "--real-stats",
                         str(tmp_path / "real_stats.npz"), "--metrics", str(folder) + ".json",
                         "--report", str(folder) + ".report.json",
                         device="cpu", fid__dims=fid["dims"], fid__weights=fid["weights"],
                         fid__batch_size=fid["batch_size"])
        assert done.returncode == 0, done.stderr
        # equal up to float32 rounding in Inception: the stage runs with its own thread count
        stage = json.loads(Path(str(folder) + ".json").read_text())
        assert stage["fid"] == pytest.approx(value, rel=1e-6)
        assert stage["kid"] == pytest.approx(kid, rel=1e-5)


def test_fid_rows_of_a_run_from_before_kid_are_written_without_one(tiny, dataset_dir, tmp_path):
    """A run resumed from a checkpoint of before KID holds rows of 4 values: fid.tsv pads them
    with nan, and metrics/train.json has no kid_last."""
    import json
    trainer = run(tiny, tmp_path, dataset_dir, epochs=1, sample_every=0)
    trainer.state.progress.fid_rows = [[1, 3, 300.5, 5.0]]
    trainer.write_outputs(final=False)
    assert (tmp_path / "fid.tsv").read_text().splitlines()[1].split("\t") == [
        "1", "3", "300.5", "5", "nan", "nan"]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["fid_last"] == 300.5 and "kid_last" not in metrics


def test_fid_during_training_needs_the_real_statistics(tiny, dataset_dir, tmp_path):
    from ddpm.fid import PipelineError
    with pytest.raises(PipelineError, match="real_stats.npz"):
        run(tiny, tmp_path, dataset_dir, epochs=1, fid_every=1)


# -- stops, locks, fallbacks and non-finite values ---------------------------------------------

def start_train_stage(root: Path, tiny: dict, cifar: Path, **train_overrides) -> subprocess.Popen:
    """stages/train.py in `root` (params.yaml written there), its outputs under root."""
    import yaml
    raw = copy.deepcopy(tiny)
    raw["train"].update(train_overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    paths = train_paths(root, cifar)
    args = [f"--{key.replace('_', '-')}={value}" for key, value in vars(paths).items()]
    return subprocess.Popen([sys.executable, str(ROOT / "stages" / "train.py"), *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(condition, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    import time
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"{what}: the stage ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{what}: not reached"
        time.sleep(0.05)


def test_sigterm_stops_training_in_one_line_and_a_second_trainer_meets_the_lock(
        tiny, dataset_dir, tmp_path, capsys, monkeypatch):
    """A trainer of the run holds models/runs/<id>: a second one started by hand stops in one
    line naming the first one's pid and changes nothing. SIGTERM then stops the first as Ctrl-C
    does: one line naming the checkpoint kept, exit code 143, no temporary file left. The next
    start resumes there and sweeps what killed writers left (not what a live one writes)."""
    first = start_train_stage(tmp_path, tiny, dataset_dir, epochs=10_000, sample_every=1)
    try:
        wait_for(lambda: list(tmp_path.glob("runs/*/last.pt")), first, "a checkpoint")
        work = next(tmp_path.glob("runs/*"))
        second = start_train_stage(tmp_path, tiny, dataset_dir, epochs=10_000, sample_every=1)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1
        assert err.splitlines()[-1] == (
            f"error: {work} is in use by another trainer of the same run "
            f"(pid {first.pid}): wait for it to finish, or stop it, then run this again")
        assert first.poll() is None
        first.terminate()  # SIGTERM
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143 and "Traceback" not in err
    stop = [line for line in err.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(stop) == 1 and stop[0].startswith("train: interrupted in epoch ")
    assert f"its last checkpoint, {work}/last.pt (epoch " in stop[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    epoch = checkpoint.load(work / "last.pt")["progress"]["epoch"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".ema.pt.{dead}.x1.tmp", work / f".last.pt.{dead}.x2.tmp",
             work / "previews" / f".epoch_0003.png.{dead}.x3.tmp"]
    live = tmp_path / f".loss.tsv.{os.getpid()}.x4.tmp"
    for path in [*stale, live]:
        path.write_bytes(b"half")
    capsys.readouterr()

    def stop(self, epoch, bar):  # Ctrl-C in the first epoch: the run folder stays
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "epoch", stop)
    interrupted(tiny, tmp_path, dataset_dir, epochs=10_000, sample_every=1)
    assert f"resuming from {work}/last.pt at epoch {epoch}" in capsys.readouterr().err
    assert not any(path.exists() for path in stale) and live.exists()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tiny, dataset_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """Stopped in epoch 3, the run folder holds last.pt (epoch 2) and previous.pt (epoch 1).
    With last.pt truncated (a disk that lied about fsync), the run resumes from previous.pt,
    says why, and ends bitwise where an uninterrupted run does."""
    straight = run(tiny, tmp_path / "a", dataset_dir, epochs=3, sample_every=0)
    ctrl_c_in_epoch(monkeypatch, 3)
    interrupted(tiny, tmp_path / "b", dataset_dir, epochs=3, sample_every=0)
    monkeypatch.undo()
    work = next((tmp_path / "b" / "runs").iterdir())
    assert checkpoint.load(work / "previous.pt")["progress"]["epoch"] == 1
    last = work / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    resumed = run(tiny, tmp_path / "b", dataset_dir, epochs=3, sample_every=0)
    err = capsys.readouterr().err
    assert f"{last}: not a readable checkpoint" in err
    assert f"resuming from {work / 'previous.pt'} at epoch 1" in err
    assert_same_weights(straight.state.ema.state_dict(), resumed.state.ema.state_dict())
    assert not work.exists()  # finished: previous.pt went with the work folder


def test_non_finite_weights_are_never_checkpointed_or_published(tiny, dataset_dir, tmp_path,
                                                                monkeypatch):
    """A NaN from the last update of epoch 2 (step 6): that step's loss, computed before the
    update, is finite, so only the weights show it. Training stops naming the step; the
    checkpoint of epoch 1 stays; no models/ema.pt."""
    real_step = Trainer.step

    def step_that_breaks_a_weight(self, *args):
        loss = real_step(self, *args)
        if self.state.progress.step == 5:  # steps taken before this one
            with torch.no_grad():
                next(self.state.model.parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "step", step_that_breaks_a_weight)
    with pytest.raises(PipelineError) as info:
        run(tiny, tmp_path, dataset_dir, epochs=4, sample_every=0)
    message = str(info.value)
    assert message.startswith("the model weights became non-finite (") and "\n" not in message
    assert "at optimizer step 6: training stopped and the last good checkpoint" in message
    unfinished, = (tmp_path / "runs").glob("*/last.pt")
    assert f"{unfinished} (epoch 1), is kept" in message
    state = checkpoint.load(unfinished)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == 3
    assert not checkpoint.non_finite(state["model"]) and not checkpoint.non_finite(state["ema"])
    assert not (tmp_path / "ema.pt").exists() and not (tmp_path / "checkpoints").exists()


def test_a_missing_inception_file_fails_before_the_first_epoch(tiny, dataset_dir, tmp_path):
    """train.fid_every > 0: the FID network loads when the trainer is built, so a wrong
    fid.weights stops the stage at once instead of after fid_every epochs."""
    import numpy as np

    from ddpm.fid import save_statistics
    dims = tiny["fid"]["dims"]
    save_statistics(tmp_path / "real_stats.npz", np.zeros(dims), np.eye(dims), 2)
    raw = copy.deepcopy(tiny)
    raw["train"].update(fid_every=5, epochs=10)
    raw["fid"]["weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(PipelineError, match=r"fid.weights = .*missing.pth.: no such file"):
        Trainer(parse_params(raw), train_paths(tmp_path, dataset_dir), World(), torch.device("cpu"))
    assert not (tmp_path / "runs").exists()


def test_two_processes_wait_out_a_training_fid_longer_than_the_collective_timeout(
        tiny, dataset_dir, tmp_path):
    """gloo with a 5 s process-group timeout, and a training FID on rank 0 that takes 15 s
    while rank 1 waits: the run completes, both ranks with the same weights."""
    import numpy as np
    import yaml

    from ddpm.fid import save_statistics
    raw = copy.deepcopy(tiny)
    raw["train"].update(gpus=2, batch_size=16, batch_gpu=8, sample_every=0, epochs=1,
                        fid_every=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    dims = tiny["fid"]["dims"]
    save_statistics(tmp_path / "real_stats.npz", np.zeros(dims), np.eye(dims), 2)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", str(ROOT / "tests" / "ddp_worker.py"),
                    str(tmp_path / "params.yaml"), str(dataset_dir), str(tmp_path), "slow-fid"],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 3
    assert_same_weights(rank0["ema"], rank1["ema"])
    rows = (tmp_path / "fid.tsv").read_text().splitlines()
    assert rows[0] == "epoch\tstep\tfid\tseconds\tkid\tkid_std"
    assert float(rows[1].split("\t")[3]) >= 15
    assert rows[1].split("\t")[4:] == ["nan", "nan"]  # statistics without features: no KID

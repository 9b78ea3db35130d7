"""Class-conditional models and classifier-free guidance through the pipeline: label dropout, the
conditional networks at initialisation, exact resume, sampling (batch sizes, image i's class, the
sample stage, python -m ddpm sample), the params rules and the per-class FIDs.

The closed-form truths of guidance itself (eps_u + (1 + w)(eps_c - eps_u) on Gaussian classes)
are tests/test_guidance.py's; here the pipeline around it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm import batches, checkpoint, networks
from ddpm.diffusion import Schedule
from ddpm.errors import ParamsError, PipelineError
from ddpm.generate import generate, load_sampling_model
from ddpm.images import write_pngs
from ddpm.params import parse_params, run_config
from ddpm.runtime import World
from ddpm.train import Trainer
from fakes import (LABELS, ROOT, python_m_ddpm, record_draws, run_data_stages, run_stage,
                   train_paths)

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)  # the fake CIFAR-10 images
K = len(LABELS)      # CIFAR-10's ten classes; the null label is K

# pytorch-fid 0.3 passes sqrtm(disp=...), deprecated by SciPy 1.16 and 1.17 (as tests/test_fid.py)
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")


def conditional(tiny: dict, **sections) -> dict:
    """tiny's params, model.conditional true (label_dropout 0.1, guidance 1), with the sections'
    keys updated: conditional(tiny, sample=dict(labels=["cat"]))."""
    raw = copy.deepcopy(tiny)
    raw["model"]["conditional"] = True
    raw["train"]["label_dropout"] = 0.1
    raw["sample"]["guidance"] = 1.0
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def pngs(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(n)])


def one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.endswith("\n")


# --- 1. label dropout ---------------------------------------------------------------------------

def test_labels_are_dropped_to_the_null_label_at_their_rate():
    """drop_labels: each label becomes the null label K with probability p, independently: of
    20,000 labels at p = 0.1 the dropped count is within 4.5 sigma of 2,000; p = 0 drops none and
    p = 1 all; a dropped entry is exactly K, every other keeps its class."""
    n, p = 20_000, 0.1
    labels = torch.arange(n) % K
    dropped = batches.drop_labels(torch.Generator().manual_seed(7), labels, p, K)
    assert dropped.dtype == labels.dtype and dropped.shape == labels.shape
    is_null = dropped == K
    count = int(is_null.sum())
    assert abs(count - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), count
    assert torch.equal(dropped[~is_null], labels[~is_null])
    for rate, expected in ((0.0, labels), (1.0, torch.full_like(labels, K))):
        assert torch.equal(batches.drop_labels(torch.Generator().manual_seed(7), labels, rate, K),
                           expected)
    # Which labels are dropped is a function of the generator alone (a resumed epoch replays it)
    again = batches.drop_labels(torch.Generator().manual_seed(7), labels, p, K)
    assert torch.equal(dropped, again)


def epoch(labels: torch.Tensor | None = None, dropout: float = 0.0, world: World | None = None,
          num_images: int = 40, batch: int = 8) -> list[batches.Draws]:
    """Epoch 1's draws of seed 3 for 40 timesteps and (3, 4, 4) images, null label K."""
    return list(batches.epoch_draws(3, 1, num_images, batch, 40, (3, 4, 4), world or World(),
                                    CPU, labels,
                                    dropout, K))


def test_an_epoch_draws_labels_from_their_own_stream_and_the_rest_as_without_labels():
    """epoch_draws without labels draws exactly what it drew before labels existed: the order
    from (seed, epoch, "order"), then batches.draw per step from (seed, epoch, "noise"). With
    labels, the same order, flips, timesteps and noise (a conditional run trains on what the
    unconditional run of its seed trains on), and each step's labels from a stream of their own,
    (seed, epoch, "labels") (rebuilt here by hand): each label is its image's class or, dropped,
    K (p = 1: all, p = 0: none); two processes' shares put together are one process's draws,
    labels included."""
    from ddpm.runtime import derive_seed
    n, batch = 40, 8
    classes = torch.arange(n) % K
    plain_draws = epoch(num_images=n, batch=batch)
    assert all(d.labels is None for d in plain_draws)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(3, 1, "order")))

    def by_hand(dropout: float | None) -> list[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(derive_seed(3, 1, "noise"))
        dropping = torch.Generator().manual_seed(derive_seed(3, 1, "labels"))
        steps = []
        for step in range(n // batch):
            idx = order[step * batch:(step + 1) * batch]
            flip, t, noise = batches.draw(generator, batch, 40, (3, 4, 4))
            labels = (None if dropout is None else
                      batches.drop_labels(dropping, classes[idx], dropout, K))
            steps.append((idx, flip, t, noise, labels))
        return steps

    fields = ("idx", "flip", "t", "noise", "labels")
    for d, expected in zip(plain_draws, by_hand(None)):
        for name, value in zip(fields[:4], expected):
            assert torch.equal(getattr(d, name), value), name
    labelled = {p: epoch(classes, p, num_images=n, batch=batch) for p in (0.0, 0.5, 1.0)}
    for p, draws in labelled.items():
        assert len(draws) == len(plain_draws) == n // batch
        for d, expected in zip(draws, by_hand(p)):
            for name, value in zip(fields, expected):
                assert torch.equal(getattr(d, name), value), (p, name)
        for d, plain_d in zip(draws, plain_draws):  # all but the labels: the unconditional's
            for name in fields[:4]:
                assert torch.equal(getattr(d, name), getattr(plain_d, name)), (p, name)
        got = torch.cat([d.labels for d in draws])
        truth = torch.cat([classes[d.idx] for d in draws])
        null = got == K
        assert torch.equal(got[~null], truth[~null])
        if p == 0.5:
            assert 0 < int(null.sum()) < n  # some dropped, some kept
        else:
            assert int(null.sum()) == (n if p == 1.0 else 0)
    halves = [epoch(classes, 0.5, World(rank, 2), n, batch) for rank in (0, 1)]
    for step, whole in enumerate(labelled[0.5]):
        for name in fields:
            assert torch.equal(getattr(whole, name),
                               torch.cat([getattr(h[step], name) for h in halves])), name


def test_a_conditional_model_of_unlabelled_images_is_refused_in_one_line(tiny, tmp_path):
    """A folder without class subfolders has no labels: training a conditional model on it
    stops before anything is built, naming model.conditional and what to do."""
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_pngs(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), folder)
    done = run_data_stages(tmp_path, data__source=str(folder))
    assert done.returncode == 0, done.stderr
    raw = copy.deepcopy(tiny)
    raw["data"].update(source=str(folder), real_split="train", limit=0)
    raw["model"]["conditional"] = True
    with pytest.raises(PipelineError, match=r"model.conditional = true, but the training images "
                       r".* have no class labels .* set model.conditional=false$"):
        Trainer(parse_params(raw), train_paths(tmp_path / "run", tmp_path / "dataset"), World(),
                torch.device("cpu"))


# --- 2. the conditional network at initialisation -----------------------------------------------

TINY_NETS = {
    "seed": dict(arch="seed", channels=[16, 32, 32], res_blocks=1, attention_resolutions=[16],
                 heads=2, time_dim=16),
    "ddpm": dict(arch="ddpm", channels=[32, 32], res_blocks=1, attention_resolutions=[16],
                 heads=2),
}


def model_params(tiny: dict, conditional_: bool, **model):
    raw = copy.deepcopy(tiny)
    raw["model"].update(model, conditional=conditional_)
    return parse_params(raw).model


@pytest.mark.parametrize("arch", ["seed", "ddpm"])
def test_a_conditional_network_starts_as_the_unconditional_one(tiny, arch):
    """Same seed: every weight the unconditional network has is equal in the conditional one,
    whose only other tensor is label_embed, zero, (K + 1, dim) with dim = time_dim (seed) or
    4 channels[0] (ddpm); with all shared weights moved alike (the ddpm output layer is zero at
    initialisation), the outputs for any labels, and for None (the null label), are the
    unconditional network's, bitwise; the parameter count grows by exactly (K + 1) dim."""
    nets = {}
    for cond in (False, True):
        torch.manual_seed(0)
        nets[cond] = networks.build(model_params(tiny, cond, **TINY_NETS[arch]), SHAPE, K)
    plain_net, cond_net = nets[False], nets[True]
    plain_state, cond_state = plain_net.state_dict(), cond_net.state_dict()
    dim = 16 if arch == "seed" else 4 * 32
    assert set(cond_state) - set(plain_state) == {"label_embed.weight"}
    assert set(plain_state) <= set(cond_state)
    for key, value in plain_state.items():
        assert torch.equal(value, cond_state[key]), key
    table = cond_state["label_embed.weight"]
    assert table.shape == (K + 1, dim) and not table.any()
    assert (networks.parameter_count(cond_net)
            == networks.parameter_count(plain_net) + (K + 1) * dim)
    # the unconditional network ignores no labels silently: it refuses them
    with pytest.raises(ValueError, match="labels given to an unconditional network"):
        plain_net(torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long), torch.zeros(1).long())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in plain_net.named_parameters():
            move = 0.05 * torch.randn(p.shape, generator=generator)
            p.add_(move)
            cond_net.get_parameter(name).add_(move)
    plain_net.eval(), cond_net.eval()
    x = torch.randn(4, *SHAPE, generator=generator)
    t = torch.tensor([0, 5, 20, 39])
    with torch.no_grad():
        expected = plain_net(x, t)
        assert expected.abs().max() > 0  # a real output, not the zero of a zero last layer
        for labels in (torch.tensor([0, 3, 9, K]), torch.full((4,), K), None):
            assert torch.equal(cond_net(x, t, labels), expected), labels


@pytest.mark.parametrize("model, plain_count", [
    ({}, 32_655_651),                                             # the committed seed network
    (dict(arch="ddpm", channels=[128, 256, 256, 256], heads=1), 35_746_307),  # Ho et al.'s
])
def test_the_full_size_conditional_networks_add_k_plus_one_embedding_rows(base_params, model,
                                                                          plain_count):
    """On the meta device (nothing allocated): the committed defaults' conditional networks have
    the unconditional counts (32,655,651; the paper's 35,746,307) plus 11 rows of 64 (seed:
    time_dim) or 512 (ddpm: 4 x 128)."""
    dim = 64 if not model else 512
    counts = {}
    for cond in (False, True):
        params = model_params(base_params, cond, **model)
        with torch.device("meta"):
            counts[cond] = networks.parameter_count(networks.build(params, SHAPE, K))
    assert counts[False] == plain_count
    assert counts[True] == plain_count + (K + 1) * dim


# --- 3. exact resume ----------------------------------------------------------------------------

def trainer(tiny: dict, root: Path, data: Path, **train) -> Trainer:
    raw = conditional(tiny, train=dict(sample_every=0, label_dropout=0.5, **train))
    return Trainer(parse_params(raw), train_paths(root, data), World(), CPU)


def test_a_conditional_run_killed_after_epoch_1_resumes_bitwise(tiny, dataset_dir, tmp_path,
                                                               monkeypatch):
    """Ctrl-C as epoch 2 starts, then a new Trainer: the same weights, EMA, models/ema.pt weights
    and, step by step, the same labels (some dropped to K, the rest the images' classes) as an
    uninterrupted run; the checkpoints and models/ema.pt record the CIFAR-10 class names."""
    straight = trainer(tiny, tmp_path / "a", dataset_dir)
    seen_straight = record_draws(straight)
    straight.run()

    real_epoch = Trainer.epoch

    def ctrl_c_in_epoch_2(self, index, bar):
        if index == 1:
            raise KeyboardInterrupt
        return real_epoch(self, index, bar)

    monkeypatch.setattr(Trainer, "epoch", ctrl_c_in_epoch_2)
    first = trainer(tiny, tmp_path / "b", dataset_dir)
    seen_first = record_draws(first)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    monkeypatch.undo()
    resumed = trainer(tiny, tmp_path / "b", dataset_dir)
    seen_resumed = record_draws(resumed)
    resumed.run()

    steps = straight.steps_per_epoch
    assert resumed.state.progress.step == straight.state.progress.step == 2 * steps
    assert len(seen_first["labels"]) == len(seen_resumed["labels"]) == steps  # epoch 1, epoch 2
    for key in ("idx", "t", "noise", "labels"):
        assert all(torch.equal(a, b) for a, b in zip(seen_straight[key],
                                                     seen_first[key] + seen_resumed[key])), key
    labels, idx = torch.cat(seen_straight["labels"]), torch.cat(seen_straight["idx"])
    classes = torch.from_numpy(np.load(dataset_dir / "train_labels.npy"))[idx]
    null = labels == K
    assert 0 < int(null.sum()) < len(labels) and torch.equal(labels[~null], classes[~null])
    for a, b in ((straight.state.model.state_dict(), resumed.state.model.state_dict()),
                 (straight.state.ema.state_dict(), resumed.state.ema.state_dict())):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)
    ema = [checkpoint.load(tmp_path / name / "ema.pt") for name in "ab"]
    assert ema[0]["ema"].keys() == ema[1]["ema"].keys()
    assert all(torch.equal(ema[0]["ema"][key], ema[1]["ema"][key]) for key in ema[0]["ema"])
    assert ema[0]["ema"]["label_embed.weight"].shape == (K + 1, 64)  # time_dim; trained: not 0
    assert ema[0]["ema"]["label_embed.weight"].any()
    assert ema[0]["classes"] == ema[1]["classes"] == LABELS
    checkpoints = sorted((tmp_path / "b").rglob("*.pt"))
    assert len(checkpoints) >= 2, checkpoints
    for path in checkpoints:
        assert checkpoint.load(path)["classes"] == LABELS, path


# --- 4. guided samples: batch sizes and image i's class -----------------------------------------

@pytest.fixture(scope="module")
def cond_ema(tiny, tmp_path_factory) -> tuple[dict, Path]:
    """(raw params, ema.pt) of a conditional seed network with perturbed weights, its label rows
    far from zero (so that the class matters), recording the CIFAR-10 names: drawn with guidance
    1, ddim, 4 steps."""
    raw = conditional(tiny, sample=dict(sampler="ddim", steps=4, eta=0.0, num_images=5,
                                        batch_size=2, labels=["dog", "cat"]),
                      train=dict(precision="fp32"))
    params = parse_params(raw)
    torch.manual_seed(0)
    model = networks.build(params.model, SHAPE, K)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((1.0 if name.startswith("label_embed") else 0.05) * torch.randn_like(p))
    root = tmp_path_factory.mktemp("conditional_ema")
    checkpoint.save({"ema": model.state_dict(), "config": run_config(params),
                     "image_shape": list(SHAPE), "classes": list(LABELS)}, root / "ema.pt")
    return raw, root / "ema.pt"


def draw(raw: dict, ema: Path, folder: Path, n: int, batch_size: int, labels, guidance=1.0
         ) -> np.ndarray:
    """Images 0..n-1 by generate, sample.labels = labels, sample.guidance = guidance."""
    params = parse_params(conditional(raw, sample=dict(labels=labels, guidance=guidance,
                                                       batch_size=batch_size)))
    model, shape, classes = load_sampling_model(ema, params, CPU)
    assert classes == LABELS and shape == SHAPE
    folder.mkdir()
    generate(model, Schedule(**dataclasses.asdict(params.diffusion)), shape, params, "fp32",
             range(n), folder, progress=False, classes=classes)
    return pngs(folder, n).astype(int)


def test_guided_images_do_not_depend_on_the_batch_size_and_image_i_is_the_specs_class(cond_ema,
                                                                                      tmp_path):
    """Guidance 1 (two predictions per image in one forward pass): batch sizes 1, 3 and 5 give
    the same images to one quantisation level (as tests/test_sample.py allows), for balanced and
    for a list; image i depends on (seed, i, its class) only, so image i of labels ["cat"]
    (always cat) is image i of balanced where balanced's class i mod 10 is cat (i = 3), and
    differs where not; ["truck", "cat"] gives cat to odd i, truck to even i."""
    raw, ema = cond_ema
    n = 5
    by_batch = [draw(raw, ema, tmp_path / f"b{b}", n, b, "balanced") for b in (1, 3, 5)]
    assert by_batch[0].std() > 10  # images, not a constant
    for other in by_batch[1:]:
        assert np.abs(by_batch[0] - other).max() <= 1
        assert (by_batch[0] == other).mean() > 0.99
    listed = [draw(raw, ema, tmp_path / f"l{b}", n, b, ["truck", "cat"]) for b in (1, 3)]
    assert np.abs(listed[0] - listed[1]).max() <= 1
    balanced, cat = by_batch[0], draw(raw, ema, tmp_path / "cat", n, 1, ["cat"])
    for i in range(n):
        same = np.abs(balanced[i] - cat[i]).max() <= 1
        assert same == (i == 3), i  # balanced image 3 is class 3, cat
        assert (np.abs(listed[0][i] - cat[i]).max() <= 1) == (i % 2 == 1), i
    # guidance moves the images: w = 0 is the conditional model alone
    unguided = draw(raw, ema, tmp_path / "w0", n, 5, "balanced", guidance=0.0)
    assert np.abs(unguided - balanced).max() > 1


# --- 5. params rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("sections, key", [
    (dict(model=dict(conditional=False), sample=dict(guidance=1.0)), "sample.guidance"),
    (dict(model=dict(conditional=False), sample=dict(labels=["cat"], guidance=0.0)),
     "sample.labels"),
    (dict(train=dict(label_dropout=0.0), sample=dict(guidance=0.5)), "sample.guidance"),
    (dict(sample=dict(labels=[""])), "sample.labels"),
    (dict(sample=dict(labels=[3])), "sample.labels"),
    (dict(sample=dict(labels=[])), "sample.labels"),
    (dict(sample=dict(labels="cat")), "sample.labels"),
    (dict(sample=dict(guidance=-1.0)), "sample.guidance"),
    (dict(train=dict(label_dropout=1.5)), "train.label_dropout"),
])
def test_conditional_keys_are_refused_in_one_line_naming_the_key(tiny, sections, key):
    """The rules across keys (guidance or a labels list need model.conditional; guidance needs
    label_dropout > 0, or the null label is never trained) and the schema (labels: balanced or
    1 to 1000 non-empty names; guidance >= 0; label_dropout in [0, 1]): a ParamsError that starts
    with the key, in one line."""
    with pytest.raises(ParamsError) as info:
        parse_params(conditional(tiny, **sections))
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def test_the_conditional_rules_accept_what_they_should(tiny):
    """Guidance 0 with label_dropout 0 (the conditional model alone), and an unconditional model
    with the committed conditional keys, are valid; run_config leaves model.conditional and
    train.label_dropout out of an unconditional run's identity, and keeps them in a conditional
    one's."""
    parse_params(conditional(tiny, train=dict(label_dropout=0.0), sample=dict(guidance=0.0)))
    plain_params = parse_params(tiny)
    assert "conditional" not in run_config(plain_params)["model"]
    assert "label_dropout" not in run_config(plain_params)["train"]
    config = run_config(parse_params(conditional(tiny)))
    assert config["model"]["conditional"] is True and config["train"]["label_dropout"] == 0.1


def test_check_params_refuses_a_class_cifar10_does_not_have(tmp_path):
    """check_params knows CIFAR-10's class names before any data is downloaded: sample.labels
    naming another is one line naming sample.labels and the name, exit code 2, no marker."""
    done = run_stage("check_params.py", tmp_path, "--out", str(tmp_path / "ok"), device="cpu",
                     model__conditional=True, sample__labels=["cat", "unicorn"])
    assert done.returncode == 2 and not (tmp_path / "ok").exists(), done.stderr
    assert done.stderr.startswith("error: params.yaml: sample.labels: 'unicorn' is not a class")
    assert one_line(done.stderr), done.stderr


# --- 6 and 8. the sample stage and python -m ddpm sample ----------------------------------------

SAMPLE_STAGE = ("--ema", "ema.pt", "--out", "samples", "--metrics", "m.json", "--report",
                "r.json", "--grid", "grid.png")


@pytest.fixture(scope="module")
def stage_run(cond_ema, tmp_path_factory) -> Path:
    """The sample stage on cond_ema's file with its params (5 images, labels dog, cat, guidance
    1, ddim 4 steps, batches of 2, fp32): the folder it ran in."""
    raw, ema = cond_ema
    root = tmp_path_factory.mktemp("sample_stage")
    (root / "ema.pt").write_bytes(ema.read_bytes())
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, str(ROOT / "stages/sample.py"), *SAMPLE_STAGE],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root


def test_the_sample_stage_reports_the_classes_and_guidance_and_grids_a_row_per_class(stage_run):
    """reports/sample.json gains guidance and the images per class drawn, by name, in the list's
    order (dog, cat, dog, cat, dog: 3 and 2); the grid is one labelled row per class drawn:
    2 rows of 32 px with 2 px padding, 3 images wide (dog's), a white name margin on the left."""
    report = json.loads((stage_run / "r.json").read_text())
    assert report["guidance"] == 1.0
    assert list(report["labels"].items()) == [("dog", 3), ("cat", 2)]
    assert report["num_images"] == 5
    grid = np.asarray(Image.open(stage_run / "grid.png"))
    assert grid.shape[0] == 2 * (32 + 2) + 2
    body = 3 * (32 + 2) + 2
    margin = grid.shape[1] - body
    assert margin > 8 and grid.shape[2] == 3
    images = pngs(stage_run / "samples", 5)
    # row r, column c holds the c-th image of row r's class: dog 0, 2, 4; cat 1, 3 (then blank)
    for r, row in enumerate([[0, 2, 4], [1, 3, None]]):
        for c, i in enumerate(row):
            y, x = 2 + r * 34, margin + 2 + c * 34
            tile = grid[y:y + 32, x:x + 32]
            assert np.array_equal(tile, images[i] if i is not None else np.full_like(tile, 255))
    assert (grid[:, :margin] < 128).any()  # the names, written in black


@pytest.mark.parametrize("file_conditional", [True, False])
def test_a_model_file_of_the_other_kind_is_one_line(cond_ema, tmp_path, file_conditional):
    """A conditional ema.pt read with model.conditional false, and an unconditional one read with
    true, is a CheckpointError in one line saying what the file holds and the key to set."""
    raw, ema = cond_ema
    unconditional = dict(model=dict(conditional=False),
                         sample=dict(guidance=0.0, labels="balanced"))
    if not file_conditional:
        torch.manual_seed(0)
        plain_params = parse_params(conditional(raw, **unconditional))
        ema = tmp_path / "plain.pt"
        checkpoint.save({"ema": networks.build(plain_params.model, SHAPE).state_dict(),
                         "config": run_config(plain_params), "image_shape": list(SHAPE)}, ema)
    params = parse_params(conditional(raw, **(unconditional if file_conditional else {})))
    with pytest.raises(checkpoint.CheckpointError) as info:
        load_sampling_model(ema, params, CPU)
    message = str(info.value)
    kind = "a conditional" if file_conditional else "an unconditional"
    assert "\n" not in message and f"holds {kind} network" in message, message
    assert f"model.conditional={str(file_conditional).lower()}" in message, message


def test_python_m_ddpm_sample_draws_the_sample_stages_conditional_images(cond_ema, stage_run,
                                                                         tmp_path):
    """python -m ddpm sample MODEL --labels dog,cat --guidance 1 with the stage's sampler
    settings: byte-identical PNGs and grid to the sample stage's, from the file alone."""
    raw, ema = cond_ema
    done = python_m_ddpm(tmp_path, "sample", ema, "--out", "samples", "--grid", "grid.png",
                         "--labels", "dog,cat", "--guidance", "1", "--num-images", "5",
                         "--batch-size", "2", "--sampler", "ddim", "--steps", "4",
                         "--precision", "fp32", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"{i}.png"
                                                                        for i in range(5)]
    for i in range(5):
        assert ((tmp_path / "samples" / f"{i}.png").read_bytes()
                == (stage_run / "samples" / f"{i}.png").read_bytes()), i
    assert ((tmp_path / "grid.png").read_bytes() == (stage_run / "grid.png").read_bytes())


@pytest.mark.parametrize("which, args, says", [
    ("plain", ["--guidance", "1"], "--guidance: plain.pt holds an unconditional model"),
    ("plain", ["--labels", "cat"], "--labels: plain.pt holds an unconditional model"),
    ("ema", ["--labels", "cat,unicorn"], "--labels: 'unicorn' is not a class of the model"),
])
def test_python_m_ddpm_sample_refuses_classes_a_model_cannot_draw(tiny, cond_ema, tmp_path,
                                                                   which, args, says):
    """Guidance or labels for an unconditional model, or a class the model has not: one line,
    exit code 2, nothing written."""
    torch.manual_seed(0)
    params = parse_params(tiny)
    checkpoint.save({"ema": networks.build(params.model, SHAPE).state_dict(),
                     "config": run_config(params), "image_shape": list(SHAPE)},
                    tmp_path / "plain.pt")
    (tmp_path / "ema.pt").write_bytes(cond_ema[1].read_bytes())
    done = python_m_ddpm(tmp_path, "sample", f"{which}.pt", "--out", "x", *args,
                         "--num-images", "2", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {says}") and one_line(done.stderr), done.stderr
    assert not (tmp_path / "x").exists()


# --- 7. per-class FID ---------------------------------------------------------------------------

def test_per_class_fids_equal_pytorch_fids_own_computation(tiny, dataset_dir, inception_weights,
                                                           tmp_path):
    """real_stats --data keeps the real images' features and labels; the fid stage's per-class
    FIDs of images 0..23 (sample.labels cat, dog, ship: 8 each) against each class's real images
    (8 of the 80) are pytorch-fid's calculate_frechet_distance of np.mean / np.cov of the class
    subsets of pytorch-fid's get_activations: with the real side from the stored features, to
    1e-6 relative (measured: 4e-9); from the float32 activations of the real PNGs, which the
    stored float16 features round to half a unit in the last place, to 1e-3 (measured: 1.5e-4)."""
    import pytorch_fid_compat  # noqa: F401  (pytorch-fid on SciPy releases without sqrtm disp=)
    from pytorch_fid import inception as pf_inception
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    from ddpm import dataset
    real_images, real_labels = dataset.load(dataset_dir, "train", 0, labels=True)
    (tmp_path / "real").mkdir(), (tmp_path / "fake").mkdir()
    write_pngs(real_images.transpose(0, 2, 3, 1), tmp_path / "real")
    import fakes
    fake_images = fakes.cifar_images("test", 24, seed=5)[:24] // 2 + 64
    write_pngs(fake_images.transpose(0, 2, 3, 1), tmp_path / "fake")
    spec = ["cat", "dog", "ship"]
    params = dict(device="cpu", fid__dims=64, fid__weights=str(inception_weights),
                  fid__batch_size=40, model__conditional=True, sample__labels=spec)
    done = run_stage("real_stats.py", tmp_path, "--images", "real", "--data", str(dataset_dir),
                     "--out", "stats.npz", **params)
    assert done.returncode == 0, done.stderr
    done = run_stage("fid.py", tmp_path, "--images", "fake", "--real-stats", "stats.npz",
                     "--metrics", "fid.json", "--report", "report.json", **params)
    assert done.returncode == 0, done.stderr
    per_class = json.loads((tmp_path / "report.json").read_text())["per_class"]
    assert list(per_class) == spec

    state = torch.load(inception_weights, map_location="cpu", weights_only=True)
    block = pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[64]
    with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: state):
        net = pf_inception.InceptionV3([block]).eval()

    def activations(folder: Path, n: int) -> np.ndarray:
        return get_activations([str(folder / f"{i}.png") for i in range(n)], net, 40, 64, "cpu",
                               0)

    fake_features = activations(tmp_path / "fake", 24)
    real_features = activations(tmp_path / "real", len(real_images))
    stored = np.load(tmp_path / "stats.npz")
    assert stored["features"].dtype == np.float16
    assert np.array_equal(stored["labels"], real_labels)
    # float16 rounding: at most half a unit in the last place, 2^-11 relative (2^-25 subnormal)
    np.testing.assert_allclose(stored["features"].astype(np.float64), real_features,
                               rtol=2.0**-11, atol=2.0**-25)
    fake_labels = np.arange(24) % 3  # spec index
    for s, name in enumerate(spec):
        k = LABELS.index(name)
        gen = fake_features[fake_labels == s]
        assert per_class[name]["generated"] == 8 == len(gen)
        assert per_class[name]["real"] == int((real_labels == k).sum()) == 8
        gen_stats = (np.mean(gen, axis=0), np.cov(gen, rowvar=False))
        for real, rtol in ((stored["features"].astype(np.float32), 1e-6), (real_features, 1e-3)):
            ref = real[real_labels == k]
            expected = calculate_frechet_distance(*gen_stats, np.mean(ref, axis=0),
                                                  np.cov(ref, rowvar=False))
            assert expected > 0
            assert per_class[name]["fid"] == pytest.approx(expected, rel=rtol), (name, rtol)
    values = [per_class[name]["fid"] for name in spec]
    assert len(set(values)) == 3  # each class its own


class Interrupted:
    """A conditional model that raises KeyboardInterrupt (Ctrl-C) at forward pass `stop`."""

    def __init__(self, model, stop: int):
        self.model, self.stop, self.calls = model, stop, 0

    def __call__(self, x, t, labels=None):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.model(x, t, labels)


def test_guided_sampling_resumes_and_splits_over_processes_as_one_run(cond_ema, tmp_path):
    """The sample stage's guarantees with labels and guidance: a run killed in its 2nd batch and
    run again ends with the PNGs of an uninterrupted one, byte for byte, and two processes each
    drawing its share with its images (images 0..4, classes dog, cat, dog, ..., batches of 2)."""
    import threading

    from ddpm.generate import generate_folder, sample_manifest
    from test_sample import ThreadWorld, files
    raw, ema = cond_ema
    params = parse_params(raw)
    model, shape, classes = load_sampling_model(ema, params, CPU)
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    wanted = sample_manifest(ema, params, "fp32", CPU, World(), classes=classes)
    assert wanted["classes"] == LABELS and wanted["sample.guidance"] == 1.0
    generate_folder(model, sched, shape, params, "fp32", tmp_path / "straight", World(), wanted,
                    classes)
    straight = files(tmp_path / "straight")
    assert len(straight) == 5

    with pytest.raises(KeyboardInterrupt):  # in the 2nd batch
        generate_folder(Interrupted(model, params.sample.steps + 2), sched, shape, params,
                        "fp32", tmp_path / "out", World(), wanted, classes)
    generate_folder(model, sched, shape, params, "fp32", tmp_path / "out", World(), wanted,
                    classes)
    assert files(tmp_path / "out") == straight

    wanted = sample_manifest(ema, params, "fp32", CPU, World(0, 2), classes=classes)
    gate = threading.Barrier(2)
    threads = [threading.Thread(target=generate_folder, args=(
        model, sched, shape, params, "fp32", tmp_path / "two", ThreadWorld(rank, 2, gate=gate),
        wanted, classes)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a rank did not finish within 120 s"
    # other batches ([0, 1], [2] | [3, 4]): equal up to one level of rounding (test_sample.py)
    assert np.abs(pngs(tmp_path / "two", 5).astype(int)
                  - pngs(tmp_path / "straight", 5).astype(int)).max() <= 1

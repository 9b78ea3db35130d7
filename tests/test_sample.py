"""The sample stage's logic: image i depends on (seed, i) only; the EMA file is checked."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import checkpoint
from ddpm.diffusion import Schedule
from ddpm.generate import generate, load_ema_model, shard
from ddpm.params import parse_params
from ddpm.runtime import World
from ddpm.unet import UNet


@pytest.fixture
def setup(tiny, tmp_path):
    """Tiny params and an EMA file of a UNet whose zero-initialised layers were perturbed."""
    params = parse_params(tiny)
    torch.manual_seed(0)
    model = UNet(**dataclasses.asdict(params.model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint.save({"ema": model.state_dict(), "config": params.to_dict()}, tmp_path / "ema.pt")
    return params, tmp_path


def pngs(folder, n):
    return np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(n)])


def test_images_do_not_depend_on_the_batch_size_or_the_split(setup):
    params, root = setup
    model = load_ema_model(root / "ema.pt", params, torch.device("cpu"))
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    n = 6
    outputs = []
    for name, batch, parts in [("a", 6, [range(0, 6)]), ("b", 4, [range(0, 6)]),
                               ("c", 2, [range(0, 3), range(3, 6)])]:
        folder = root / name
        folder.mkdir()
        p = dataclasses.replace(params, sample=dataclasses.replace(params.sample, batch_size=batch))
        for indices in parts:  # as two processes would, each with its share
            generate(model, sched, p, "fp32", indices, folder, progress=False)
        outputs.append(pngs(folder, n))
    assert outputs[0].std() > 10  # real images, not a constant
    for other in outputs[1:]:
        # One quantisation level of slack: convolutions of other batch sizes may round differently.
        assert np.abs(outputs[0].astype(int) - other.astype(int)).max() <= 1
        assert (outputs[0] == other).mean() > 0.99


def test_another_seed_gives_other_images(setup):
    params, root = setup
    model = load_ema_model(root / "ema.pt", params, torch.device("cpu"))
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    for seed in (0, 1):
        (root / str(seed)).mkdir()
        generate(model, sched, dataclasses.replace(params, seed=seed), "fp32", range(2),
                 root / str(seed), progress=False)
    assert not np.array_equal(pngs(root / "0", 2), pngs(root / "1", 2))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shards_cover_every_image_once(size):
    shares = [shard(10, World(rank, size)) for rank in range(size)]
    assert sorted(i for s in shares for i in s) == list(range(10))


def test_a_missing_or_foreign_ema_file_is_named(setup, tiny):
    params, root = setup
    with pytest.raises(checkpoint.CheckpointError, match="nothing.pt: no EMA weights file"):
        load_ema_model(root / "nothing.pt", params, torch.device("cpu"))
    (root / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="garbage.pt: not a readable"):
        load_ema_model(root / "garbage.pt", params, torch.device("cpu"))
    wider = copy.deepcopy(tiny)
    wider["model"]["channels"] = [32, 64]
    with pytest.raises(checkpoint.CheckpointError, match="ema.pt: its weights do not fit model"):
        load_ema_model(root / "ema.pt", parse_params(wider), torch.device("cpu"))


def test_compiled_sampling_gives_the_eager_images(setup):
    """sample.compile changes how the forward runs, not what it computes."""
    params, root = setup
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    compiled = dataclasses.replace(params, sample=dataclasses.replace(params.sample, compile=True))
    outputs = []
    for name, p in (("eager", params), ("compiled", compiled)):
        model = load_ema_model(root / "ema.pt", p, torch.device("cpu"))
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) == (name == "compiled")
        (root / name).mkdir()
        generate(model, sched, p, "fp32", range(3), root / name, progress=False)
        outputs.append(pngs(root / name, 3).astype(int))
    assert outputs[0].std() > 10
    assert np.abs(outputs[0] - outputs[1]).max() <= 1
    assert (outputs[0] == outputs[1]).mean() > 0.99

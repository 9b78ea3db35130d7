"""The sample stage's logic: image i depends on (seed, i) only; the EMA file is checked."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import checkpoint, networks
from ddpm.diffusion import Schedule
from ddpm.generate import generate, load_ema_model, shard
from ddpm.params import parse_params
from ddpm.runtime import World


@pytest.fixture(params=["seed", "ddpm"])
def setup(request, tiny, tmp_path):
    """Tiny params and an EMA file of a network whose weights were perturbed (the DDPM network's
    zero-initialised layers would otherwise make every image the same)."""
    params = parse_params(dict(tiny, model=dict(tiny["model"], arch=request.param)))
    torch.manual_seed(0)
    model = networks.build(params.model)
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


def test_a_missing_or_foreign_ema_file_is_named(setup):
    params, root = setup
    with pytest.raises(checkpoint.CheckpointError, match="nothing.pt: no EMA weights file"):
        load_ema_model(root / "nothing.pt", params, torch.device("cpu"))
    (root / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="garbage.pt: not a readable"):
        load_ema_model(root / "garbage.pt", params, torch.device("cpu"))
    wider = parse_params(dict(params.to_dict(), model=dict(params.to_dict()["model"],
                                                           channels=[32, 64, 64])))
    with pytest.raises(checkpoint.CheckpointError, match="ema.pt: its weights do not fit model"):
        load_ema_model(root / "ema.pt", wider, torch.device("cpu"))


def test_weights_of_the_other_network_are_a_clear_error(setup):
    """An EMA file records model.arch; the other network's weights are refused by name."""
    params, root = setup
    other = "ddpm" if params.model.arch == "seed" else "seed"
    wanted = parse_params(dict(params.to_dict(), model=dict(params.to_dict()["model"], arch=other)))
    message = (f"ema.pt: holds weights of the '{params.model.arch}' network, but model.arch = "
               f"'{other}': retrain \\(dvc repro train\\) or set -S model.arch={params.model.arch}")
    with pytest.raises(checkpoint.CheckpointError, match=message):
        load_ema_model(root / "ema.pt", wanted, torch.device("cpu"))


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

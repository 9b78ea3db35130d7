"""The sample stage's logic: image i depends on (seed, i) only; the EMA file is checked."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import checkpoint, networks
from ddpm.diffusion import Schedule
from ddpm.generate import (MANIFEST, generate, generate_folder, sample_manifest, keep_or_clean,
                           load_ema_model, shard)
from ddpm.params import parse_params
from ddpm.runtime import World

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)  # the fake CIFAR-10 images


@pytest.fixture(params=["seed", "ddpm"])
def setup(request, tiny, tmp_path):
    """Tiny params and an EMA file of a network whose weights were perturbed (the DDPM network's
    zero-initialised layers would otherwise make every image the same)."""
    params = parse_params(dict(tiny, model=dict(tiny["model"], arch=request.param)))
    torch.manual_seed(0)
    model = networks.build(params.model, SHAPE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint.save({"ema": model.state_dict(), "config": params.to_dict()}, tmp_path / "ema.pt")
    return params, tmp_path


def pngs(folder, n):
    return np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(n)])


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_images_do_not_depend_on_the_batch_size_or_the_split(setup, sampler):
    params, root = setup
    params = dataclasses.replace(params, sample=dataclasses.replace(params.sample, sampler=sampler))
    model, shape = load_ema_model(root / "ema.pt", params, torch.device("cpu"))
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    n = 6
    outputs = []
    for name, batch, parts in [("a", 6, [range(0, 6)]), ("b", 4, [range(0, 6)]),
                               ("c", 2, [range(0, 3), range(3, 6)])]:
        folder = root / name
        folder.mkdir()
        p = dataclasses.replace(params, sample=dataclasses.replace(params.sample, batch_size=batch))
        for indices in parts:  # as two processes would, each with its share
            generate(model, sched, SHAPE, p, "fp32", indices, folder, progress=False)
        outputs.append(pngs(folder, n))
    assert outputs[0].std() > 10  # real images, not a constant
    for other in outputs[1:]:
        # One quantisation level of slack: convolutions of other batch sizes may round differently.
        assert np.abs(outputs[0].astype(int) - other.astype(int)).max() <= 1
        assert (outputs[0] == other).mean() > 0.99


def test_another_seed_gives_other_images(setup):
    params, root = setup
    model, shape = load_ema_model(root / "ema.pt", params, torch.device("cpu"))
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    for seed in (0, 1):
        (root / str(seed)).mkdir()
        generate(model, sched, SHAPE, dataclasses.replace(params, seed=seed), "fp32", range(2),
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
        model, shape = load_ema_model(root / "ema.pt", p, torch.device("cpu"))
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule) == (name == "compiled")
        (root / name).mkdir()
        generate(model, sched, SHAPE, p, "fp32", range(3), root / name, progress=False)
        outputs.append(pngs(root / name, 3).astype(int))
    assert outputs[0].std() > 10
    assert np.abs(outputs[0] - outputs[1]).max() <= 1
    assert (outputs[0] == outputs[1]).mean() > 0.99


# Resuming: 7 images in batches of 3 ([0, 1, 2], [3, 4, 5], [6]), 8 DDPM steps each.
RESUME = dict(num_images=7, batch_size=3)


@pytest.fixture
def resume(setup):
    """(params, root, model, schedule) for 7 images from the seed network's weights."""
    params, root = setup
    params = dataclasses.replace(params, sample=dataclasses.replace(params.sample, **RESUME))
    model, shape = load_ema_model(root / "ema.pt", params, CPU)
    return params, root, model, Schedule(**dataclasses.asdict(params.diffusion))


class Forwards:
    """The model, counting its forward passes; KeyboardInterrupt (Ctrl-C) at pass `stop`."""

    def __init__(self, model, stop: int | None = None):
        self.model, self.stop, self.calls = model, stop, 0

    def __call__(self, x, t):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.model(x, t)


def files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_an_interrupted_run_keeps_its_whole_batches_and_ends_as_an_uninterrupted_one(
        resume, capsys, sampler):
    params, root, model, sched = resume
    params = dataclasses.replace(params, sample=dataclasses.replace(params.sample, sampler=sampler))
    wanted = sample_manifest(root / "ema.pt", params, "fp32", CPU, World())
    generate_folder(model, sched, SHAPE, params, "fp32", root / "straight", World(), wanted)
    straight = files(root / "straight")
    assert sorted(straight, key=lambda name: int(name[:-4])) == [f"{i}.png" for i in range(7)]

    steps = params.sample.steps
    with pytest.raises(KeyboardInterrupt):  # in the 2nd batch
        generate_folder(Forwards(model, stop=steps + 3), sched, SHAPE, params, "fp32", root / "out",
                        World(), wanted)
    staging = root / ".out.partial"
    assert set(files(staging)) == {MANIFEST, "0.png", "1.png", "2.png"}
    assert json.loads((staging / MANIFEST).read_text()) == wanted
    (staging / ".4.png.tmp").write_bytes(straight["4.png"][:50])  # torn by a kill
    (staging / "3.png").write_bytes(straight["3.png"])  # whole, but its batch is not
    (staging / "6.png").write_bytes(straight["6.png"][:-8])  # torn (not by our writes)
    capsys.readouterr()

    counting = Forwards(model)
    assert generate_folder(counting, sched, SHAPE, params, "fp32", root / "out", World(),
                           wanted) == 3
    assert counting.calls == 2 * steps  # batches [3, 4, 5] and [6] only
    assert files(root / "out") == straight  # byte for byte, without the manifest
    assert not staging.exists()
    err = capsys.readouterr().err
    assert ("sample: kept 3 of 7 images from an interrupted run (same EMA weights and params); "
            "drawing 4") in err
    # tqdm writes the rate as s/img below one image per second (a loaded machine)
    assert re.search(r"sample:  43%.*\| 3/7 \[", err)
    assert re.search(r"100%.*\| 7/7 \[.*(img/s|s/img)\]", err)


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_other_weights_or_params_or_no_manifest_start_clean_and_say_why(resume, capsys):
    params, root, _, _ = resume
    staging = root / ".out.partial"
    wanted = sample_manifest(root / "ema.pt", params, "fp32", CPU, World())
    for found, why in [(dict(wanted, **{"sample.steps": 4}), "other sample.steps (4, now 8)"),
                       (dict(wanted, **{"ema.sha256": "0" * 64}), "other EMA weights"),
                       (None, "no readable record of the weights and params")]:
        staging.mkdir()
        for i in range(3):
            (staging / f"{i}.png").write_bytes(b"")
        if found:
            (staging / MANIFEST).write_text(json.dumps(found))
        assert keep_or_clean(staging, wanted, params, World(), 32) == 0
        assert set(files(staging)) == {MANIFEST}
        assert json.loads((staging / MANIFEST).read_text()) == wanted
        assert (f"sample: discarding 3 images of an interrupted run in {staging}: {why}"
                in capsys.readouterr().err)
        shutil.rmtree(staging)

    trained = root / "trained.pt"
    checkpoint.save({"ema": {}, "other": 1}, trained)
    assert (sample_manifest(trained, params, "fp32", CPU, World())["ema.sha256"]
            != wanted["ema.sha256"])
    wider = dataclasses.replace(params, sample=dataclasses.replace(params.sample, batch_size=2))
    assert sample_manifest(root / "ema.pt", wider, "fp32", CPU, World())["sample.batch_size"] == 2


@dataclasses.dataclass(frozen=True)
class ThreadWorld(World):
    """Processes played by threads: barrier() waits for the others."""
    gate: threading.Barrier | None = None

    def barrier(self) -> None:
        self.gate.wait(timeout=60)


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_two_processes_resume_each_its_share(resume):
    """Shares [0..3] and [4..6] in batches of 3: [0, 1, 2], [3], [4, 5, 6]."""
    params, root, model, sched = resume
    wanted = sample_manifest(root / "ema.pt", params, "fp32", CPU, World(0, 2))

    def run(out, models):
        gate = threading.Barrier(2)
        worlds = [ThreadWorld(rank, 2, gate=gate) for rank in range(2)]
        threads = [threading.Thread(target=generate_folder, args=(
            models[rank], sched, SHAPE, params, "fp32", out, worlds[rank], wanted))
            for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a rank did not finish within 120 s"

    run(root / "straight", [model, model])
    straight = files(root / "straight")
    assert len(straight) == 7
    staging = root / ".out.partial"
    staging.mkdir()
    (staging / MANIFEST).write_text(json.dumps(wanted))
    for name in ("0.png", "1.png", "2.png", "4.png", "6.png"):  # rank 1's batch is incomplete
        (staging / name).write_bytes(straight[name])
    counting = [Forwards(model), Forwards(model)]
    run(root / "out", counting)
    assert [c.calls for c in counting] == [params.sample.steps] * 2  # [3] and [4, 5, 6]
    assert files(root / "out") == straight


class Diverging(Forwards):
    """The model, whose eps of image `bad` (in its batch) is NaN in forward pass `at` alone: the
    batches before and after that pass are drawn as usual."""

    def __init__(self, model, bad: int, at: int):
        super().__init__(model)
        self.bad, self.at = bad, at

    def __call__(self, x, t):
        eps = super().__call__(x, t)
        if self.calls == self.at:
            assert self.bad < len(eps), "the batch of pass `at` has no image `bad`"
            eps = eps.clone()
            eps[self.bad] = float("nan")
        return eps


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_non_finite_images_are_refused_not_written_black(resume):
    """to_uint8(NaN) is 0: without the check, a NaN image would be a black PNG. The batch with
    one (the 2nd: images 3-5, by its last step) stops the stage in one line naming its images;
    the first batch's images stay for the next run, and no PNG of the bad batch, nor of the
    (good) batch after it, is written. Without the check no error at all (issue 29: the helper's
    own IndexError had stood in for it)."""
    from ddpm.generate import PipelineError
    from ddpm.images import to_uint8
    params, root, model, sched = resume
    assert to_uint8(torch.full((1, 3, 2, 2), float("nan"))).max() == 0  # the silent failure
    steps = params.sample.steps
    diverging = Diverging(model, bad=1, at=2 * steps)
    with pytest.raises(PipelineError) as info:
        generate(diverging, sched, SHAPE, params, "fp32", range(7), root, progress=False)
    assert str(info.value) == (
        "images 3-5 came out NaN or infinite (fp32, ddpm, 8 steps) and were not written: with "
        "fp16 try train.precision=bf16 or fp32; else the EMA weights are bad (retrain)")
    assert diverging.calls == 2 * steps  # stopped at the bad batch's end, before the next one
    assert sorted(p.name for p in root.iterdir()) == ["0.png", "1.png", "2.png", "ema.pt"]


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_an_ema_file_with_non_finite_weights_is_refused(setup):
    params, root = setup
    state = checkpoint.load(root / "ema.pt")
    name = next(iter(state["ema"]))
    state["ema"][name] = state["ema"][name].clone().fill_(float("inf"))
    checkpoint.save(state, root / "bad.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"bad.pt: its EMA weights hold NaN or "
                       f"infinite values \\({re.escape(name)}\\): retrain"):
        load_ema_model(root / "bad.pt", params, CPU)


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_an_interrupt_leaves_the_staging_folder_and_the_stage_says_where(resume):
    """Ctrl-C and SIGTERM (Terminated) pass through generate_folder, which keeps what it drew;
    the stage's line (ddpm.cli, tests/test_cli.py) names that folder."""
    from ddpm.errors import Terminated
    from ddpm.generate import where
    params, root, _, sched = resume
    wanted = sample_manifest(root / "ema.pt", params, "fp32", CPU, World())
    for interrupt in (Terminated, KeyboardInterrupt):
        def stop(x, t, interrupt=interrupt):
            raise interrupt
        with pytest.raises(interrupt):
            generate_folder(stop, sched, SHAPE, params, "fp32", root / "out", World(), wanted)
        assert (root / ".out.partial" / MANIFEST).is_file()
    assert where(root / "out") == (f"; the images drawn so far are kept in {root}/.out.partial "
                                   "for a run with the same EMA weights and params. Run the same "
                                   "command again to draw the rest")


# -- the sampler options, as the sample stage passes them -----------------------------------------

OPTIONS = [dict(sampler="ddpm"), dict(sampler="ddpm", variance="beta_tilde"),
           dict(sampler="ddpm", clip_denoised=True), dict(sampler="ddim"),
           dict(sampler="ddim", eta=0.5), dict(sampler="ddim", eta=1.0, clip_denoised=True)]


def direct(model, sched, params, indices: range, **options) -> np.ndarray:
    """ddpm.diffusion.sample itself with one generator per image, seeded by (seed, i, "sample")
    as the sample stage promises (image i depends on seed and i only): (N, 32, 32, 3) uint8."""
    from ddpm.diffusion import sample
    from ddpm.images import to_uint8
    from ddpm.runtime import derive_seed
    gens = [torch.Generator().manual_seed(derive_seed(params.seed, i, "sample")) for i in indices]
    sp = dataclasses.replace(params.sample, **options)
    x = sample(model, sched, (len(indices), 3, 32, 32), sp.sampler, sp.steps, gens, eta=sp.eta,
               variance=sp.variance, clip_denoised=sp.clip_denoised)
    return to_uint8(x).numpy()


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_generate_samples_with_the_sampler_options_of_params(setup):
    """sample.sampler, eta, variance and clip_denoised reach the sampler: generate() writes, for
    each setting, exactly the images of a direct diffusion.sample with those options and the
    same per-image generators; and each setting gives other images than the rest, so none of
    them is dropped on the way without this test failing."""
    params, root = setup
    model, shape = load_ema_model(root / "ema.pt", params, CPU)
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    outputs = []
    for k, options in enumerate(OPTIONS):
        p = dataclasses.replace(params, sample=dataclasses.replace(params.sample, batch_size=3,
                                                                   **options))
        (root / str(k)).mkdir()
        generate(model, sched, SHAPE, p, "fp32", range(3), root / str(k), progress=False)
        outputs.append(pngs(root / str(k), 3))
        assert np.array_equal(outputs[-1], direct(model, sched, params, range(3), **options)), \
            options
    assert outputs[0].std() > 10
    for a in range(len(OPTIONS)):
        for b in range(a):
            assert not np.array_equal(outputs[a], outputs[b]), (OPTIONS[a], OPTIONS[b])


@pytest.mark.parametrize("setup", ["seed"], indirect=True)
def test_the_sample_stage_draws_with_the_sampler_options_of_params_yaml(setup):
    """stages/sample.py with sampler ddim, eta 0.5 and clip_denoised: the direct sampler's images
    (to one level: the stage runs with its own thread count) and its report says ddim."""
    from fakes import run_stage
    params, root = setup
    options = dict(sampler="ddim", eta=0.5, clip_denoised=True)
    over = {f"{section}__{key}": value for section in ("model", "diffusion", "train", "sample")
            for key, value in params.to_dict()[section].items()}
    over.update({f"sample__{key}": value for key, value in options.items()},
                sample__num_images=4, sample__batch_size=4, train__precision="fp32", device="cpu")
    done = run_stage("sample.py", root, "--ema", "ema.pt", "--out", "out", "--metrics", "m.json",
                     "--report", "r.json", "--grid", "grid.png", **over)
    assert done.returncode == 0, done.stderr
    report = json.loads((root / "r.json").read_text())
    assert (report["sampler"], report["num_images"]) == ("ddim", 4)
    model, shape = load_ema_model(root / "ema.pt", params, CPU)
    sched = Schedule(**dataclasses.asdict(params.diffusion))
    expected = direct(model, sched, params, range(4), **options).astype(int)
    got = pngs(root / "out", 4).astype(int)
    assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99
    other = direct(model, sched, params, range(4), sampler="ddim").astype(int)
    assert np.abs(got - other).max() > 10  # eta and the clip changed the images

"""The res64 preset (presets/res64.yaml): its network builds at 64 px and attends where the preset
says, and the figures that docs/benchmarks.md and the preset's comments quote are the counted
ones (benchmarks/cost.py: each network by its constructor at its image size, FLOP by timing.py's
flops_per_image), so a network change that moves them fails here."""
from __future__ import annotations

import sys

import pytest
import torch
import yaml

from fakes import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import cost  # noqa: E402
import references  # noqa: E402

from ddpm.networks.seed_unet import SeedBlock  # noqa: E402

PRESET_TEXT = (ROOT / "presets/res64.yaml").read_text()
PRESET = yaml.safe_load(PRESET_TEXT)
DOC = (ROOT / "docs/benchmarks.md").read_text()
SECTION = DOC.split("## 64 x 64: the res64 preset\n", 1)[1].split("\n## ", 1)[0]
TFLOPS = 18.9  # the H100's bf16 eager training step, DDPM config, batch 32 (On a GPU)


def flat(text: str) -> str:
    """Comment or paragraph text with its line breaks and comment marks undone."""
    return " ".join(line.strip().lstrip("#").strip() for line in text.splitlines())


def train_flop(config: dict, image_size: int) -> float:
    return cost.counts(config, image_size)[2]


def test_the_preset_is_the_counted_network():
    """params.yaml's model section with the preset's over it (as the composition makes it) is
    references.RES64, at data.resolution 64, and a command that runs it is in its header."""
    model = {**yaml.safe_load((ROOT / "params.yaml").read_text())["model"], **PRESET["model"]}
    assert {key: model[key] for key in references.RES64} == references.RES64
    assert PRESET["data"] == {"resolution": 64}
    assert PRESET_TEXT.startswith("# @package _global_\n")
    assert "#     dvc exp run -S +presets=res64\n" in PRESET_TEXT


def test_the_network_builds_at_64_px_and_attends_at_32_16_and_8():
    torch.manual_seed(0)
    model = cost.build(references.RES64, 64).eval()
    tokens = []
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1]))
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([0, 999])
    with torch.no_grad():
        assert model(x, t).shape == (2, 3, 64, 64)
    assert sorted(tokens) == [8 * 8, 16 * 16, 32 * 32]
    blocks = sum(isinstance(m, SeedBlock) for m in model.modules())
    seed_blocks = sum(isinstance(m, SeedBlock) for m in cost.build(references.SEED, 32).modules())
    assert f"has {blocks} blocks to the seed's {seed_blocks}" in flat(SECTION)


def test_the_docs_table_is_the_counted_one():
    """Parameters exactly, GFLOP to the hundredth, EFLOP and hours as printed, at the rate the
    GPU table records (18.9 TFLOP/s), by the command the section gives."""
    assert f"| achieved FLOP/s of that step (37.5 GFLOP/img) | bf16 | {TFLOPS} TFLOP/s |" in DOC
    assert f"python benchmarks/cost.py --tflops {TFLOPS}" in SECTION
    assert cost.table(TFLOPS) in SECTION
    assert "| res64 preset | 64 | 42,684,771 | 34.22 | 102.64 |" in SECTION  # the table's row


def test_the_docs_ratios_and_range_are_the_counted_ones():
    """The text after the table: ratios to the seed, and the hours at the slowest and fastest
    training rates the GPU table records (the former default eager: 288 images/s at about 27
    GFLOP; the DDPM config compiled: 947 images/s at 37.5 GFLOP)."""
    text = flat(SECTION)
    seed, res64 = cost.counts(references.SEED, 32), cost.counts(references.RES64, 64)
    assert f"costs {res64[2] / seed[2]:.2f}x the seed's 32 px one" in text
    assert f"for {res64[0] / seed[0]:.2f}x the parameters" in text
    assert f"for {res64[2] / seed[2]:.2f}x the work" in text
    assert "trained at 288 images/s" in DOC and "a similar 27 GFLOP" in flat(DOC)
    assert "| 947 img/s | 683 img/s (eager) |" in DOC
    slow, fast = 288 * 27e9, 947 * 37.5e9
    assert f"span {slow / 1e12:.1f} TFLOP/s" in text and f"to {fast / 1e12:.1f} TFLOP/s" in text
    hours = [res64[2] * cost.IMAGES / rate / 3600 for rate in (fast, slow)]
    assert f"between {hours[0]:.0f} and {hours[1]:.0f} hours" in text


def test_the_preset_comments_are_the_counted_figures():
    text = flat(PRESET_TEXT)
    seed, res64 = cost.counts(references.SEED, 32), cost.counts(references.RES64, 64)
    assert (f"{res64[0]:,} parameters, {res64[2] / 1e9:.2f} GFLOP a training image, "
            f"{res64[2] / seed[2]:.2f}x the seed's at 32 px") in text


@pytest.mark.parametrize("change, quoted", [
    (dict(channels=[128, 256, 384, 512, 512]), "improved-diffusion's 128: {:.2f}x"),
    (dict(res_blocks=3), "not the papers' 3, which would cost {:.2f}x a training image"),
])
def test_the_alternatives_the_preset_weighs(change, quoted):
    """The cost of the papers' base width and blocks per level in this network, against the
    preset's, as its comments quote them."""
    ratio = train_flop({**references.RES64, **change}, 64) / train_flop(references.RES64, 64)
    assert quoted.format(ratio) in flat(PRESET_TEXT)

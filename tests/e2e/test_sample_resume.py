"""The sample stage under dvc resumes after a kill -9: the images drawn before it are kept when the
EMA weights and params are the same, and the output is byte-identical to an uninterrupted run's;
with other params it starts clean and says why."""
from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from dvc_repo import dvc, dvc_killed_when, sh

pytestmark = pytest.mark.e2e

N = 24  # in batches of 3: eight of them, so a kill after half of them lands mid-run


def set_sample(repo, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sample"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def drawn(repo, steps: int) -> int:
    """PNGs in the staging folder of a run of `steps` sampling steps (0 before it starts)."""
    staging = repo / "data/.samples.partial"
    try:
        if json.loads((staging / "manifest.json").read_text())["sample.steps"] != steps:
            return 0
        return sum(1 for _ in staging.glob("*.png"))
    except (OSError, ValueError):  # not there yet, or being replaced
        return 0


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_kill_then_repro_keeps_the_drawn_images_and_ends_byte_identical(reproduced, sampler):
    repo, _ = reproduced
    set_sample(repo, sampler=sampler, num_images=N, batch_size=3, steps=12)
    dvc_killed_when(repo, ("repro", "sample"), lambda: drawn(repo, 12) >= 3)

    # Other params after a kill: the drawn images are discarded, with the reason.
    set_sample(repo, steps=10)
    out = dvc_killed_when(repo, ("repro", "sample"), lambda: drawn(repo, 10) >= N // 2)
    assert re.search(r"sample: discarding [1-9]\d* images of an interrupted run in "
                     r"data/\.samples\.partial: other sample\.steps \(12, now 10\); drawing all 24",
                     out), out
    kept_before = drawn(repo, 10)
    assert N // 2 <= kept_before < N

    out = dvc(repo, "repro").stdout
    found = re.search(r"sample: kept (\d+) of 24 images from an interrupted run \(same EMA weights "
                      r"and params\); drawing (\d+)", out)
    assert found, out
    kept = int(found.group(1))
    assert kept_before - 3 <= kept <= kept_before and kept % 3 == 0  # whole batches
    assert int(found.group(2)) == N - kept
    assert f"sample: 24 images ({sampler}, 10 steps, {kept} kept from an interrupted run)" in out
    assert json.loads((repo / "reports/sample.json").read_text())["kept_images"] == kept
    assert "Running stage 'fid'" in out
    resumed = {p.name: p.read_bytes() for p in (repo / "data/samples").iterdir()}
    assert sorted(resumed) == sorted(f"{i}.png" for i in range(N))
    assert not (repo / "data/.samples.partial").exists()

    out = sh(repo, sys.executable, "stages/sample.py", "--ema", "models/ema.pt", "--out", "ref",
             "--metrics", "ref.json", "--report", "ref_report.json", "--grid", "ref.png").stdout
    assert f"sample: 24 images ({sampler}, 10 steps) in" in out and "kept" not in out, out
    assert {p.name: p.read_bytes() for p in (repo / "ref").iterdir()} == resumed

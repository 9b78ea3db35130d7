"""Outputs appear whole and follow the user's umask, like files that any other tool writes."""
from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from fakes import ROOT

WRITE_ALL = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from ddpm import checkpoint
from ddpm.files import atomic_dir, write_json, write_tsv
out = Path(sys.argv[2])
write_json(out / "metrics" / "train.json", {"loss": 1.0})
write_tsv(out / "loss.tsv", ["step", "loss"], [[1, 0.5]])
checkpoint.save({"w": torch.zeros(1)}, out / "models" / "last.pt")
with atomic_dir(out / "pngs") as staging:
    (staging / "0.png").write_bytes(b"png")
"""


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_modes_the_umask_gives_any_file(tmp_path, umask):
    """mkstemp and mkdtemp make 0600 and 0700; what they stage comes out as open() and mkdir()
    would have made it under the process's umask (0644 and 0755 under 022)."""
    subprocess.run([sys.executable, "-c", WRITE_ALL, str(ROOT / "src"), str(tmp_path)],
                   check=True, umask=umask, timeout=120)
    for name in ("metrics/train.json", "loss.tsv", "models/last.pt", "pngs/0.png"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    for name in ("metrics", "models", "pngs"):
        assert mode(tmp_path / name) == 0o777 & ~umask, name
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporary left behind


def test_equal_checkpoints_are_equal_bytes_wherever_they_are_written(tmp_path):
    """The bytes of a checkpoint depend on its state alone, not on the (temporary) file name, so
    that DVC sees a re-run that ends at once as no change (tests/e2e/test_fid_change.py)."""
    import torch

    from ddpm import checkpoint
    state = {"ema": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"seed": 0}, "epochs": 2}
    checkpoint.save(state, tmp_path / "a" / "ema.pt")
    checkpoint.save(state, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a/ema.pt").read_bytes() == (tmp_path / "b/other.pt").read_bytes()
    assert torch.equal(checkpoint.load(tmp_path / "b/other.pt")["ema"]["w"], state["ema"]["w"])

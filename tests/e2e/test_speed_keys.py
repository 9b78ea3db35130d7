"""A batch size that changes only the speed (ddpm.params.speed_only_keys) re-runs only the stages
that compute at that speed, never train: no restart of a training run, no "Running stage
'train'" for a change that cannot change the weights."""
from __future__ import annotations

import pytest

from dvc_repo import dvc

pytestmark = pytest.mark.e2e


def test_a_sampling_or_fid_batch_size_does_not_rerun_train(reproduced, tiny):
    repo, _ = reproduced
    out = dvc(repo, "exp", "run", "-S", f"sample.batch_size={tiny['sample']['batch_size'] - 2}"
              ).stdout
    assert "Running stage 'sample'" in out, out
    assert "Stage 'train' didn't change, skipping" in out and "Running stage 'train'" not in out

    out = dvc(repo, "exp", "run", "-S", f"fid.batch_size={tiny['fid']['batch_size'] // 2}").stdout
    for stage in ("real_stats", "fid"):  # they compute features at that batch size
        assert f"Running stage '{stage}'" in out, out
    assert "Stage 'train' didn't change, skipping" in out and "Running stage 'train'" not in out

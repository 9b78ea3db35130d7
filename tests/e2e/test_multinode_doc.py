"""docs/gpu.md's several-nodes commands, run as written on one machine: two torchrun agents (the
two "nodes") of one CPU process each meet at a local endpoint, train with gloo, and DVC records
the result. Only the node values change: the endpoint and the processes per node."""
from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess

import pytest
import yaml

from dvc_repo import ROOT, dvc, env, sh

pytestmark = pytest.mark.e2e

ENDPOINT, PROCESSES = "--rdzv_endpoint=node0.example:29500", "--nproc_per_node=8"


def documented() -> list[str]:
    """The commands of docs/gpu.md's code block that starts torchrun: continuation lines joined,
    comments dropped."""
    blocks = re.findall(r"(?:^    .*\n)+", (ROOT / "docs/gpu.md").read_text(), re.MULTILINE)
    block = next(b for b in blocks if "torchrun " in b)
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [" ".join(line.split()) for line in lines if line]


def stage_arguments() -> list[str]:
    """The train stage's arguments after its script, as dvc.yaml's cmd has them."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    text = spec["stages"]["train"]["cmd"]
    for name, value in spec["vars"][0]["paths"].items():
        text = text.replace(f"${{paths.{name}}}", value)
    return shlex.split(text)[2:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_documented_command_passes_the_train_stage_its_arguments():
    repro, torchrun, commit = documented()
    assert repro == "dvc repro real_stats" and commit == "dvc commit -f train"
    words = shlex.split(torchrun)
    assert words[0] == "torchrun" and ENDPOINT in words and PROCESSES in words
    assert words[words.index("stages/train.py") + 1:] == stage_arguments()


def test_two_nodes_train_one_run_and_dvc_commit_records_it(reproduced, tiny):
    repo, _ = reproduced
    repro, torchrun, commit = documented()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = tiny["train"]["lr"] / 2  # another run: trained from the start
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, *shlex.split(repro))
    node = torchrun.replace(ENDPOINT, f"--rdzv_endpoint=127.0.0.1:{free_port()}").replace(
        PROCESSES, "--nproc_per_node=1")
    nodes = [subprocess.Popen(shlex.split(node), cwd=repo, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)
    assert "(train.lr differ); starting fresh" in logs[0] + logs[1]  # not the old run resumed
    assert "(2 process(es) x 1 round(s) x 8)" in logs[0] + logs[1]
    metrics = json.loads((repo / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == tiny["train"]["epochs"]
    sh(repo, *shlex.split(commit))
    assert "up to date" in dvc(repo, "status", "train").stdout
    out = dvc(repo, "repro").stdout
    assert "Stage 'train' didn't change, skipping" in out, out
    assert "Running stage 'sample'" in out and "Running stage 'fid'" in out, out

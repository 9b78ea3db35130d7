"""Small files that declare gigabytes (issue #30): memory is bounded by what a file declares,
checked before anything is allocated (docs/trust.md).

Each bomb goes through the stage (or command) that reads it, in a child process whose data
segment is capped (RLIMIT_DATA, CAP) and whose peak RSS is measured (os.wait4). The bound: the
peak of the same command refused a 100-byte garbage file in the bomb's place (its imports:
~0.6-0.8 GB with torch here) plus MARGIN. Each bomb inflates or declares at least 1 GiB, which the
unguarded loader allocates (torch.load of the 1 MB ema.pt bomb peaked at 1.57 GB, np.load of the
1 MB npz at 1.08 GB; the 460-byte npz declaring 8 TiB ended in a MemoryError traceback).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import hostile
from fakes import ROOT

CAP = 2 << 30        # bytes of data segment each child may have: a bomb that got through would
                     # stop here (or at its MemoryError), never reach the machine's memory
MARGIN = 64 << 20    # bytes a bomb's run may peak above the same run refused a garbage file
BOMB = 1 << 30       # bytes each bomb inflates to or declares (about 1 MB on disk)


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))


def capped(argv: list[str], cwd: Path) -> tuple[int, str, int]:
    """Run argv under CAP: (exit code, stdout + stderr, peak RSS in bytes of it and its waited-for
    children). A run of over 300 s is killed."""
    out_path = cwd / ".capped.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_cap, env={**os.environ, "OMP_NUM_THREADS": "1"})
        timer = threading.Timer(300, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out_path.read_text(errors="replace"), usage.ru_maxrss * 1024


def refused(argv: list[str], cwd: Path, bomb: Path, code: int = 1) -> None:
    """argv with the bomb in place: exit `code`, one `error:` line naming the bomb, no traceback,
    and a peak RSS within MARGIN of the same run with 100 bytes of garbage in the bomb's place."""
    garbage = bomb.with_name("garbage" + bomb.suffix)
    garbage.write_bytes(b"\x00" * 100)
    base_code, base_out, base_peak = capped([str(garbage) if a == str(bomb) else a
                                             for a in argv], cwd)
    assert base_code == code, base_out
    exit_code, out, peak = capped(argv, cwd)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert exit_code == code and len(errors) == 1 and str(bomb) in errors[0], out
    assert "Traceback" not in out, out
    assert peak < base_peak + MARGIN, (f"peak {peak / 2**20:.0f} MiB, garbage's "
                                       f"{base_peak / 2**20:.0f} MiB", out)


@pytest.fixture
def params_dir(tmp_path, tiny) -> Path:
    """A working folder with the tiny params.yaml (what the stage scripts read)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny))
    return tmp_path


def stage(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / name)]


def test_an_ema_file_of_deflated_zeros_is_refused_unread(params_dir):
    """1 MB of models/ema.pt whose storage is a deflated GiB: through stages/sample.py and
    `python -m ddpm sample`."""
    bomb = hostile.torch_zip_bomb(params_dir / "ema.pt", BOMB)
    out = ["--out", "samples", "--metrics", "m.json", "--report", "r.json", "--grid", "g.png"]
    refused([*stage("sample.py"), "--ema", str(bomb), *out], params_dir, bomb)
    refused([sys.executable, "-m", "ddpm", "sample", str(bomb), "--out", "drawn"], params_dir,
            bomb)
    assert not (params_dir / "samples").exists() and not (params_dir / "drawn").exists()


RESUME = """
import sys
sys.path.insert(0, {src!r})
from pathlib import Path
from ddpm.runs import RunFolders
found, notes = RunFolders(Path("published"), Path("work")).resumable({{}}, 1)
assert found is None
print("\\n".join("error: " + note for note in notes))
sys.exit(1)
"""


def test_a_training_checkpoint_of_deflated_zeros_is_not_resumed(tmp_path):
    """models/runs/<id>/last.pt as a deflated GiB: ddpm.runs skips it, naming it, unread."""
    (tmp_path / "work").mkdir()
    hostile.torch_zip_bomb(tmp_path / "work" / "last.pt", BOMB, state="model")
    script = RESUME.format(src=str(ROOT / "src"))
    garbage = tmp_path / "garbage"
    (garbage / "work").mkdir(parents=True)
    (garbage / "work" / "last.pt").write_bytes(b"\x00" * 100)
    _, base_out, base_peak = capped([sys.executable, "-c", script], garbage)
    assert "not resumed" in base_out
    code, out, peak = capped([sys.executable, "-c", script], tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, out
    assert "work/last.pt: not a readable checkpoint" in errors[0] and "compressed" in errors[0]
    assert peak < base_peak + MARGIN, (peak, base_peak)


def pngs(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


def test_inception_weights_of_deflated_zeros_are_refused_unread(tmp_path, tiny):
    """A .pth as fid.weights, 1 MB deflating to a GiB: the real_stats stage refuses it unread."""
    bomb = hostile.torch_zip_bomb(tmp_path / "inception.pth", BOMB, state="Conv2d_1a_3x3")
    pngs(tmp_path / "real")
    for weights in (bomb, bomb.with_name("garbage.pth")):
        folder = tmp_path / weights.stem
        folder.mkdir()
        params = dict(tiny, fid=dict(tiny["fid"], weights=str(weights)))
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
    bomb.with_name("garbage.pth").write_bytes(b"\x00" * 100)
    argv = [*stage("real_stats.py"), "--images", str(tmp_path / "real"), "--out", "stats.npz"]
    _, base_out, base_peak = capped(argv, tmp_path / "garbage")
    assert "garbage.pth" in base_out
    code, out, peak = capped(argv, tmp_path / "inception")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and str(bomb) in errors[0], out
    assert "compressed" in errors[0] and "Traceback" not in out
    assert peak < base_peak + MARGIN, (peak, base_peak)


@pytest.mark.parametrize("kind", ["deflated 1 GiB", "8 TiB declared"])
def test_real_stats_that_declare_more_than_fid_dims_are_refused_unread(params_dir, kind):
    """data/real_stats.npz: 1 MB whose mu.npy inflates to a GiB, and 460 bytes whose headers
    declare 8 TiB: the fid stage refuses either before reading the data, in one line."""
    bomb = params_dir / "real_stats.npz"
    if kind == "deflated 1 GiB":
        hostile.npz_bomb(bomb, BOMB // 8)
    else:
        hostile.npz_declaring(bomb, (1 << 40,))
    pngs(params_dir / "samples")
    refused([*stage("fid.py"), "--images", "samples", "--real-stats", str(bomb), "--metrics",
             "m.json", "--report", "r.json"], params_dir, bomb)
    assert not (params_dir / "m.json").exists()


def test_a_dataset_array_declaring_terabytes_is_one_line(params_dir):
    """data/dataset/train.npy whose header (and dataset.json) declare 10^9 images, 3 TB, in 128
    bytes: the export_real stage refuses it before mapping it, at the peak of a garbage file's
    run (the stage's imports) plus MARGIN."""
    n = 10 ** 9
    meta = {"format": 1, "source": "cifar10", "channels": 3, "height": 32, "width": 32,
            "classes": [], "splits": {"train": {"images": n}, "test": {"images": n}}}
    for name, content in (("garbage", b"\x00" * 100),
                          ("dataset", hostile.npy_header((n, 3, 32, 32), "|u1"))):
        (params_dir / name).mkdir()
        (params_dir / name / "dataset.json").write_text(json.dumps(meta))
        (params_dir / name / "train.npy").write_bytes(content)
    params = yaml.safe_load((params_dir / "params.yaml").read_text())
    params["data"].update(real_split="train")
    (params_dir / "params.yaml").write_text(yaml.safe_dump(params))
    base_code, base_out, base_peak = capped(
        [*stage("export_real.py"), "--data", "garbage", "--out", "real"], params_dir)
    assert base_code == 1, base_out
    code, out, peak = capped([*stage("export_real.py"), "--data", "dataset", "--out", "real"],
                             params_dir)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "dataset/train.npy" in errors[0], out
    assert "its header declares" in errors[0] and "Traceback" not in out
    assert peak < base_peak + MARGIN, (peak, base_peak)  # not the array's 3 TB


def test_a_batch_pickle_cannot_ask_numpy_for_an_array_it_does_not_hold(tmp_path):
    """A CIFAR-10 batch whose ndarray is rebuilt with a 1 TiB shape (numpy's own pickles say
    (0,) and fill it from bytes they hold): refused before numpy allocates, in one line."""
    import pickle

    from ddpm.data import read_batch
    from ddpm.errors import PipelineError
    good = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)
    shape = pickle.BININT1 + b"\x00" + pickle.TUPLE1  # the (0,) of _reconstruct's arguments
    assert good.count(shape) == 1
    path = tmp_path / "data_batch_1"
    tib = (pickle.BININT + (1 << 30).to_bytes(4, "little")  # (2^30, 1024) bytes
           + pickle.BININT2 + (1024).to_bytes(2, "little") + pickle.TUPLE2)
    path.write_bytes(good.replace(shape, tib))
    with pytest.raises(PipelineError, match="data_batch_1: not a CIFAR-10 batch file .*shape"):
        read_batch(path)


def test_an_archive_of_many_headers_stops_at_its_hundred_and_first(tmp_path):
    """tarfile keeps every header it reads (a 1 MB .tar.gz of empty members holds a million): the
    CIFAR-10 archive (9 entries) stops at its 101st, as it is read, not after reading them all."""
    from ddpm.data import extract_cifar10
    from ddpm.errors import PipelineError
    archive = hostile.tar_gz(tmp_path / "many.tar.gz",
                             [(f"cifar-10-batches-py/{i}", b"") for i in range(200)])
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError, match="many.tar.gz: more than 100 members"):
        extract_cifar10(archive, tmp_path / "out")

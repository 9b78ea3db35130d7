"""Issue 30: a typo in a path, a URL that does not parse, more processes than cores and a URL's
credentials stop check_params in one line naming the key (exit code 2, no marker), before DVC
deletes an output; a URL's credentials appear in no message (ddpm.locations)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from fakes import ROOT, committed_params

SECRET = "s3cret-Pa55"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
LONG = "x" * 300  # a name over the 255 bytes a Linux filesystem allows
NO_SUCH = "no such file here (a relative path starts at the repository root"
TOO_LONG = "(302 characters): cannot be looked up (File name too long)"
FIFO = "not a regular file (a FIFO, socket or device), left unopened"

# (id, overrides as {dotted key: value}, what the line says after "error: params.yaml: ")
CASES = [
    ("url-typo", {"data.url": "cifar-typo.tar.gz"}, f"data.url = 'cifar-typo.tar.gz': {NO_SUCH}"),
    ("source-typo", {"data.source": "data/petz"},
     "data.source = 'data/petz': no such folder or file here"),
    ("weights-typo", {"fid.weights": "missing.pth"}, f"fid.weights = 'missing.pth': {NO_SUCH}"),
    ("url-folder", {"data.url": "folder"}, "data.url = 'folder': a folder; expected a file"),
    ("weights-folder", {"fid.weights": "folder"},
     "fid.weights = 'folder': a folder; expected a file"),
    ("url-fifo", {"data.url": "fifo.tar.gz"}, f"data.url = 'fifo.tar.gz': {FIFO}"),
    ("weights-fifo", {"fid.weights": "fifo.tar.gz"}, f"fid.weights = 'fifo.tar.gz': {FIFO}"),
    ("source-fifo", {"data.source": "fifo.tar.gz"},
     "data.source = 'fifo.tar.gz': neither a folder nor a regular file (a FIFO, socket or "
     "device), left unopened"),
    ("url-space", {"data.url": "http://a b/x"},
     "data.url = 'http://a b/x': a URL holds no spaces or control characters"),
    ("url-bracket", {"data.url": "http://[::1/x"},
     "data.url = 'http://[::1/x': not a valid URL (Invalid IPv6 URL)"),
    ("url-port", {"data.url": "http://localhost:abc/x"},
     "data.url = 'http://localhost:abc/x': not a valid URL (Port could not be cast to integer"),
    ("source-space", {"data.source": "http://a b/x.zip"},
     "data.source = 'http://a b/x.zip': a URL holds no spaces"),
    ("source-bracket", {"data.source": "http://[::1/x.zip"},
     "data.source = 'http://[::1/x.zip': not a valid URL (Invalid IPv6 URL)"),
    ("source-port", {"data.source": "http://localhost:abc/x.zip"},
     "data.source = 'http://localhost:abc/x.zip': not a valid URL (Port could not be cast"),
    ("url-scheme", {"data.url": "ftp://example.com/c.tar.gz"},
     "data.url = 'ftp://example.com/c.tar.gz': expected an http(s) URL, a file:// URL or a local "
     "path; ftp:// is not fetched here"),
    ("weights-url", {"fid.weights": "https://example.com/w.pth"},
     "fid.weights = 'https://example.com/w.pth': expected a local path; https:// is not fetched"),
    ("url-long", {"data.url": LONG}, f"data.url = '{'x' * 39}... {TOO_LONG}"),
    ("source-long", {"data.source": LONG}, f"data.source = '{'x' * 39}... {TOO_LONG}"),
    ("weights-long", {"fid.weights": LONG}, f"fid.weights = '{'x' * 39}... {TOO_LONG}"),
    ("url-file-typo", {"data.url": "file:///nowhere/cifar.tar.gz"},
     f"data.url = 'file:///nowhere/cifar.tar.gz': {NO_SUCH}"),
    ("weights-env", {"fid.weights": "${oc.env:TOKEN}"},
     "fid.weights = '${oc.env:TOKEN}': no such file here (a relative path starts at the "
     "repository root, where DVC runs the stages); params.yaml takes plain values"),
    ("url-credentials", {"data.url": f"https://user:{SECRET}@example.com/c.tar.gz"},
     "data.url = 'https://***@example.com/c.tar.gz': a user or password in a URL is refused"),
    ("source-credentials", {"data.source": f"https://{SECRET}@example.com/pets.zip"},
     "data.source = 'https://***@example.com/pets.zip': a user or password in a URL is refused"),
    ("gpus-cpu", {"device": "cpu", "train.gpus": CORES + 1, "train.batch_size": CORES + 1,
                  "train.batch_gpu": 1},
     f"train.gpus = {CORES + 1}, but the device is the CPU and this process may use {CORES} "
     f"core(s): at most {CORES} processes (one per core)"),
    ("passes", {"device": "cpu", "train.gpus": CORES, "train.batch_size": 128 * CORES,
                "data.url": "folder/cifar.tar.gz", "fid.weights": "file.pth"}, None),
]

# check_params' main through ddpm.cli.run, as `python stages/check_params.py --out ok` runs it,
# once per case in its own folder, all in one process (each stage process pays torch's import).
DRIVER = """
import contextlib, io, json, os, runpy, sys
sys.path.insert(0, os.path.join(sys.argv[1], "stages"))
main = runpy.run_path(os.path.join(sys.argv[1], "stages", "check_params.py"), run_name="x")["main"]
from ddpm.cli import run
results = {}
for case in sys.argv[2:]:
    os.chdir(case)
    sys.argv = ["check_params.py", "--out", "ok"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run(main)
            code = 0
        except SystemExit as e:
            code = e.code
    results[os.path.basename(case)] = [code, err.getvalue(), os.path.exists("ok")]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict[str, list]:
    """{case id: [exit code, stderr, marker written]} of check_params in each case's folder,
    which holds a folder, a regular file and a FIFO."""
    root = tmp_path_factory.mktemp("cases")
    folders = []
    for name, overrides, _ in CASES:
        case = root / name
        (case / "folder").mkdir(parents=True)
        (case / "folder/cifar.tar.gz").write_bytes(b"not checked here: the data stage's md5")
        (case / "file.pth").write_bytes(b"not read by check_params")
        os.mkfifo(case / "fifo.tar.gz")
        params = committed_params()
        for key, value in overrides.items():
            section, _, leaf = key.rpartition(".")
            (params[section] if section else params)[leaf] = value
        (case / "params.yaml").write_text(yaml.safe_dump(params))
        folders.append(str(case))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), *folders],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("name, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_check_params_stops_a_bad_path_or_url_in_one_line(checked, name, overrides, message):
    code, stderr, marker = checked[name]
    if message is None:
        assert code == 0 and marker, stderr
        return
    assert code == 2 and not marker, stderr
    assert stderr.startswith(f"error: params.yaml: {message}"), stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert SECRET not in stderr


def test_check_hardware_bounds_cpu_processes_by_the_cores(monkeypatch):
    """On the CPU, train.gpus processes are at most one per core (as on GPUs one per GPU)."""
    from ddpm import runtime
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    assert runtime.check_hardware("cpu", "fp32", 2) == "cpu, fp32"
    with pytest.raises(runtime.ParamsError, match=r"^train.gpus = 3, but the device is the CPU "
                                                  r"and this process may use 2 core\(s\)"):
        runtime.check_hardware("cpu", "fp32", 3)


@pytest.mark.parametrize("text, masked", [
    ("could not download https://user:pw@host/a.tgz (x)",
     "could not download https://***@host/a.tgz (x)"),
    ("https://tok@host/a", "https://***@host/a"),
    ("'http://u:p@ss@host:8/a@b'", "'http://***@host:8/a@b'"),  # an unescaped @ in the password
    ("http://host/a@b and data/pets", "http://host/a@b and data/pets"),  # no credentials
])
def test_mask_hides_a_urls_credentials(text, masked):
    from ddpm.locations import mask
    assert mask(text) == masked


def test_a_failed_download_shows_no_password(tmp_path, capfd):
    """http.client quotes the host with the password in its error (`nonnumeric port:
    's3cret@host'`); neither the error of each download nor the progress bar shows it."""
    from ddpm import data, files, sources
    from ddpm.errors import PipelineError
    from ddpm.params import DataParams
    url = f"http://user:{SECRET}@localhost/x.tar.gz"
    with pytest.raises(OSError) as raw:
        files.download(url, tmp_path / "x", 1 << 20)
    assert SECRET not in str(raw.value)
    with pytest.raises(PipelineError) as cifar:
        data.download_cifar10(url, "0" * 32, tmp_path / "cifar10")
    assert str(cifar.value).startswith("could not download http://***@localhost/x.tar.gz (")
    folder = DataParams(url=url, md5="", real_split="train", limit=0, source=url.replace(
        "x.tar.gz", "pets.zip"), resolution=32)
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError) as images:
        sources.prepare(folder, tmp_path / "out", {"source": folder.source})
    assert str(images.value).startswith("could not download http://***@localhost/pets.zip (")
    for message in (str(cifar.value), str(images.value), *capfd.readouterr()):
        assert SECRET not in message
    assert not (tmp_path / "cifar10").exists()

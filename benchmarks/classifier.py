"""A small CIFAR-10 classifier, to measure whether class-conditional samples look like their class.

    python benchmarks/classifier.py train --archive ../shared/data/cifar10-real-subset/\
cifar-10-python.tar.gz --weights scratch/classifier.pt --out benchmarks/results/classifier.json
    python benchmarks/classifier.py score --weights scratch/classifier.pt --folder data/samples \
--labels balanced --classes 10 --out benchmarks/results/classifier_samples.json

train: a ResNet-9-like CNN (BatchNorm, about 0.4M parameters at --width 16) trained from a fixed
seed on the archive's training split (random 4-pixel-padded crops and horizontal flips), then
scored on its test split (overall, per class, and the histogram of the classes it predicts).
The archive is the official cifar-10-python.tar.gz format, read by the pipeline's own reader
(ddpm.data); an already extracted cifar-10-batches-py folder also works.

score: the classes the network predicts for a folder of 32x32 RGB PNGs (i.png is image i). With
--labels balanced (sample.labels: balanced), image i's intended class is i mod --classes; with
--labels-file, element i of a JSON list of ints; with --labels none, only the histogram of the
predicted classes (unconditional samples). Chance is 1 / classes.

Predictions average the logits of the image and of its mirror image. On the CPU a run is
deterministic for a given seed and number of threads (--threads).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import record  # noqa: E402  (the script's folder is on the path)
from ddpm.data import class_names, extract_cifar10, load_cifar10  # noqa: E402
from ddpm.errors import PipelineError  # noqa: E402
from ddpm.files import file_digest  # noqa: E402
from ddpm.images import list_pngs, read_png  # noqa: E402

EVAL_BATCH = 256


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
              nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Classifier(nn.Module):
    """ResNet-9 (Page's DAWNBench network) at width w instead of 64: w, 2w (+res), 4w, 8w (+res),
    global max pool, linear, logits scaled by 1/8 as Page's. Takes uint8 or [0, 255] float images
    (N, 3, 32, 32) and normalises them with the training split's channel mean and std, kept as
    buffers in the state_dict."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.net = nn.Sequential(
            conv_bn(3, w), conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True), conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std) * 0.125


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the reflect-padded images and random horizontal flips, per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 3, 32, 32) uint8 -> (N, classes) logits, averaged over the image and its mirror."""
    model.eval()
    images = torch.as_tensor(images)
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        x = images[start:start + EVAL_BATCH].float()
        out.append((model(x) + model(x.flip(-1))) / 2)
    return torch.cat(out) if out else torch.zeros(0, model.net[-1].out_features)


def report(pred: np.ndarray, labels: np.ndarray | None, names: list[str]) -> dict:
    """Accuracy (if labels), per-class accuracy and confusion matrix, predicted-class histogram."""
    k = len(names)
    counts = np.bincount(pred, minlength=k)
    p = counts / max(len(pred), 1)
    entropy = -sum(q * math.log2(q) for q in p if q > 0)
    out = {"num_images": int(len(pred)),
           "predicted_histogram": {name: int(c) for name, c in zip(names, counts)},
           "predicted_fraction": {name: round(float(q), 4) for name, q in zip(names, p)},
           "predicted_entropy_bits": round(entropy, 4), "max_entropy_bits": round(math.log2(k), 4)}
    if labels is None:
        return out
    correct = pred == labels
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for c, name in enumerate(names):
        n = int((labels == c).sum())
        per_class[name] = {"num": n, "correct": int(correct[labels == c].sum()),
                           "accuracy": round(float(correct[labels == c].mean()), 4) if n else None}
    return {"accuracy": round(float(correct.mean()), 4), "correct": int(correct.sum()),
            "chance": round(1 / k, 4), **out, "per_class": per_class,
            "confusion_rows_true_cols_predicted": confusion.tolist()}


def print_table(result: dict, title: str) -> None:
    print(title)
    per_class = result.get("per_class")
    print("| class | " + ("images | accuracy | " if per_class else "") + "predicted |")
    print("| --- | " + ("---: | ---: | " if per_class else "") + "---: |")
    for name, count in result["predicted_histogram"].items():
        row = f"| {name} | "
        if per_class:
            acc = per_class[name]["accuracy"]
            row += f"{per_class[name]['num']} | {'n/a' if acc is None else f'{acc:.1%}'} | "
        print(row + f"{count} ({result['predicted_fraction'][name]:.1%}) |")
    if "accuracy" in result:
        print(f"accuracy {result['accuracy']:.2%} ({result['correct']}/{result['num_images']}), "
              f"chance {result['chance']:.0%}")
    print(f"predicted-class entropy {result['predicted_entropy_bits']:.3f} bits "
          f"(uniform: {result['max_entropy_bits']:.3f})", flush=True)


def read_cifar(archive: Path, tmp: str) -> Path:
    """The extracted cifar-10-batches-py folder of an archive (or the folder itself)."""
    if archive.is_dir():
        return archive
    out = Path(tmp) / "cifar-10-batches-py"
    out.mkdir()
    extract_cifar10(archive, out)  # only the seven batch files, by name; no links, no ../
    return out


def load_weights(path: Path) -> tuple[Classifier, list[str], dict]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = Classifier(saved["width"], len(saved["classes"]))
    model.load_state_dict(saved["state_dict"])
    return model.eval(), list(saved["classes"]), saved


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cifar = read_cifar(args.archive, tmp)
        x_train, y_train = load_cifar10(cifar, "train", args.limit, labels=True)
        x_test, y_test = load_cifar10(cifar, "test", labels=True)
        names = class_names(cifar)
    x_train, y_train = torch.from_numpy(x_train).float(), torch.from_numpy(y_train)
    model = Classifier(args.width, len(names))
    model.mean.copy_(x_train.mean(dim=(0, 2, 3)).view(1, 3, 1, 1))
    model.std.copy_(x_train.std(dim=(0, 2, 3)).view(1, 3, 1, 1))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25,
        anneal_strategy="linear", div_factor=20, final_div_factor=50)
    print(f"{len(x_train)} training and {len(x_test)} test images; {parameters(model):,} "
          f"parameters; {args.epochs} epochs of {steps_per_epoch} steps; "
          f"{torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, right, seen = 0.0, 0, 0
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            x, y = augment(x_train[idx], gen), y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            right += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        row = {"epoch": epoch, "loss": round(total / seen, 4), "train_accuracy":
               round(right / seen, 4), "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        print(f"epoch {epoch}: loss {row['loss']:.3f}, train accuracy (augmented) "
              f"{row['train_accuracy']:.1%}, {row['seconds']:.0f} s", flush=True)
    train_seconds = time.perf_counter() - start
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "classes": names, "width": args.width,
                "seed": args.seed, "epochs": args.epochs}, args.weights)
    test = report(predict(model, x_test).argmax(1).numpy(), y_test, names)
    print_table(test, f"test split ({len(x_test)} real images):")
    return {
        **record.machine(torch.device("cpu")), "command": "train", "argv": args.argv,
        "test_accuracy": test["accuracy"], "train_seconds": round(train_seconds, 1),
        "archive": str(args.archive),
        "archive_md5": None if args.archive.is_dir() else file_digest(args.archive, "md5"),
        "num_train": len(x_train), "num_test": len(x_test), "classes": names,
        "model": {"arch": "resnet9", "width": args.width, "parameters": parameters(model)},
        "training": {"seed": args.seed, "epochs": args.epochs, "batch": args.batch,
                     "max_lr": args.lr, "schedule": "one-cycle, linear",
                     "optimizer": "SGD nesterov 0.9", "weight_decay": args.weight_decay,
                     "label_smoothing": args.label_smoothing,
                     "augmentation": "reflect-pad 4 + random 32x32 crop, horizontal flip",
                     "test_time": "mean logits of image and mirror"},
        "weights": str(args.weights), "weights_sha256": file_digest(args.weights, "sha256"),
        "history": history, "test": test}


def intended_labels(args: argparse.Namespace, files: list[Path], k: int) -> np.ndarray | None:
    """Image i's intended class: i mod classes (balanced), the list's element i, or None."""
    if args.labels == "none" and not args.labels_file:
        return None
    numbers = []
    for path in files:
        if not path.stem.isdigit():
            raise PipelineError(f"{path}: not named i.png, so it has no intended label")
        numbers.append(int(path.stem))
    if args.labels_file:
        table = json.loads(args.labels_file.read_text())
        if not (isinstance(table, list) and all(type(y) is int and 0 <= y < k for y in table)):
            raise PipelineError(f"{args.labels_file}: not a JSON list of class indices 0..{k - 1}")
        if max(numbers) >= len(table):
            raise PipelineError(f"{args.labels_file}: {len(table)} labels, but the folder has "
                                f"{max(numbers)}.png")
        return np.array([table[i] for i in numbers], dtype=np.int64)
    if args.classes != k:
        raise PipelineError(f"--classes {args.classes}, but the classifier knows {k} classes")
    return np.array(numbers, dtype=np.int64) % args.classes


def score(args: argparse.Namespace) -> dict:
    model, names, saved = load_weights(args.weights)
    files = list_pngs(args.folder)
    labels = intended_labels(args, files, len(names))
    images = np.stack([read_png(path, 32) for path in files]).transpose(0, 3, 1, 2)
    start = time.perf_counter()
    result = report(predict(model, images).argmax(1).numpy(), labels, names)
    rule = ("file" if args.labels_file else args.labels)
    print_table(result, f"{args.folder} ({len(files)} images, labels: {rule}):")
    return {**record.machine(torch.device("cpu")), "command": "score", "argv": args.argv,
            "folder": str(args.folder), "labels": rule,
            "labels_file": str(args.labels_file) if args.labels_file else None,
            "classes": names, "weights": str(args.weights),
            "weights_sha256": file_digest(args.weights, "sha256"),
            "classifier": {"width": saved["width"], "seed": saved["seed"],
                           "epochs": saved["epochs"]},
            "seconds": round(time.perf_counter() - start, 1), **result}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the training split, test on the test split")
    t.add_argument("--archive", required=True, type=Path,
                   help="cifar-10-python.tar.gz (or its extracted cifar-10-batches-py folder)")
    t.add_argument("--weights", required=True, type=Path, help="where to save the weights")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--limit", type=int, default=0, help="first N training images (0: all)")
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="the classes predicted for a folder of PNGs")
    s.add_argument("--weights", required=True, type=Path)
    s.add_argument("--folder", required=True, type=Path, help="0.png, 1.png, ... (32x32 RGB)")
    s.add_argument("--labels", choices=["balanced", "none"], default="balanced",
                   help="balanced: image i is class i mod --classes; none: histogram only")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--labels-file", type=Path, help="JSON list: element i is image i's class")
    for p in (t, s):
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        result = train(args) if args.command == "train" else score(args)
    except PipelineError as e:
        sys.exit(f"error: {e}")
    finally:  # as it was, for a caller in the same process (the tests)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    if args.out:
        record.write(args.out, result)
    return result


if __name__ == "__main__":
    main()

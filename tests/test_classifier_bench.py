"""benchmarks/classifier.py on a tiny archive in the CIFAR-10 format: train for one epoch, then
score folders of PNGs; the accuracy it reports is the one the model's own predictions give."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from fakes import LABELS, ROOT, cifar_images, make_cifar_archive

MACHINE = {"date", "device", "cpu", "cpu_cores", "torch_threads", "cpu_native_bf16", "torch",
           "commit"}
PER_BATCH = 8  # 40 training images (labels i mod 10), 8 test images


def load_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/classifier.py` has it
    import classifier
    return classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(script module, tmp folder, weights, train result): one epoch on the tiny archive."""
    tmp = tmp_path_factory.mktemp("classifier")
    archive = tmp / "cifar-10-python.tar.gz"
    make_cifar_archive(archive, per_batch=PER_BATCH)
    script = load_script()
    result = script.main(["train", "--archive", str(archive), "--weights", str(tmp / "w.pt"),
                          "--epochs", "1", "--width", "4", "--batch", "16", "--threads", "1",
                          "--out", str(tmp / "train.json")])
    return script, tmp, tmp / "w.pt", result


def test_train_records_its_test_accuracy_and_is_deterministic(trained):
    script, tmp, weights, result = trained
    recorded = json.loads((tmp / "train.json").read_text())
    assert recorded == json.loads(json.dumps(result))
    assert MACHINE <= recorded.keys() and recorded["torch_threads"] == 1
    assert recorded["num_train"] == 5 * PER_BATCH and recorded["num_test"] == PER_BATCH
    assert recorded["classes"] == LABELS and len(recorded["history"]) == 1
    test = recorded["test"]
    assert recorded["test_accuracy"] == test["accuracy"]
    assert list(test["per_class"]) == LABELS
    assert sum(c["num"] for c in test["per_class"].values()) == PER_BATCH
    assert sum(c["correct"] for c in test["per_class"].values()) == test["correct"]
    assert sum(test["predicted_histogram"].values()) == PER_BATCH
    assert np.array(test["confusion_rows_true_cols_predicted"]).sum() == PER_BATCH
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved["classes"] == LABELS and saved["width"] == 4
    again = script.main(["train", "--archive", str(tmp / "cifar-10-python.tar.gz"),
                         "--weights", str(tmp / "again.pt"), "--epochs", "1", "--width", "4",
                         "--batch", "16", "--threads", "1"])
    twin = torch.load(tmp / "again.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert twin.keys() == saved["state_dict"].keys()  # same seed, same weights (torch.save's
    assert all(torch.equal(twin[k], v) for k, v in saved["state_dict"].items())  # bytes hold
    # the file's name, so the files' digests differ)
    assert again["test"] == recorded["test"]


def test_scoring_the_training_images_gives_the_models_own_accuracy(trained, tmp_path):
    """The training images as PNGs with their true labels (a --labels-file): the accuracy, the
    per-class figures and the histogram are those of the model's predictions, computed here."""
    script, _, weights, _ = trained
    from ddpm.images import write_pngs
    images = cifar_images("train", PER_BATCH)
    labels = [i % 10 for i in range(len(images))]  # fakes._batch's labels
    rng = np.random.default_rng(0)
    labels = [int(y) for y in rng.permutation(labels)]  # not i mod 10: the file is what counts
    folder = tmp_path / "real"
    folder.mkdir()
    write_pngs(images.transpose(0, 2, 3, 1), folder)
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    script.main(["score", "--weights", str(weights), "--folder", str(folder), "--labels-file",
                 str(tmp_path / "labels.json"), "--threads", "1", "--out",
                 str(tmp_path / "score.json")])
    recorded = json.loads((tmp_path / "score.json").read_text())

    saved = torch.load(weights, map_location="cpu", weights_only=True)
    model = script.Classifier(saved["width"], 10)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images).float()
        pred = (model(x) + model(x.flip(-1))).argmax(1).numpy()
    truth = np.array(labels)
    assert MACHINE <= recorded.keys() and recorded["labels"] == "file"
    assert recorded["num_images"] == len(images)
    assert recorded["correct"] == int((pred == truth).sum())
    assert recorded["accuracy"] == round(float((pred == truth).mean()), 4)
    assert recorded["predicted_histogram"] == {
        name: int((pred == c).sum()) for c, name in enumerate(LABELS)}
    for c, name in enumerate(LABELS):
        assert recorded["per_class"][name]["num"] == int((truth == c).sum())
        assert recorded["per_class"][name]["correct"] == int(((pred == c) & (truth == c)).sum())


def test_balanced_labels_are_i_mod_k_and_none_gives_only_the_histogram(trained, tmp_path):
    script, _, weights, _ = trained
    from ddpm.images import write_pngs
    images = cifar_images("test", 12)[:12].transpose(0, 2, 3, 1)
    write_pngs(images, tmp_path)
    balanced = script.main(["score", "--weights", str(weights), "--folder", str(tmp_path),
                            "--labels", "balanced", "--classes", "10", "--threads", "1"])
    assert [c["num"] for c in balanced["per_class"].values()] == [2, 2] + [1] * 8
    assert balanced["chance"] == 0.1
    (tmp_path / "3.png").unlink()  # labels follow the file names, not the positions
    balanced = script.main(["score", "--weights", str(weights), "--folder", str(tmp_path),
                            "--threads", "1"])
    assert [c["num"] for c in balanced["per_class"].values()] == [2, 2, 1, 0] + [1] * 6
    assert balanced["per_class"]["cat"]["accuracy"] is None
    none = script.main(["score", "--weights", str(weights), "--folder", str(tmp_path),
                        "--labels", "none", "--threads", "1"])
    assert "accuracy" not in none and "per_class" not in none
    assert sum(none["predicted_histogram"].values()) == 11
    assert none["predicted_histogram"] == balanced["predicted_histogram"]
    with pytest.raises(SystemExit, match="knows 10 classes"):
        script.main(["score", "--weights", str(weights), "--folder", str(tmp_path),
                     "--classes", "5", "--threads", "1"])

"""Smoke runs of the benchmarks (tiny sizes): every section runs and prints its table row, with
values that are finite, positive and consistent with each other."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import ROOT, cifar_images, make_cifar_archive


@pytest.mark.slow  # 90 s; its timing tools are checked in CI by the GPU benchmark's dry run
def test_the_benchmark_runs_every_section(tmp_path):
    import json
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), "--quick", "--json",
                          str(tmp_path / "bench.json")],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    table = out[out.index("| measurement"):]
    recorded = json.loads((tmp_path / "bench.json").read_text())
    assert recorded["argv"] == ["--quick", "--json", str(tmp_path / "bench.json")]
    assert ["| " + " | ".join(row.values()) + " |" for row in recorded["rows"]] == \
        table.splitlines()[2:2 + len(recorded["rows"])]  # the printed table, row by row
    for row in ("train step, seed network vs DDPM network", "GFLOP per image, fwd+bwd",
                "train step, DDPM config", "achieved FLOP/s", "sampling forwards/s",
                "DDIM-100 vs DDPM-1000", "peak measured", "train step, seed config",
                "vs fp32",
                "fid stage", "Frechet distance"):
        assert row in table, row
    check_values(recorded["rows"])


LOWER_IS_BETTER = {"GFLOP", "M", "s"}  # the units of the rows whose ratio is reference / ours


def parsed(rows: list[dict]) -> dict[str, tuple[float, str, float | None, float | None]]:
    """measurement -> (ours, its unit, reference or None, ours-vs-reference ratio or None)."""
    out = {}
    for row in rows:
        ours, unit = row["ours"].split(" ", 1)
        reference = row["reference"].split(" ", 1)[0]
        ratio = row["ours_vs_reference"]
        out[row["measurement"]] = (  # indented: a row under the one before
            float(ours), unit, None if reference == "n/a" else float(reference),
            None if ratio == "n/a" else float(ratio.removesuffix("x")))
    return out


def check_values(rows: list[dict]) -> None:
    """The benchmark's figures (--quick, on the CPU): every one finite and positive, each ratio
    that of its row's figures (3 significant digits), and the figures that are the same quantity
    in two rows, or follow from others, agree: the tiny networks' parameters (counted here),
    fwd+bwd FLOPs against the forward's, achieved FLOP/s = FLOPs x images/s, the DDPM-1000
    column = one DDPM step / 1000, the forward alone = the sampling row, and our Frechet distance
    = pytorch-fid's."""
    import math
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import TINY, TINY_SEED, network
    table = parsed(rows)
    for name, (ours, unit, reference, ratio) in table.items():
        assert math.isfinite(ours) and ours > 0, name
        assert (reference is None) == (ratio is None), name
        if reference is not None:
            assert math.isfinite(reference) and reference > 0, name
            expected = reference / ours if unit in LOWER_IS_BETTER else ours / reference
            assert ratio == pytest.approx(expected, rel=0.015, abs=0.006), name

    def row(start: str) -> tuple[float, str, float | None, float | None]:
        found, = [value for name, value in table.items() if name.startswith(start)]
        return found

    parameters = row("  parameters (millions)")
    for count, cfg in ((parameters[0], TINY_SEED), (parameters[2], TINY)):
        exact = sum(p.numel() for p in network(cfg).parameters()) / 1e6
        assert count == pytest.approx(exact, rel=5e-3)
    forward, both = row("  GFLOP per image, forward"), row("  GFLOP per image, fwd+bwd")
    for column in (0, 2):  # the backward costs about twice the forward
        assert 2.5 < both[column] / forward[column] < 3.5
    achieved, ddpm_step = row("  achieved FLOP/s"), table["train step, DDPM config, batch 2"]
    assert achieved[0] == pytest.approx(both[2] * ddpm_step[0], rel=0.015)
    k_step, one_step = row("sampling images/s, DDIM-100"), row("  one DDPM step")
    assert k_step[2] == pytest.approx(one_step[0] / 1000, rel=0.015)
    sampling = table["sampling forwards/s per image, batch 2"]
    assert one_step[2] == sampling[0] == row("  diffusers also in channels_last")[0]
    frechet, = [name for name in table if name.startswith("Frechet distance")]
    ours, theirs = map(float, frechet.split("values ")[1].rstrip(")").split(" / "))
    assert ours == pytest.approx(theirs, rel=1e-5) and ours > 0


def test_the_gpu_benchmark_runs_on_the_cpu_as_a_dry_run(tmp_path):
    """benchmarks/gpu.py --quick: every network and batch_gpu row, with the projected hours."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu",
                          "--quick", "--json", str(tmp_path / "gpu.json")],
                         check=True, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout  # as one_thread
    assert "| network | mode | batch_gpu | rounds | images_per_second" in out
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(r["network"], r["batch_gpu"], r["rounds"]) for r in rows] == [
        ("seed", 4, 2), ("seed", 8, 1), ("ddpm", 4, 2), ("ddpm", 8, 1)]
    for r in rows:  # 600 epochs of 390 steps of 128 images at the measured speed
        assert r["hours_600_epochs"] == pytest.approx(600 * 390 * 128 / r["images_per_second"]
                                                      / 3600, rel=0.01)


# benchmarks/gpu_check.py run as on a GPU node that has none of these: importing one fails.
BARE_NODE = ("import runpy, sys; sys.modules.update(dict.fromkeys(['pytorch_fid', 'dvc', "
             "'torchvision', 'scipy', 'pydantic'])); sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def reference_fid(real: np.ndarray, fake: np.ndarray, weights, dims: int, tmp_path) -> float:
    """pytorch-fid's own statistics and distance of two (N, 32, 32, 3) uint8 image sets."""
    from unittest import mock

    import pytorch_fid_compat  # noqa: F401  (pytorch-fid on SciPy without sqrtm(disp=))
    from PIL import Image
    from pytorch_fid import inception
    from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path
    state = torch.load(weights, weights_only=True)
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state):
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
    stats = []
    for name, images in (("real", real), ("fake", fake)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
        stats.append(compute_statistics_of_path(str(tmp_path / name), model, 50, dims, "cpu", 0))
    return calculate_frechet_distance(*stats[1], *stats[0])


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid 0.3
def test_the_gpu_check_dry_run_runs_every_part_on_a_bare_node_and_is_scored(
        tmp_path, inception_weights):
    """gpu_check.py --dry-run without pytorch-fid, dvc, torchvision, scipy and pydantic: the CUDA
    tests (all skipped here), both networks' rows, training on an archive of 25 training images,
    16 samples and their grid; then gpu_check_fid.py adds pytorch-fid's FID of those samples
    against the 25 (few: Inception runs at 299 x 299 on the CPU)."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5, out = make_cifar_archive(archive, per_batch=5), tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", BARE_NODE, str(ROOT / "benchmarks/gpu_check.py"),
                          str(out), "--dry-run", "--data", str(archive), "--md5", md5],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))  # as conftest.one_thread
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| network | mode | batch_gpu |" in run.stdout and "training: seed" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "grid.png", "samples.npz",
                                                     "tests.log"]
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"]) == (0, 0, 0) and tests["skipped"]
    assert list(tests["skip_reasons"]) == ["no CUDA GPU here (DDPM_TEST_DEVICE=cuda)"]
    assert {"pytorch_fid", "dvc", "torchvision", "scipy"} <= set(tests["missing_modules"])
    # batch_gpu auto on a CPU: the whole batch of 8 (ddpm.batches.CPU_BATCH_GPU is 32)
    assert [(r["network"], r["mode"], r["batch_gpu"], r["rounds"]) for r in report["timing"]] == [
        ("seed", "eager", 8, 1), ("ddpm", "eager", 8, 1)]
    training, sampling = report["training"], report["sampling"]
    assert (training["arch"], training["images"], training["batch_size"]) == ("seed", 25, 8)
    assert training["steps"] == training["epochs"] * (25 // 8) and np.isfinite(training["loss"])
    assert (sampling["num_images"], sampling["sampler"], sampling["steps"]) == (16, "ddim", 4)
    with np.load(out / "samples.npz") as f:
        images = f["images"]
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    tiles = np.asarray(Image.open(out / "grid.png"))  # 4 x 4 tiles of 32 + 2 pixels, 2 around
    assert tiles.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert (tiles[2:34, 2:34] == images[0]).all() and (tiles[-34:-2, -34:-2] == images[15]).all()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check_fid
    gpu_check_fid.main([str(out), "--weights", str(inception_weights), "--data", str(archive),
                        "--md5", md5, "--dims", "64", "--device", "cpu"])
    fid = json.loads((out / "gpu_check.json").read_text())["fid"]
    assert (fid["num_generated"], fid["num_real"], fid["dims"]) == (16, 25, 64)
    real = cifar_images("train", 5).transpose(0, 2, 3, 1)  # what the archive holds
    expected = reference_fid(real, images, inception_weights, 64, tmp_path)
    assert fid["fid"] == pytest.approx(expected, rel=1e-6)


def test_the_fid_weights_url_is_pytorch_fids():
    """Written out in ddpm.fid_weights so that training imports no pytorch-fid."""
    from pytorch_fid import inception

    from ddpm import fid_weights
    assert fid_weights.WEIGHTS_URL == inception.FID_WEIGHTS_URL


def test_the_gpu_check_counts_what_pytest_reports(tmp_path):
    """gpu_check_report.junit_counts on the JUnit XML of a real pytest run of one test of each
    outcome: a pass, a skip, a failure and an error in a fixture."""
    (tmp_path / "test_outcomes.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('no GPU memory')\n\n"
        "def test_pass():\n    pass\n\n"
        "def test_skip():\n    pytest.skip('no CUDA')\n\n"
        "def test_fail():\n    assert 1 == 2\n\n"
        "def test_error(broken):\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={tmp_path / 'out.xml'}", "test_outcomes.py"], cwd=tmp_path,
                   capture_output=True, timeout=120)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check_report import junit_counts
    counts = junit_counts(tmp_path / "out.xml")
    assert {k: counts[k] for k in ("passed", "skipped", "failed", "errors")} == {
        "passed": 1, "skipped": 1, "failed": 1, "errors": 1}
    assert counts["skip_reasons"] == {"no CUDA": 1}
    assert [line.split(":")[2] for line in counts["broken"]] == ["test_fail", "test_error"]


def test_the_sampler_benchmark_scores_every_row(tiny, tmp_path):
    """benchmarks/samplers.py on a random tiny network: each row's FID against the given
    statistics, its timing, the grid it used, and the markdown table."""
    import json

    import torch
    from ddpm import checkpoint, networks
    from ddpm.fid import folder_statistics, save_statistics
    from ddpm.images import write_pngs
    from ddpm.params import parse_params, run_config
    from fakes import cifar_images
    params = parse_params(tiny)
    (tmp_path / "params.yaml").write_text(json.dumps(tiny))  # JSON is YAML
    torch.manual_seed(0)
    config = run_config(params)
    config["data"]["images"] = "0123456789abcdef"  # the data digest, as the train stage adds it
    checkpoint.save({"ema": networks.build(params.model, (3, 32, 32)).state_dict(),
                     "config": config, "epochs": 2, "steps": 6}, tmp_path / "ema.pt")
    (tmp_path / "real").mkdir()
    write_pngs(cifar_images("train", per_batch=16)[:8].transpose(0, 2, 3, 1), tmp_path / "real")
    fid = tiny["fid"]
    save_statistics(tmp_path / "real.npz", *folder_statistics(
        tmp_path / "real", fid["dims"], fid["batch_size"], fid["weights"], torch.device("cpu")))
    def samplers(*args: str) -> str:  # on this network and statistics, into s.json
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/samplers.py"), "--ema",
             str(tmp_path / "ema.pt"), "--params", str(tmp_path / "params.yaml"), "--real-stats",
             str(tmp_path / "real.npz"), "--threads", "1", "--out", str(tmp_path / "s.json"),
             *args],
            check=True, capture_output=True, text=True, timeout=300).stdout

    def fid_rows(rows: str) -> str:
        return samplers("--weights", fid["weights"], "--images", "3", "--batch-size", "2",
                        "--rows", rows)

    out = fid_rows("ddim-4,dpm-solver++-4,dpm-solver++-4@t,dpm-solver++-4@quad")
    assert "| sampler | timesteps | network evaluations | FID |" in out
    result = json.loads((tmp_path / "s.json").read_text())
    assert [(r["sampler"], r["grid"], r["steps"]) for r in result["rows"]] == [
        ("ddim", "t", 4), ("dpm-solver++", "log-snr", 4), ("dpm-solver++", "t", 4),
        ("dpm-solver++", "quad", 4)]
    assert all(r["num_generated"] == 3 and r["fid"] > 0 and
               0 < r["sample_seconds"] < result["wall_seconds"] for r in result["rows"])
    assert result["real_stats"]["num_real"] == 8 and result["ema"]["epochs"] == 2
    fid_rows("ddim-4,dpm-solver++-2")
    again = json.loads((tmp_path / "s.json").read_text())["rows"]  # a rerun keeps done rows
    assert again[0] == result["rows"][0] and again[1]["row"] == "dpm-solver++-2"
    samplers("--ode-error", "2", "--rows", "ddim-4,dpm-solver++-4,dpm-solver++-40")
    ode = json.loads((tmp_path / "s.json").read_text())["ode_error"]
    assert ode["reference"] == "dpm-solver++-40" and ode["images"] == 2  # every timestep
    assert ode["rows"]["dpm-solver++-40"]["rms_levels"] == 0  # the reference itself
    assert ode["rows"]["ddim-4"]["rms_levels"] > 0 < ode["rows"]["dpm-solver++-4"]["max_levels"]
    before = json.loads((tmp_path / "s.json").read_text())
    fid_rows("ddim-4,dpm-solver++-2,ddim-2")
    added = json.loads((tmp_path / "s.json").read_text())  # a row added: the rest is kept
    assert added["rows"][:2] == before["rows"] and added["rows"][2]["row"] == "ddim-2"
    assert added["ode_error"] == ode and added["wall_seconds"] > before["wall_seconds"]

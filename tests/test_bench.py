"""Smoke runs of the benchmarks (tiny sizes): every section runs and prints its table row, with
values that are finite, positive and consistent with each other."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

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


# A GPU node without these: in every Python process of the run (the check and the pytest it
# starts), importing one fails, as where they are not installed.
BARE_NODE = ["pytorch_fid", "dvc", "torchvision", "scipy", "pydantic"]


def bare_node_env(folder: Path) -> dict:
    """os.environ with a PYTHONPATH whose sitecustomize hides BARE_NODE's modules from every
    Python process started with it, subprocesses included."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.modules.update(dict.fromkeys({BARE_NODE!r}))\n")
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")  # as conftest.one_thread


def clean_copy(dest: Path) -> Path:
    """This working tree as a fresh clone of it would hold it (git's tracked and not-ignored
    files, uncommitted changes included; nothing built, no .git), in dest, with no ../shared
    beside it."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True,
                                timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: no list of the repository's files to copy")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a file deleted but not yet staged is not in a clone
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    assert (dest / "benchmarks/gpu_check.py").is_file() and not (dest.parent / "shared").exists()
    return dest


def readme_gpu_check() -> tuple[list[str], list[str]]:
    """The README's gpu_check commands (inline code), as words: the check and its dry run, which
    is the same command with --dry-run."""
    found = [shlex.split(c) for c in re.findall(r"`(python benchmarks/gpu_check\.py [^`]*)`",
                                                (ROOT / "README.md").read_text())]
    full, = [c for c in found if "--dry-run" not in c]
    dry, = [c for c in found if "--dry-run" in c]
    assert dry == full + ["--dry-run"]
    return full, dry


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
def test_the_readmes_gpu_check_runs_in_a_clean_copy_on_a_bare_node_and_is_scored(
        tmp_path, inception_weights):
    """The README's gpu_check command, as written, in a copy of the repository with no ../shared
    beside it, on a "node" without pytorch-fid, dvc, torchvision, scipy and pydantic (hidden from
    the check's pytest too): the full check gets past its arguments and stops at the missing GPU;
    its dry run makes its synthetic archive, runs the CUDA tests' CPU cases (some pass; the one
    that needs pytorch-fid skips, saying so), both networks' rows, trains on 32 images and draws
    16 samples and their grid. Then gpu_check_fid.py adds the FID of those samples against a
    25-image archive, checked against pytorch-fid's (few: Inception runs at 299 x 299 here)."""
    full, dry = readme_gpu_check()
    repo, env = clean_copy(tmp_path / "clone"), bare_node_env(tmp_path / "bare")
    if not torch.cuda.is_available():  # with a GPU it would start the real check
        run = subprocess.run([sys.executable, *full[1:]], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 1 and run.stderr.strip().endswith(
            "gpu_check: PyTorch sees no CUDA GPU here; --dry-run runs the check on the CPU"), \
            run.stderr[-3000:]
    run = subprocess.run([sys.executable, *dry[1:]], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| network | mode | batch_gpu |" in run.stdout and "training: seed" in run.stdout
    out = repo / dry[2]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "grid.png", "samples.npz",
                                                     "tests.log"]
    report = json.loads((out / "gpu_check.json").read_text())
    tests = report["tests"]
    assert tests["passed"] >= 1 and (tests["failed"], tests["errors"]) == (0, 0), tests
    # installed here, hidden from the pytest that the check started as from the check itself
    assert find_spec("pytorch_fid") is not None
    assert "pytorch-fid is not installed here" in tests["skip_reasons"], tests["skip_reasons"]
    assert {"pytorch_fid", "dvc", "torchvision", "scipy"} <= set(tests["missing_modules"])
    # batch_gpu auto on a CPU: the whole batch of 8 (ddpm.batches.CPU_BATCH_GPU is 32)
    assert [(r["network"], r["mode"], r["batch_gpu"], r["rounds"]) for r in report["timing"]] == [
        ("seed", "eager", 8, 1), ("ddpm", "eager", 8, 1)]
    training, sampling = report["training"], report["sampling"]
    assert training["data"] == "synthetic (tests/fakes.py)"
    assert (training["arch"], training["images"], training["batch_size"]) == ("seed", 32, 8)
    assert training["steps"] == training["epochs"] * (32 // 8) and np.isfinite(training["loss"])
    assert (sampling["num_images"], sampling["sampler"], sampling["steps"]) == (16, "ddim", 4)
    with np.load(out / "samples.npz") as f:
        images = f["images"]
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    tiles = np.asarray(Image.open(out / "grid.png"))  # 4 x 4 tiles of 32 + 2 pixels, 2 around
    assert tiles.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert (tiles[2:34, 2:34] == images[0]).all() and (tiles[-34:-2, -34:-2] == images[15]).all()

    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = make_cifar_archive(archive, per_batch=5)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check_fid
    gpu_check_fid.main([str(out), "--weights", str(inception_weights), "--data", str(archive),
                        "--md5", md5, "--dims", "64", "--device", "cpu"])
    fid = json.loads((out / "gpu_check.json").read_text())["fid"]
    assert (fid["num_generated"], fid["num_real"], fid["dims"]) == (16, 25, 64)
    real = cifar_images("train", 5).transpose(0, 2, 3, 1)  # what the archive holds
    expected = reference_fid(real, images, inception_weights, 64, tmp_path)
    assert fid["fid"] == pytest.approx(expected, rel=1e-6)


def test_seed_fid_asks_for_its_data_in_one_line(tmp_path):
    """benchmarks/seed_fid.py has no default outside the repository: without --data, or with a
    folder that lacks its inputs, it says in one line what the folder must hold."""
    script = str(ROOT / "benchmarks/seed_fid.py")
    needs = ("a folder holding seed-samples/ (the seed's 5,000 published PNGs) and "
             "cifar10-real-subset/cifar-10-python.tar.gz (md5 7ce1f99f2b1658965d4df61be0d12ed7)")
    for args, says in [([], f"error: --data is required: {needs}"),
                       (["--data", str(tmp_path)], f"error: --data {tmp_path}: no seed-samples "
                                                   "or cifar10-real-subset/cifar-10-python.tar.gz "
                                                   f"there; expected {needs}")]:
        run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 1 and run.stderr.strip().startswith(says), run.stderr[-2000:]
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


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

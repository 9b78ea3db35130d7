"""A smoke run of the benchmark (tiny sizes): every section runs and prints its table row."""
import subprocess
import sys

import pytest

from fakes import ROOT


def test_the_benchmark_runs_every_section():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), "--quick"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    table = out[out.index("| measurement"):]
    for row in ("train step, seed network vs DDPM network", "GFLOP per image, fwd+bwd",
                "train step, DDPM config", "achieved FLOP/s", "sampling forwards/s",
                "DDIM-100 vs DDPM-1000", "peak measured", "train step, seed config",
                "vs fp32",
                "fid stage", "Frechet distance"):
        assert row in table, row


def test_the_gpu_benchmark_runs_on_the_cpu_as_a_dry_run(tmp_path):
    """benchmarks/gpu.py --quick: every network and batch_gpu row, with the projected hours."""
    import json
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--device", "cpu",
                          "--quick", "--json", str(tmp_path / "gpu.json")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "| network | mode | batch_gpu | rounds | images_per_second" in out
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(r["network"], r["batch_gpu"], r["rounds"]) for r in rows] == [
        ("seed", 4, 2), ("seed", 8, 1), ("ddpm", 4, 2), ("ddpm", 8, 1)]
    for r in rows:  # 600 epochs of 390 steps of 128 images at the measured speed
        assert r["hours_600_epochs"] == pytest.approx(600 * 390 * 128 / r["images_per_second"]
                                                      / 3600, rel=0.01)


def test_the_sampler_benchmark_scores_every_row(tiny, tmp_path):
    """benchmarks/samplers.py on a random tiny network: each row's FID against the given
    statistics, its timing, the grid it used, and the markdown table."""
    import json

    import torch
    from ddpm import checkpoint, networks
    from ddpm.fid import folder_statistics, save_statistics
    from ddpm.images import write_pngs
    from ddpm.params import parse_params
    from fakes import cifar_images
    params = parse_params(tiny)
    torch.manual_seed(0)
    checkpoint.save({"ema": networks.build(params.model).state_dict(), "config": params.to_dict(),
                     "epochs": 2, "steps": 6}, tmp_path / "ema.pt")
    (tmp_path / "real").mkdir()
    write_pngs(cifar_images("train", per_batch=16)[:8].transpose(0, 2, 3, 1), tmp_path / "real")
    fid = tiny["fid"]
    save_statistics(tmp_path / "real.npz", *folder_statistics(
        tmp_path / "real", fid["dims"], fid["batch_size"], fid["weights"], torch.device("cpu")))
    rows = "ddim-4,dpm-solver++-4,dpm-solver++-4@t,dpm-solver++-4@quad"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/samplers.py"), "--ema",
                          str(tmp_path / "ema.pt"), "--real-stats", str(tmp_path / "real.npz"),
                          "--weights", fid["weights"], "--images", "3", "--batch-size", "2",
                          "--rows", rows, "--threads", "1", "--out", str(tmp_path / "s.json")],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert "| sampler | timesteps | network evaluations | FID |" in out
    result = json.loads((tmp_path / "s.json").read_text())
    assert [(r["sampler"], r["grid"], r["steps"]) for r in result["rows"]] == [
        ("ddim", "t", 4), ("dpm-solver++", "log-snr", 4), ("dpm-solver++", "t", 4),
        ("dpm-solver++", "quad", 4)]
    assert all(r["num_generated"] == 3 and r["fid"] > 0 and
               0 < r["sample_seconds"] < result["wall_seconds"] for r in result["rows"])
    assert result["real_stats"]["num_real"] == 8 and result["ema"]["epochs"] == 2
    subprocess.run([sys.executable, str(ROOT / "benchmarks/samplers.py"), "--ema",
                    str(tmp_path / "ema.pt"), "--real-stats", str(tmp_path / "real.npz"),
                    "--weights", fid["weights"], "--images", "3", "--batch-size", "2",
                    "--rows", "ddim-4,dpm-solver++-2", "--threads", "1", "--out",
                    str(tmp_path / "s.json")], check=True, capture_output=True, timeout=300)
    again = json.loads((tmp_path / "s.json").read_text())["rows"]  # a rerun keeps done rows
    assert again[0] == result["rows"][0] and again[1]["row"] == "dpm-solver++-2"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/samplers.py"), "--ema",
                    str(tmp_path / "ema.pt"), "--real-stats", str(tmp_path / "real.npz"),
                    "--ode-error", "2", "--rows", "ddim-4,dpm-solver++-4,dpm-solver++-40",
                    "--threads", "1", "--out", str(tmp_path / "s.json")],
                   check=True, capture_output=True, timeout=300)
    ode = json.loads((tmp_path / "s.json").read_text())["ode_error"]
    assert ode["reference"] == "dpm-solver++-40" and ode["images"] == 2  # every timestep
    assert ode["rows"]["dpm-solver++-40"]["rms_levels"] == 0  # the reference itself
    assert ode["rows"]["ddim-4"]["rms_levels"] > 0 < ode["rows"]["dpm-solver++-4"]["max_levels"]

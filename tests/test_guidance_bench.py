"""benchmarks/guidance.py at a tiny size: its results file, its ratios (those of the measured
seconds) and its check that the conditional network at w = 0 draws the unconditional one's
images."""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from fakes import ROOT

MACHINE = {"date", "device", "cpu", "cpu_cores", "torch_threads", "cpu_native_bf16", "torch",
           "commit"}


def load_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as `python benchmarks/guidance.py` has it
    import guidance
    return guidance


def test_the_guidance_benchmark_records_its_cases_ratios_and_check(tmp_path, capsys):
    script = load_script()
    out = tmp_path / "guidance.json"
    argv = ["--arch", "seed", "--channels", "8", "16", "16", "--res-blocks", "1", "--heads", "2",
            "--attention-resolutions", "16", "--images", "4", "--batch-size", "3",
            "--steps", "2", "--repeats", "2", "--precision", "fp32", "--device", "cpu",
            "--threads", "1", "--train-steps", "2", "--out", str(out)]
    result = script.main(argv)
    printed = capsys.readouterr().out
    recorded = json.loads(out.read_text())
    assert recorded == json.loads(json.dumps(result))
    assert MACHINE <= recorded.keys() and recorded["torch_threads"] == 1
    assert recorded["argv"] == argv and "random" in recorded["weights"]
    assert recorded["model"]["channels"] == [8, 16, 16] and recorded["model"]["res_blocks"] == 1
    assert (recorded["images"], recorded["batch_size"], recorded["steps"],
            recorded["repeats"], recorded["sampler"], recorded["precision"]) == \
        (4, 3, 2, 2, "ddim", "fp32")
    rows = recorded["rows"]
    assert [r["case"] for r in rows] == list(script.CASES)
    for r in rows:
        assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"])
        assert r["seconds_median"] == pytest.approx(statistics.median(r["seconds"]), abs=2e-6)
        assert r["seconds_min"] == pytest.approx(min(r["seconds"]), abs=2e-6)
        assert r["images_per_second"] == pytest.approx(4 / r["seconds_median"], rel=2e-3)
        assert r["vs_unconditional"] == pytest.approx(
            r["seconds_median"] / rows[0]["seconds_median"], rel=2e-3, abs=1e-3)
    assert rows[0]["vs_unconditional"] == 1.0
    assert [r["vs_conditional_unguided"] is None for r in rows] == [True, True, False]
    ratio = rows[2]["seconds_median"] / rows[1]["seconds_median"]
    assert rows[2]["vs_conditional_unguided"] == pytest.approx(ratio, rel=2e-3, abs=1e-3)
    assert recorded["guided_vs_unguided"] == rows[2]["vs_conditional_unguided"]
    assert recorded["aim_met"] == (recorded["guided_vs_unguided"] <= 2.0)
    check = recorded["check"]
    assert check["weights_equal"] and check["conditional_w0_equals_unconditional"]
    assert check["max_abs_difference_w0"] == 0.0 and check["images_vary"]
    assert "Aim: guided <= 2.0x unguided" in printed and "random-initialised" in printed
    assert "| case | seconds (median) |" in printed
    training = recorded["training"]  # one optimizer step each way, of train.batch_size images
    seconds = training["seconds_per_step"]
    assert set(seconds) == {"unconditional", "conditional"} and training["steps"] == 2
    assert training["conditional_vs_unconditional"] == pytest.approx(
        seconds["conditional"] / seconds["unconditional"], rel=2e-3, abs=1e-3)
    assert training["images_per_second"]["conditional"] == pytest.approx(
        training["batch_size"] / seconds["conditional"], rel=2e-3)
    assert "images exactly: yes" in printed


def test_w0_check_compares_the_images_it_drew(monkeypatch):
    """A label table that is not zero changes the conditional network's images: the check then
    fails, so it does compare them."""
    script = load_script()
    built = script.network

    def nonzero_table(params, conditional, device, compile_mode):
        net = built(params, conditional, device, compile_mode)
        if conditional:
            net.label_embed.weight.data.fill_(0.5)
        return net
    monkeypatch.setattr(script, "network", nonzero_table)
    with pytest.raises(SystemExit, match="did not reproduce"):
        script.main(["--channels", "8", "16", "16", "--res-blocks", "1", "--heads", "2",
                     "--attention-resolutions", "16", "--images", "2", "--steps", "1",
                     "--repeats", "1", "--precision", "fp32", "--device", "cpu",
                     "--threads", "1"])

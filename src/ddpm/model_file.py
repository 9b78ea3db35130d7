"""A trained model outside the pipeline: any file or folder that holds one, read with the network,
diffusion and image shape it was trained with, so that nothing else (no params.yaml) is needed.

It reads models/ema.pt, a training checkpoint (models/runs/*/last.pt, models/checkpoints/*.pt:
their EMA weights, or with weights="model" the raw ones), a file `python -m ddpm import-diffusers`
wrote, and folders: `python -m ddpm export`'s, or a diffusers UNet2DModel / DDPMPipeline
(ddpm.interop).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm import checkpoint, networks, schema
from ddpm.errors import ParamsError
from ddpm.labels import recorded_classes
from ddpm.params import DiffusionParams, ModelParams, recorded_diffusion

WEIGHTS = ("ema", "model")  # what a training checkpoint holds; EMA files hold only "ema"


@dataclass
class ModelFile:
    path: Path
    weights: dict[str, torch.Tensor]   # the state_dict of `model`'s network
    model: ModelParams
    diffusion: DiffusionParams
    shape: tuple[int, int, int]        # (C, H, W) of the images it was trained on
    config: dict[str, Any]             # the run config the file records (provenance), or {}
    sample: dict[str, Any] = field(default_factory=dict)  # sampler settings its source implies
    classes: list[str] = field(default_factory=list)      # a conditional model's class names

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with these weights, on `device`, in eval mode."""
        model = networks.build(self.model, self.shape, len(self.classes))
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:  # names or shapes of another network than its config's
            raise checkpoint.CheckpointError(
                f"{self.path}: its weights do not fit the {self.model.arch} network its recorded "
                f"config describes ({checkpoint.mismatch(e)}); the file is damaged or not of this "
                "project: write it again (retrain, export or import it anew)") from None
        return model.to(device).eval()

    def digest(self) -> str:
        """sha256 of the weights (names, dtypes, shapes and bytes): what images drawn from them
        depend on, whichever file or folder holds them."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.weights.items()):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def read_state(path: str | Path) -> dict[str, Any]:
    """The file's dict (weights-only torch.load), or an exported / diffusers folder converted to
    the same layout (ddpm.interop.read_exported)."""
    path = Path(path)
    if path.is_dir():
        from ddpm import interop  # safetensors, JSON: only for folders
        return interop.read_exported(path)
    return checkpoint.load(path, "model file")


def read(path: str | Path, weights: str = "ema") -> ModelFile:
    """The model in `path` (see the module docstring); weights: "ema" or, in a training
    checkpoint, "model". Anything missing or malformed is a CheckpointError naming the file."""
    path = Path(path)
    state = read_state(path)
    if weights not in state or not isinstance(state[weights], dict):
        held = [key for key in WEIGHTS if isinstance(state.get(key), dict)]
        raise checkpoint.CheckpointError(
            f"{path}: no {weights!r} weights in it (it holds: {', '.join(held) or 'none'}; "
            "'model' is in training checkpoints only)")
    checkpoint.ema_weights(state, path, weights, "write it again (retrain, export or import it "
                           "anew)")  # a dict of named dense tensors, or one line
    if bad := checkpoint.non_finite(state[weights]):
        raise checkpoint.CheckpointError(f"{path}: its {weights} weights hold NaN or infinite "
                                         f"values ({', '.join(bad[:3])})")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    sections = {}
    for name, cls in (("model", ModelParams), ("diffusion", DiffusionParams)):
        raw = config.get(name)
        if name == "model" and isinstance(raw, dict):  # unconditional files leave it out
            raw = {"conditional": False, **raw}
        if name == "diffusion":  # and eps models their prediction
            raw = recorded_diffusion(raw)
        try:
            sections[name] = schema.parse(cls, raw, f"{name}.")
        except ParamsError as e:
            raise checkpoint.CheckpointError(f"{path}: its recorded config does not say how to "
                                             f"build the network ({e})") from None
    return ModelFile(path, state[weights], sections["model"], sections["diffusion"],
                     checkpoint.image_shape(state, path), config,
                     state.get("sample") if isinstance(state.get("sample"), dict) else {},
                     recorded_classes(state, path, sections["model"].conditional))

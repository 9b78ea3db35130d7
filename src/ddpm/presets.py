"""params.yaml as `dvc exp run -S ...` composes it: the committed defaults (params.defaults.yaml),
then the presets named (`+presets=quick` reads presets/quick.yaml), then the other overrides.

DVC does this itself (its Hydra composition, configured in .dvc/config); this module does the same
through DVC's own function for `python -m ddpm params`, which writes params.yaml for `dvc repro`,
and for the tests, which hold the presets and the README to it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from ddpm.errors import ParamsError
from ddpm.files import atomic_file
from ddpm.params import parse_params, read_yaml


def hydra_settings(root: Path) -> tuple[Path, str]:
    """(config_dir, config_name) of the repository's .dvc/config, as `dvc exp run` reads them."""
    from dvc.config import Config
    if not (root / ".dvc").is_dir():
        raise ParamsError(f"{root}: not the repository's root (no .dvc folder): run it there")
    hydra = Config(dvc_dir=str(root / ".dvc")).get("hydra", {})  # config, then config.local
    if not hydra.get("enabled", False) or hydra.get("config_module"):
        raise ParamsError(f"{root}/.dvc/config: Hydra composition is not enabled with a "
                          "config_dir (the [hydra] section this project commits)")
    return root / hydra.get("config_dir", "conf"), hydra.get("config_name", "config")


def compose(root: str | Path, overrides: Sequence[str]) -> str:
    """The text `dvc exp run -S o1 -S o2 ...` writes to params.yaml in the repository `root`,
    checked by check_params' rules; a bad override or value is a ParamsError (one line)."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    root = Path(root).resolve()
    config_dir, config_name = hydra_settings(root)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(config_dir), None, config_name, "", list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise ParamsError(f"{' '.join(overrides) or config_name}: {' '.join(str(e).split())}"
                              ) from None
        try:  # the values check_params accepts, before anything is written
            parse_params(read_yaml(out))
        except ParamsError as e:
            raise ParamsError(f"{config_name}.yaml {' '.join(overrides)}: {e}") from None
        return out.read_text(encoding="utf-8")


def write(root: str | Path, overrides: Sequence[str]) -> Path:
    """Rewrite root/params.yaml as `dvc exp run` with these -S values would (atomically)."""
    path = Path(root) / "params.yaml"
    text = compose(root, overrides)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path

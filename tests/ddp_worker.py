"""Run by test_train under torchrun: train on every rank, then save each rank's weights."""
import sys
from pathlib import Path

import torch

from ddpm.params import load_params
from ddpm.runtime import init_world
from ddpm.train import Trainer
from fakes import train_paths

params_file, cifar, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
params = load_params(params_file)
world, device = init_world(params.device, params.train.gpus)
trainer = Trainer(params, train_paths(out, cifar), world, device)
init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
progress = trainer.run()
torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "init": init,
            "steps": progress.step}, out / f"rank{world.rank}.pt")
world.close()

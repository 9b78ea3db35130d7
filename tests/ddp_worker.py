"""Run by test_train under torchrun: train on every rank, then save each rank's weights.

With a fourth argument `one-step`, the model is float64 and only epoch 0 runs (one optimizer
step when data.limit = train.batch_size), recording the data indices and t each rank used; with
`slow-fid`, the process group's timeout is 5 s and each training FID takes 15 s longer."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # this checkout's ddpm

import torch
from tqdm import tqdm

from ddpm.params import load_params
from ddpm.runtime import init_world
from ddpm.train import Trainer
from fakes import record_draws, train_paths

params_file, cifar, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
one_step = sys.argv[4:] == ["one-step"]
params = load_params(params_file)
if sys.argv[4:] == ["slow-fid"]:  # rank 0's FID outlasts the process group's timeout 3 times
    import time
    from datetime import timedelta

    from ddpm.evaluate import TrainingFid
    timeout = timedelta(seconds=5)
    real_fid = TrainingFid.__call__

    def slow_fid(*args, **kwargs):
        time.sleep(3 * timeout.total_seconds())
        return real_fid(*args, **kwargs)

    TrainingFid.__call__ = slow_fid
    world, device = init_world(params.device, params.train.gpus, timeout)
else:
    world, device = init_world(params.device, params.train.gpus)
trainer = Trainer(params, train_paths(out, cifar), world, device,
                  dtype=torch.float64 if one_step else torch.float32)
init = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
if one_step:
    seen = record_draws(trainer)
    trainer.epoch(0, tqdm(disable=True))
    steps = trainer.state.progress.step
else:
    seen, steps = None, trainer.run().step
torch.save({"model": trainer.state.model.state_dict(), "ema": trainer.state.ema.state_dict(),
            "init": init, "steps": steps, "seen": seen}, out / f"rank{world.rank}.pt")
world.close()

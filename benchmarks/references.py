"""What a user would otherwise run, written the way its own examples and the seed notebook do.

Each builder returns a zero-argument callable that performs one full optimizer step (noise,
forward, loss, backward, clipping, Adam, EMA) on `batch` images, like `Trainer.optimizer_step`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DDPM_CIFAR10 = dict(arch="ddpm", channels=[128, 256, 256, 256], res_blocks=2,
                    attention_resolutions=[16], heads=1, dropout=0.1)
SEED = dict(arch="seed", channels=[96, 192, 384, 384], res_blocks=2, attention_resolutions=[16],
            heads=8, dropout=0.1, time_dim=64)
# presets/res64.yaml's network (built at image_size 64): the seed's one level deeper
RES64 = dict(SEED, channels=[96, 192, 288, 384, 384], attention_resolutions=[32, 16, 8])


def diffusers_unet(dropout: float = 0.1) -> torch.nn.Module:
    """google/ddpm-cifar10-32's UNet2DModel: (128, 256, 256, 256), attention at 16x16."""
    from diffusers import UNet2DModel
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, dropout=dropout)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def diffusers_step(images: torch.Tensor, batch: int, precision: str, device: torch.device):
    """diffusers' train_unconditional example: DDPMScheduler.add_noise, Adam, EMAModel."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    model = diffusers_unet().to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        idx = torch.randint(0, len(images), (batch,), device=device)
        x0 = images[idx].float() / 127.5 - 1
        x0 = torch.where(torch.rand(batch, 1, 1, 1, device=device) < 0.5, x0.flip(3), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with _autocast(precision, device):
            pred = model(scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
    return model, step


class _PILDataset(torch.utils.data.Dataset):
    """torchvision's CIFAR10 dataset as the seed used it: a PIL image per item, then transforms."""

    def __init__(self, images_hwc: np.ndarray):
        import torchvision.transforms as T
        self.images = images_hwc
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]))


def seed_style_step(model: torch.nn.Module, images: torch.Tensor, batch: int,
                    device: torch.device, workers: int = 2):
    """The seed notebook's loop: PIL DataLoader, fp16 autocast on CUDA only (fp32 on a CPU),
    and an EMA written as a Python loop over the parameters."""
    import copy
    from ddpm.diffusion import Schedule, q_sample
    sched = Schedule(1000, 1e-4, 0.02, "linear").to(device)
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loader = torch.utils.data.DataLoader(
        _PILDataset(images.permute(0, 2, 3, 1).cpu().numpy()), batch_size=batch, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    batches = iter(())

    def step():
        nonlocal batches
        try:
            x0 = next(batches)
        except StopIteration:
            batches = iter(loader)
            x0 = next(batches)
        x0 = x0.to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = F.mse_loss(model(q_sample(sched, x0, t, noise), t).float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    return step

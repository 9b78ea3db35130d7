"""Memory of one sampling step (a UNet forward under inference_mode) against sample.batch_size.

    python benchmarks/sample_memory.py [--device cuda] [--batches 1,16,64,250,1000]
                                       [--json benchmarks/results/sample_memory.json]

On a GPU: torch.cuda.max_memory_allocated. On the CPU: the peak RSS growth of a fresh process
over its RSS with the model loaded (the same activations, measured by the operating system).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def one(batch: int, device_name: str, precision: str) -> dict:
    import torch
    from ddpm.generate import for_sampling
    from ddpm.runtime import autocast, resolve_device
    from ddpm import networks
    from ddpm.params import load_params
    device = resolve_device(device_name)
    model = networks.build(load_params(ROOT / "params.yaml").model, (3, 32, 32))  # its network
    model = for_sampling(model.to(device), None)  # the stage's layout, eager
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.full((batch,), 999, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.inference_mode(), autocast(precision, device):
        model(x, t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batch": batch, "model_mb": base / 2**20, "step_mb": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batches", default="1,16,64,250")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.precision)))
        return
    from ddpm.runtime import resolve_device
    device = resolve_device(args.device).type
    print(f"| sample.batch_size | memory of one step beyond the weights ({device}, "
          f"{args.precision}) |")
    print("| --- | --- |")
    rows = []
    for batch in map(int, args.batches.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(batch), "--device",
                              args.device, "--precision", args.precision], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out))
        print(f"| {batch} | {rows[-1]['step_mb']:.0f} MiB |", flush=True)
    if args.json:
        import record
        from ddpm.params import load_params
        measured = "torch.cuda.max_memory_allocated" if device == "cuda" else \
            "peak RSS growth of a fresh process"
        record.write(args.json, {
            **record.machine(resolve_device(args.device)), "precision": args.precision,
            "model": load_params(ROOT / "params.yaml").to_dict()["model"], "measured": measured,
            "rows": [{k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows]})


if __name__ == "__main__":
    main()

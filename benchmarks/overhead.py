"""What the samplers cost beyond the model's own forward passes.

1. Per-step cost: sdekit's ``ddim`` against diffusers' ``DDIMScheduler`` on the same tensors (batch 16,
   3 x 32 x 32), as a ratio (target: <= 1).
2. Whole-loop overhead: a small ``UNet2DModel`` at batch 16 sampled with every built-in sampler; the loop time
   over NFE x the model's forward time, and the share of the loop spent inside the scheduler (target: < 3%).

    python benchmarks/overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

import sdekit

SHAPE = (16, 3, 32, 32)


def per_step_seconds(scheduler, repeats: int, steps: int = 50) -> float:
    """Median over ``repeats`` of the mean time of one ``step()`` over a ``steps``-step loop (model excluded)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=gen)
    outputs = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    times = []
    for _ in range(repeats):
        scheduler.set_timesteps(steps)
        x = x0
        start = time.perf_counter()
        for out, t in zip(outputs, scheduler.timesteps):
            x = scheduler.step(out, t, x).prev_sample
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


@torch.no_grad()
def loop_times(scheduler, model: UNet2DModel, steps: int) -> tuple[int, float, float]:
    """(NFE, loop seconds, seconds spent inside scheduler.step / scale_model_input) for one sampling loop."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    in_scheduler = 0.0
    start = time.perf_counter()
    for t in scheduler.timesteps:
        tick = time.perf_counter()
        x_in = scheduler.scale_model_input(x, t)
        in_scheduler += time.perf_counter() - tick
        out = model(x_in, t).sample
        tick = time.perf_counter()
        x = scheduler.step(out, t, x, generator=gen).prev_sample
        in_scheduler += time.perf_counter() - tick
    return len(scheduler.timesteps), time.perf_counter() - start, in_scheduler


@torch.no_grad()
def forward_seconds(model: UNet2DModel, repeats: int) -> float:
    x = torch.randn(SHAPE)
    model(x, torch.tensor(500.0))
    times = []
    for i in range(repeats * 4):
        start = time.perf_counter()
        model(x, torch.tensor(float(999 - 37 * i)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = DDPMScheduler().config
    torch.set_num_threads(max(1, torch.get_num_threads()))

    ours = per_step_seconds(sdekit.load_scheduler("ddim", config), args.repeats)
    theirs = per_step_seconds(DDIMScheduler.from_config(config), args.repeats)
    print(f"Per-step cost, batch {SHAPE[0]} x {SHAPE[1:]} float32, model excluded (median of {args.repeats}):")
    print(f"  diffusers DDIMScheduler.step  {theirs * 1e6:9.1f} us")
    print(f"  sdekit ddim step              {ours * 1e6:9.1f} us")
    print(f"  ratio sdekit / diffusers      {ours / theirs:9.2f}   (target <= 1)")

    model = unet()
    forward = forward_seconds(model, args.repeats)
    print(f"\nWhole loop, UNet2DModel (32-64 channels, attention) at batch {SHAPE[0]}; forward {forward * 1e3:.1f} ms")
    print(f"{'sampler':<36}{'NFE':>5}{'loop s':>9}{'loop/(NFE x fwd)':>18}{'in step()':>11}")
    samplers = {
        "diffusers DDIMScheduler": DDIMScheduler.from_config(config),
        "ddim": sdekit.load_scheduler("ddim", config),
        "ddim eta=1": sdekit.load_scheduler("ddim", config, eta=1.0),
        "pc (reverse diffusion + langevin)": sdekit.load_scheduler("pc", config),
        "pc ancestral + ald": sdekit.load_scheduler("pc", config, predictor="ancestral", corrector="ald"),
        "pf-ode euler": sdekit.load_scheduler("pf-ode", config, solver="euler"),
        "pf-ode heun": sdekit.load_scheduler("pf-ode", config, solver="heun"),
    }
    for label, scheduler in samplers.items():
        nfe, seconds, in_step = loop_times(scheduler, model, 10)
        print(f"{label:<36}{nfe:>5}{seconds:>9.2f}{seconds / (nfe * forward):>18.3f}{in_step / seconds * 100:>10.2f}%")
    print("(in step(): share of the loop spent in scale_model_input + step, timed inside the same loop; target < 3%.")
    print(" loop/(NFE x fwd) compares with a separately timed forward pass, so machine noise moves it by a few %.)")


if __name__ == "__main__":
    main()

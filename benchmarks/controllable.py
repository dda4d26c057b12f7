"""Controllable generation on exact oracles: inpainting, classifier guidance and colorization with every built-in
sampler, against diffusers' RePaint and guided DDIM / DDPM loops in the same run.

1. Inpainting (``sdekit.testing.conditional.half_mask_mixture``: four components over 1 x 4 x 4 images, the right
   half hidden): the share of samples whose hidden half lands in the component that the known half selects under
   the exact conditional, with and without RePaint resampling (``resample_steps`` U), and the model evaluations it
   took. The peer is diffusers' ``RePaintScheduler`` (jump length 1, ``jump_n_sample = U + 1``) at ``eta`` 0 and 1.
2. Classifier guidance (``class_mixture``: four overlapping classes, weights 0.4 / 0.3 / 0.2 / 0.1) with the exact
   time-dependent posterior as the classifier: the share of samples the exact posterior at ``t = 0`` assigns to
   the requested class, at guidance scale 0 and 1, next to the ceiling (exact samples of the class). The peer is a
   hand-written diffusers ``DDIMScheduler`` / ``DDPMScheduler`` loop with ``eps - w sqrt(1 - abar) grad``.
3. Colorization (``color_mixture``: three colours over 3 x 4 x 4 images): the largest gap between the result's
   channel mean and the gray input, and the share of samples whose colour is the one the gray image selects.

Times are the fastest of ``--repeats`` runs, the ratio sdekit / diffusers (below 1: sdekit is faster); the oracle
model costs almost nothing, so they compare the loops' own overhead. About 5 minutes on one CPU core:

    python benchmarks/controllable.py [--samples 2000] [--steps 50 200] [--resample 0 1 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, RePaintScheduler

import sdekit
from sdekit.inpainting import decouple_colors
from sdekit.testing import GaussianMixture, MixtureScoreModel
from sdekit.testing.conditional import (
    MixturePosteriorClassifier,
    class_mixture,
    color_mixture,
    decoupled_mixture,
    half_mask_mixture,
    masked_conditional,
)

SAMPLERS: list[tuple[str, str, dict]] = [
    ("pc", "pc", {}),
    ("ddim eta=1", "ddim", {"eta": 1.0}),
    ("analytic-dpm eta=1", "analytic-dpm", {"eta": 1.0}),
    ("ddim eta=0", "ddim", {"eta": 0.0}),
    ("analytic-dpm eta=0", "analytic-dpm", {"eta": 0.0}),
    ("pf-ode (heun)", "pf-ode", {}),
    ("pf-ode (euler)", "pf-ode", {"solver": "euler"}),
]


def scheduler_for(name: str, options: dict, mixture: GaussianMixture, steps: int):  # noqa: ANN201
    """A built-in sampler on DDPM's table; analytic-dpm with Gamma estimated at the ``steps`` levels it visits."""
    scheduler = sdekit.load_scheduler(name, DDPMScheduler().config, **options)
    if name == "analytic-dpm":
        data = mixture.sample(2000, torch.Generator().manual_seed(5)).clamp(-1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.estimate_gamma(
                MixtureScoreModel(mixture, scheduler.sde),
                data,
                num_samples=2000,
                batch_size=2000,
                timesteps="trajectory",
                num_inference_steps=steps,
                estimator="error",
                show_progress=False,
            )
    return scheduler


def rate(hit: torch.Tensor) -> float:
    return float(hit.float().mean())


def timed(run: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """``run()``'s result and its fastest wall time over ``repeats`` runs (the runs are seeded: same result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return out, best


# -- 1. inpainting --------------------------------------------------------------------------------------------


@torch.no_grad()
def repaint(mixture: GaussianMixture, data: torch.Tensor, mask: torch.Tensor, steps: int, eta: float, repeats: int):
    """diffusers' RePaint loop (RePaintPipeline's, on tensors): jump length 1, ``repeats + 1`` samples per jump."""
    scheduler = RePaintScheduler(clip_sample=False)
    model = MixtureScoreModel(mixture, sdekit.load_scheduler("ddim", DDPMScheduler().config).sde)
    generator = torch.Generator().manual_seed(2)
    scheduler.set_timesteps(steps, jump_length=1, jump_n_sample=repeats + 1)
    scheduler.eta = eta
    x = torch.randn(data.shape, generator=generator)
    t_last = scheduler.timesteps[0] + 1
    for t in scheduler.timesteps:
        if t < t_last:
            x = scheduler.step(model(x, t).sample, t, x, data, mask, generator).prev_sample
        else:
            x = scheduler.undo_step(x, t_last, generator)
        t_last = t
    return x, model.num_calls


def inpainting_table(args: argparse.Namespace) -> None:
    mixture, mask = half_mask_mixture()
    data = mixture.sample(args.samples, torch.Generator().manual_seed(1))
    exact = masked_conditional(mixture, data, mask)
    selected = exact.selected()
    print(f"\n## Inpainting: half the coordinates hidden ({args.samples} samples)\n")
    print("Share of samples in the component the known half selects (model evaluations per sample); the exact")
    print(f"conditional's own samples land there {rate(exact.landed(_exact_samples(exact, data)) == selected):.3f}.\n")
    header = " | ".join(f"{k} steps, U={u}" for k in args.steps for u in args.resample)
    print(f"| sampler | {header} |")
    print("|" + " --- |" * (1 + len(args.steps) * len(args.resample)))
    sdekit_times: dict[tuple[str, int, int], float] = {}
    sdekit_rates: dict[tuple[str, int, int], float] = {}
    for label, name, options in SAMPLERS:
        cells = []
        for steps in args.steps:
            scheduler = scheduler_for(name, options, mixture, steps)
            model = MixtureScoreModel(mixture, scheduler.sde)
            for u in args.resample:
                model.num_calls = 0
                repeats = args.repeats if label.startswith("ddim") else 1  # the rows compared with RePaint
                out, seconds = timed(
                    lambda: sdekit.inpaint(
                        model,
                        scheduler,
                        data,
                        mask,
                        num_inference_steps=steps,
                        generator=torch.Generator().manual_seed(2),
                        resample_steps=u,
                        show_progress=False,
                    ),
                    repeats,
                )
                assert torch.equal(out[..., :2], data[..., :2])
                value = rate(exact.landed(out) == selected)
                sdekit_times[(label, steps, u)], sdekit_rates[(label, steps, u)] = seconds, value
                cells.append(f"{value:.3f} ({model.num_calls // repeats})")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    peer_rows = []
    for eta in (1.0, 0.0):
        cells, ratios = [], []
        for steps in args.steps:
            for u in args.resample:
                (out, calls), seconds = timed(
                    lambda: repaint(mixture, data, mask.expand_as(data), steps, eta, u), args.repeats
                )
                assert torch.equal(out[..., :2], data[..., :2])
                value = rate(exact.landed(out) == selected)
                ours = f"ddim eta={eta:g}"
                cells.append(f"{value:.3f} ({calls})")
                ratio_rate = sdekit_rates[(ours, steps, u)] / value
                ratios.append(f"{ratio_rate:.3f} / {sdekit_times[(ours, steps, u)] / seconds:.2f}")
        peer_rows.append(f"| diffusers RePaint eta={eta:g} | " + " | ".join(cells) + " |")
        peer_rows.append(f"| ddim eta={eta:g} / RePaint: rate / time | " + " | ".join(ratios) + " |")
    print("\n".join(peer_rows))
    print("\nRePaint's jumps are made at every level but the first; sdekit's at every level (hence its NFE).")


def _exact_samples(exact, data: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``data`` with its hidden values drawn from the exact conditional (the rate's ceiling)."""
    generator = torch.Generator().manual_seed(3)
    comp = torch.multinomial(exact.weights, 1, generator=generator)[:, 0]
    chol = torch.linalg.cholesky(exact.covs[comp])
    noise = torch.randn(data.shape[0], exact.covs.shape[1], 1, generator=generator, dtype=torch.float64)
    hidden = exact.means[torch.arange(data.shape[0]), comp] + (chol @ noise)[..., 0]
    full = data.reshape(data.shape[0], -1).to(torch.float64).clone()
    full[:, exact.hidden] = hidden
    return full.reshape(data.shape)


# -- 2. classifier guidance -----------------------------------------------------------------------------------


def diffusers_guided(mixture: GaussianMixture, labels: torch.Tensor, steps: int, scale: float, eta: float | None):
    """A hand-written diffusers loop (DDIMScheduler with ``eta``, or DDPMScheduler for ``eta=None``) whose
    epsilon is guided as Dhariwal & Nichol's eq. 14: ``eps - w sqrt(1 - abar_t) grad log p(y | x_t)``."""
    scheduler = DDPMScheduler() if eta is None else DDIMScheduler()
    sde = sdekit.load_scheduler("ddim", DDPMScheduler().config).sde
    model, classifier = MixtureScoreModel(mixture, sde), MixturePosteriorClassifier(mixture, sde)
    generator = torch.Generator().manual_seed(2)
    scheduler.set_timesteps(steps)
    x = torch.randn(labels.shape[0], 1, 4, 4, generator=generator)
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = model(x, t).sample
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            chosen = torch.log_softmax(classifier(xg, t), dim=1).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, xg)
        eps = eps - scale * (1 - scheduler.alphas_cumprod[t]) ** 0.5 * grad
        kwargs = {} if eta is None else {"eta": eta}
        x = scheduler.step(eps, t, x, generator=generator, **kwargs).prev_sample
    return x


def guidance_table(args: argparse.Namespace) -> None:
    mixture = class_mixture()
    n = args.samples
    labels = torch.arange(n) % 4
    posterior = MixturePosteriorClassifier(mixture, sdekit.get_sde("vp"))
    generator = torch.Generator().manual_seed(4)
    per_class = [
        GaussianMixture(mixture.means[k : k + 1], stds=torch.tensor([0.25]), event_shape=(1, 4, 4)).sample(n, generator)
        for k in range(4)
    ]
    exact = torch.stack(per_class)[labels, torch.arange(n)]
    with torch.no_grad():
        ceiling = rate(posterior(exact, torch.tensor(0)).argmax(1) == labels)
    print(f"\n## Classifier guidance: the exact posterior as classifier ({n} samples, classes in turn)\n")
    print(f"Share of samples in the requested class; exact samples of the class reach {ceiling:.3f}.\n")
    header = " | ".join(f"{k} steps, w={w:g}" for k in args.steps for w in (0.0, 1.0))
    print(f"| sampler | {header} |")
    print("|" + " --- |" * (1 + 2 * len(args.steps)))
    ours: dict[tuple[str, int, float], float] = {}
    for label, name, options in SAMPLERS:
        cells = []
        for steps in args.steps:
            scheduler = scheduler_for(name, options, mixture, steps)
            model = MixtureScoreModel(mixture, scheduler.sde)
            classifier = MixturePosteriorClassifier(mixture, scheduler.sde)
            for scale in (0.0, 1.0):
                out = sdekit.sample(
                    model,
                    scheduler,
                    n,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(2),
                    classifier=classifier,
                    class_labels=labels,
                    guidance_scale=scale,
                    show_progress=False,
                )
                with torch.no_grad():
                    ours[(label, steps, scale)] = rate(posterior(out, torch.tensor(0)).argmax(1) == labels)
                cells.append(f"{ours[(label, steps, scale)]:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    for peer, eta, mine in (("DDPMScheduler", None, "ddim eta=1"), ("DDIMScheduler eta=0", 0.0, "ddim eta=0")):
        cells, ratios = [], []
        for steps in args.steps:
            for scale in (0.0, 1.0):
                out = diffusers_guided(mixture, labels, steps, scale, eta)
                with torch.no_grad():
                    value = rate(posterior(out, torch.tensor(0)).argmax(1) == labels)
                cells.append(f"{value:.3f}")
                ratios.append(f"{ours[(mine, steps, scale)] / value:.3f}")
        print(f"| diffusers {peer} | " + " | ".join(cells) + " |")
        print(f"| {mine} / diffusers {peer} | " + " | ".join(ratios) + " |")


# -- 3. colorization ------------------------------------------------------------------------------------------


def colorization_table(args: argparse.Namespace) -> None:
    mixture = color_mixture()
    n = min(args.samples, 1000)
    data = mixture.sample(n, torch.Generator().manual_seed(1))
    gray = data.mean(1, keepdim=True)
    mask = torch.zeros(1, 3, 4, 4)
    mask[:, 0] = 1
    exact = masked_conditional(decoupled_mixture(mixture), decouple_colors(data.double()), mask)
    steps = args.steps[0]
    print(f"\n## Colorization ({n} samples, {steps} steps)\n")
    print("Largest |channel mean - gray| and the share of samples with the colour the gray image selects.\n")
    header = " | ".join(f"U={u}" for u in args.resample)
    print(f"| sampler | largest gray error | {header} |")
    print("|" + " --- |" * (2 + len(args.resample)))
    for label, name, options in SAMPLERS:
        scheduler = scheduler_for(name, options, mixture, steps)
        model = MixtureScoreModel(mixture, scheduler.sde)
        cells, error = [], 0.0
        for u in args.resample:
            out = sdekit.colorize(
                model,
                scheduler,
                gray,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(3),
                resample_steps=u,
                show_progress=False,
            )
            error = max(error, float((out.mean(1, keepdim=True) - gray).abs().max()))
            cells.append(f"{rate(exact.landed(decouple_colors(out.double())) == exact.selected()):.3f}")
        print(f"| {label} | {error:.1e} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples per rate")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200], help="num_inference_steps values")
    parser.add_argument("--resample", type=int, nargs="+", default=[0, 1, 3], help="resample_steps values U")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of sdekit ddim and RePaint (fastest kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inpainting_table(args)
    guidance_table(args)
    colorization_table(args)


if __name__ == "__main__":
    main()

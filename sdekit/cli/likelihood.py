"""``sdekit likelihood``: bits/dim of data under a model, with a 95% confidence interval over the samples."""

from __future__ import annotations

import argparse
import json
import math

import torch

from .. import registry
from ..flow_likelihood import TRACE_METHODS, likelihood
from ..sharding import map_batches, sample_generators, share_size
from .base import add_data_options, add_model_options, add_output_options, add_run_options, positive_float
from .files import check_output, read_data, write_atomically
from .models import load_model
from .processes import command_device, process_state, share_progress

__all__ = ["EXAMPLE", "HELP", "configure", "run", "summarize"]

HELP = "bits/dim of data under a model (exact likelihood through the probability-flow ODE), with a 95% interval"
EXAMPLE = "sdekit likelihood --model out --data digits/ --num-samples 100"


def configure(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit likelihood``."""
    add_model_options(parser, sampler=False)
    add_data_options(parser, "score")
    parser.add_argument(
        "--trace",
        choices=TRACE_METHODS,
        default="hutchinson",
        help="divergence: Skilling-Hutchinson estimate (default) or exact (D backward passes per call)",
    )
    parser.add_argument("--rtol", type=positive_float, default=1e-5, help="ODE solver tolerance (default 1e-5)")
    parser.add_argument("--atol", type=positive_float, default=1e-5, help="ODE solver tolerance (default 1e-5)")
    add_run_options(parser, batch_size=16)
    add_output_options(parser, (".json",), "also write the summary and every sample's result", required=False)


def summarize(bpd: torch.Tensor) -> dict[str, float | list[float] | int]:
    """Mean bits/dim and its 95% confidence interval: Student's t interval ``mean +- t_{0.975, n-1} s / sqrt(n)``
    over the ``n`` samples (``s`` the sample standard deviation; the interval covers the data's spread and the
    randomness of dequantization and Hutchinson probes). ``n = 1`` gives no interval (``nan`` bounds)."""
    values = bpd.double()
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return {"num_samples": n, "bpd": mean, "bpd_ci95": [math.nan, math.nan]}
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * float(values.std(correction=1)) / math.sqrt(n)
    return {"num_samples": n, "bpd": mean, "bpd_ci95": [mean - half, mean + half]}


def run(args: argparse.Namespace) -> int:
    """Run ``sdekit likelihood``: every process scores its share of the data, the main process prints the result
    (and writes ``--out``)."""
    out = check_output(args.out, args.overwrite, (".json",)) if args.out else None
    state = process_state(args.device)
    device = command_device(args, state)
    loaded = load_model(args, device)
    scheduler = registry.load_scheduler("pf-ode", loaded.config)  # the probability-flow ODE of the model's SDE
    data = read_data(args.data, loaded.sample_shape, split=args.split, limit=args.num_samples)
    count = data.x.shape[0]
    share = share_size(count, args.batch_size, state.process_index, state.num_processes)
    with share_progress(state, share, "likelihood", "sample") as progress:

        def batch(indices: range) -> dict[str, torch.Tensor]:
            result = likelihood(
                loaded.model,
                data.x[indices.start : indices.stop].to(device),
                scheduler,
                trace=args.trace,
                rtol=args.rtol,
                atol=args.atol,
                dequantize=data.eight_bit,
                generator=sample_generators(args.seed, indices),
            )
            progress.update(len(indices), bpd=float(result.bpd.mean()))
            return {"bpd": result.bpd, "nll": result.nll, "nfe": result.nfe}

        gathered = map_batches(batch, count, args.batch_size, state=state)
    if gathered is None:
        return 0
    summary = summarize(gathered["bpd"])
    kind = "dequantized 8-bit data" if data.eight_bit else "continuous data"
    calls = float(gathered["nfe"].double().mean())
    low, high = summary["bpd_ci95"]
    if count > 1:
        interval = f" +- {(high - low) / 2:.4f} (95% interval [{low:.4f}, {high:.4f}] over {count} samples"
    else:
        interval = " (1 sample, so no interval: pass --num-samples 2 or more"
    print(f"bits/dim: {summary['bpd']:.4f}{interval}; {kind}; {calls:.0f} model calls per sample)")
    if out is not None:
        record = {
            "model": args.model,
            "data": data.description,
            "dequantized": data.eight_bit,
            **summary,
            "per_sample": {key: value.tolist() for key, value in gathered.items()},
        }
        text = json.dumps(record, indent=1, allow_nan=True).encode()
        write_atomically(out, lambda file: file.write(text), args.overwrite)
        print(f"wrote every sample's result to {out}")
    return 0

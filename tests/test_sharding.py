"""Splitting the CLI's work over accelerate processes: the split, the per-sample generators, and real 2-process CPU
runs of ``sdekit sample`` and ``sdekit likelihood`` that give exactly what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

import sdekit
import sdekit.sharding
from sdekit.cli import main
from sdekit.sharding import (
    map_batches,
    process_batches,
    sample_generators,
    sample_seed,
    share_size,
    split_batches,
)

from conftest import launch_two_processes, run_process_tree, tiny_unet

ONE_PROCESS = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)


def test_processes_share_whole_batches_in_order() -> None:
    for num_items in range(0, 14):
        for batch_size in range(1, 6):
            batches = split_batches(num_items, batch_size)
            assert all(len(b) == batch_size for b in batches[:-1])
            for processes in range(1, 5):
                shares = [process_batches(len(batches), r, processes) for r in range(processes)]
                # Concatenated in rank order, the shares are every item once, in order.
                assert [i for share in shares for b in share for i in batches[b]] == list(range(num_items))
                assert max(map(len, shares)) - min(map(len, shares)) <= 1
                sizes = [share_size(num_items, batch_size, r, processes) for r in range(processes)]
                assert sizes == [sum(len(batches[b]) for b in share) for share in shares]
    with pytest.raises(ValueError, match="process_index"):
        process_batches(3, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        split_batches(3, 0)


def test_each_sample_draws_from_its_own_seeded_generator() -> None:
    seeds = {sample_seed(seed, index) for seed in range(20) for index in range(50)}
    assert len(seeds) == 1000  # no collisions such as seed + index would give
    every = [torch.randn(4, generator=g) for g in sample_generators(3, range(6))]
    part = [torch.randn(4, generator=g) for g in sample_generators(3, range(2, 5))]
    assert all(torch.equal(a, b) for a, b in zip(part, every[2:5], strict=True))
    assert not torch.equal(every[0], torch.randn(4, generator=sample_generators(4, [0])[0]))
    with pytest.raises(ValueError, match="seed"):
        sample_seed(-1, 0)


def test_map_batches_gathers_in_order_and_reraises() -> None:
    seen = []

    def fn(indices: range) -> dict[str, torch.Tensor]:
        seen.append(indices)
        return {"index": torch.tensor(list(indices)), "square": torch.tensor(list(indices)) ** 2}

    result = map_batches(fn, 7, 3, state=ONE_PROCESS)
    assert seen == [range(0, 3), range(3, 6), range(6, 7)]
    assert torch.equal(result["index"], torch.arange(7)) and torch.equal(result["square"], torch.arange(7) ** 2)
    assert map_batches(fn, 0, 3, state=ONE_PROCESS) == {}

    def fail(indices: range) -> dict[str, torch.Tensor]:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        map_batches(fail, 4, 2, state=ONE_PROCESS)


# -- two real processes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharding") / "model"
    DDPMPipeline(unet=tiny_unet(1), scheduler=sdekit.load_scheduler("pf-ode")).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def _launch_two(flags: list[str]) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` (2 CPU processes, gloo) ``-m sdekit`` with ``flags``: what ``python -m sdekit`` runs."""
    command = launch_two_processes(Path("sdekit"))
    command.insert(-1, "-m")
    # One thread per process, as the in-process runs of this suite use (conftest.py), so that both compute alike.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SDEKIT_PROGRESS": "lines"}
    return run_process_tree([*command, *flags], timeout=300, env=env)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_processes_sample_what_one_process_samples(model_folder: Path, tmp_path: Path) -> None:
    # A stochastic sampler (fresh noise at every step from each sample's generator); 5 samples in 3 batches of 2, so
    # process 0 draws batch 0 and process 1 batches 1 and 2.
    flags = ["sample", "--model", str(model_folder), "--sampler", "ddim", "--option", "eta=1", "--steps", "3",
             "--num-samples", "5", "--batch-size", "2", "--seed", "11"]  # fmt: skip
    run = _launch_two([*flags, "--out", str(tmp_path / "two.npz")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(process 0's share of 2): 100% 3/3 call" in run.stderr  # one batch of 3 model calls, not all three
    assert run.stdout.count("wrote 5 samples") == 1  # the main process alone writes
    assert main([*flags, "--out", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["samples"], two["samples"]) and np.array_equal(one["images"], two["images"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_two_processes_score_what_one_process_scores(
    model_folder: Path, digit_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 3 images in batches of 1: process 0 scores image 0, process 1 images 1 and 2, each with Hutchinson probes and
    # dequantization noise from its image's own generator. Loose tolerances: only the equality matters here.
    flags = ["likelihood", "--model", str(model_folder), "--data", str(digit_folder), "--num-samples", "3",
             "--batch-size", "1", "--rtol", "5e-2", "--atol", "5e-2", "--seed", "5"]  # fmt: skip
    run = _launch_two([*flags, "--out", str(tmp_path / "two.json")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(process 0's share of 2): 100% 1/1 sample" in run.stderr
    assert main([*flags, "--out", str(tmp_path / "one.json")]) == 0
    assert capsys.readouterr().out == run.stdout.replace("two.json", "one.json")
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["per_sample"] == two["per_sample"] and one["bpd_ci95"] == two["bpd_ci95"]
    assert len(set(one["per_sample"]["bpd"])) == 3


FAILING_SCRIPT = """
import importlib.util, sys

spec = importlib.util.spec_from_file_location("sharding", sys.argv[1])
sharding = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sharding)
import torch
from accelerate import PartialState

state = PartialState(cpu=True)


def batch(indices):
    if state.process_index == 1:
        raise ValueError(f"cannot score items {list(indices)}")
    return {"i": torch.tensor(list(indices))}


try:
    outcome = f"returned {sharding.map_batches(batch, 4, 1, state=state)}"
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"
finally:
    state.destroy_process_group()  # as sdekit.cli.main does
with open(f"{sys.argv[2]}/process-{state.process_index}.txt", "w") as file:  # not stdout: the two would interleave
    file.write(outcome)
"""


def test_a_failure_on_one_process_stops_both(tmp_path: Path) -> None:
    # map_batches itself, loaded without the sdekit package so that the processes start in seconds: process 1
    # fails on its first batch while process 0 finishes its own; neither waits forever for the other.
    script = tmp_path / "failing.py"
    script.write_text(FAILING_SCRIPT)
    command = [*launch_two_processes(script), str(Path(sdekit.sharding.__file__)), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = run_process_tree(command, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    outcomes = [(tmp_path / f"process-{rank}.txt").read_text() for rank in range(2)]
    assert outcomes == [
        "ShardFailure: process 1 of 2 failed: ValueError: cannot score items [2]",
        "ValueError: cannot score items [2]",
    ]

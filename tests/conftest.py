"""Shared fixtures: the built-in SDEs and a small 2-d mixture with its exact-score oracle."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's tensors are tiny: one thread avoids thread start-up costs that dominate them on 2 cores.
torch.set_num_threads(1)

import sdekit  # noqa: E402
from sdekit import testing  # noqa: E402
from sdekit.registry import refresh_plugins  # noqa: E402
from sdekit.testing import GaussianMixture, MixtureScoreModel  # noqa: E402
from sdekit_sdes import VESDE, VPSDE, SubVPSDE  # noqa: E402

SDE_FACTORIES = {
    "ve": lambda: VESDE(),
    "vp": lambda: VPSDE(),
    "subvp": lambda: SubVPSDE(),
    "vp-ddpm": lambda: VPSDE(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
}


@pytest.fixture(params=list(SDE_FACTORIES))
def any_sde(request: pytest.FixtureRequest):
    """Each built-in SDE, plus VP on a discrete DDPM table."""
    return SDE_FACTORIES[request.param]()


@pytest.fixture
def mixture_2d() -> GaussianMixture:
    """Three well separated, unequal components in 2-d; one with a full covariance."""
    covs = torch.tensor(
        [
            [[0.09, 0.0], [0.0, 0.09]],
            [[0.25, 0.15], [0.15, 0.20]],
            [[0.04, 0.0], [0.0, 0.01]],
        ]
    )
    return GaussianMixture(
        means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]),
        covs=covs,
        weights=torch.tensor([0.5, 0.3, 0.2]),
    )


def float64_table(scheduler: DDIMScheduler | DDPMScheduler) -> DDIMScheduler | DDPMScheduler:
    """Give a diffusers scheduler the float64 cumulative product of its own betas.

    diffusers keeps ``alphas_cumprod`` in float32, up to 4e-7 relative off the exact product; over a 1000-step
    loop that alone moves samples by ~1e-4. With this table a reference differs from sdekit by rounding only.
    """
    scheduler.alphas_cumprod = torch.cumprod(1 - scheduler.betas.to(torch.float64), dim=0)
    if isinstance(scheduler, DDIMScheduler):
        one = torch.tensor(1.0, dtype=torch.float64)
        scheduler.final_alpha_cumprod = one if scheduler.config.set_alpha_to_one else scheduler.alphas_cumprod[0]
    return scheduler


def tiny_unet(channels: int = 3, seed: int = 0, sample_size: int = 8) -> UNet2DModel:
    """:func:`sdekit.testing.tiny_unet`, seeded (the seed also stays set on torch's global generator)."""
    torch.manual_seed(seed)
    return testing.tiny_unet(channels, sample_size)


TINY_TRAINING = [
    "--resolution", "8",
    "--train_batch_size", "8",
    "--report_to", "none",
    "--save_images_steps", "0",
    "--sample_steps", "2",
    "--num_sample_images", "4",
    "--lr_warmup_steps", "1",
]  # fmt: skip
"""``training/train.py`` flags for a run that costs nothing: 8 x 8 images, batch 8, no tracker, no grids."""


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """An in-process trainer run starts from a clean accelerate state, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def launch_two_processes(script: Path) -> list[str]:
    """``accelerate launch`` of ``script`` as two CPU processes (gloo) on a free port, so that test workers running
    in parallel do not collide on accelerate's default port; append the script's flags."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
    ]  # fmt: skip


def run_process_tree(command: list[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True)`` for a command that starts processes of its own
    (``accelerate launch``), started as its own process group.

    On ``timeout`` the whole group is killed and ``pytest.fail`` shows the tail of its output. ``subprocess.run``
    would kill only the launcher and then wait for its pipes, which a surviving worker keeps open: a worker hung
    at exit would hang the suite instead of failing one test.
    """
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command[:3])} ... did not finish in {timeout:.0f} s; stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


TESTS = Path(__file__).parent
PLUGIN_DISTS = (TESTS / "plugin_dist", TESTS / "plugin_dist2")
PLUGIN_PACKAGES = ("sdekit_testplugins", "sdekit_extra_plugins")


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the pip-installed test plugin distributions (not on ``sys.path`` by itself).

    Installed once per session.
    """
    root = tmp_path_factory.mktemp("sdekit-plugin-site")
    site = root / "site"
    # Build from copies so that setuptools' build/ and *.egg-info never land in the source tree.
    sources = [shutil.copytree(dist, root / "src" / dist.name) for dist in PLUGIN_DISTS]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *map(str, sources),
        ],
        check=True,
    )
    return site


def _forget_plugin_modules() -> None:
    for module in list(sys.modules):
        if module.split(".")[0] in PLUGIN_PACKAGES:
            del sys.modules[module]


@pytest.fixture(scope="module")
def plugins_on_path(plugin_site: Path) -> Iterator[Path]:
    """The test plugins installed and visible for the duration of one test module."""
    sys.path.insert(0, str(plugin_site))
    refresh_plugins()
    yield plugin_site
    sys.path.remove(str(plugin_site))
    _forget_plugin_modules()
    refresh_plugins()


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder of 20 embedded digits as 8 x 8 PNGs: with batch 8, two training steps an epoch, so a short
    run crosses several epoch boundaries."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    for index, pixels in enumerate(load_digits().images[:20]):
        Image.fromarray((pixels / 16 * 255).round().astype("uint8")).save(folder / f"digit-{index:02d}.png")
    return folder


def oracle_scheduler(name: str, mixture: GaussianMixture, steps: int, **options: object) -> object:
    """The built-in sampler ``name`` on DDPM's table, for ``steps`` levels on ``mixture``'s exact oracle; for
    ``analytic-dpm`` with Gamma estimated from 400 data samples at the levels it visits."""
    scheduler = sdekit.load_scheduler(name, DDPMScheduler().config, **options)
    if name == "analytic-dpm":
        data = mixture.sample(400, torch.Generator().manual_seed(5)).clamp(-1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Monte Carlo Gamma a hair outside [0, 1] at level 0 is clipped
            scheduler.estimate_gamma(
                MixtureScoreModel(mixture, scheduler.sde),
                data,
                num_samples=400,
                batch_size=400,
                timesteps="trajectory",
                num_inference_steps=steps,
                estimator="error",
                show_progress=False,
            )
    return scheduler

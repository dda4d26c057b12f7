"""A third-party sampler plugin, discovered end to end: ``plugins/sdekit-dpm-solver`` installed with pip into a fresh
virtual environment next to sdekit, then uninstalled.

The environment is built offline and reuses the installed torch, diffusers, accelerate, ...: a venv with
``--system-site-packages`` (from the base interpreter) whose ``.pth`` file adds a view of this environment's
site-packages that leaves out sdekit and its plugin distributions (symlinks to everything else). sdekit and the
plugin are then built from copies of their sources and installed with ``pip install --no-deps --no-index
--no-build-isolation``: nothing is downloaded, and the source tree gets no build files.

With the plugin installed, ``dpm-solver`` is listed by ``sdekit plugins``, samples through ``sdekit sample --sampler``,
is written by the trainer (``training/train.py --sampler``) into the pipeline folder it saves and used for its
sample images, samples through the unmodified diffusers ``DDPMPipeline`` and comes back with
``DiffusionPipeline.from_pretrained``; ``SDEKIT_DISABLE_PLUGINS`` turns it off. After ``pip uninstall`` it is gone
from all of them, each saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from sdekit.testing import tiny_unet

from conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "sdekit-dpm-solver"
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
OFFLINE = ["--no-deps", "--no-index", "--no-build-isolation", "--quiet"]

CHECK = r"""
import contextlib, io, json, sys

arguments = json.loads(sys.argv[1])
sys.path.insert(0, arguments["training"])

import sdekit
import train
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from sdekit.cli import main as sdekit_main
from sdekit.testing import tiny_unet


def captured(command, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = command(argv)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


report = {"sdekit": sdekit.__file__, "samplers": [p.name for p in sdekit.list_plugins(kind="sampler")]}
report["sample"] = captured(sdekit_main, arguments["sample"])  # what the `sdekit` console script runs
report["train"] = captured(train.run, arguments["train"])  # what `python training/train.py` runs
try:
    scheduler = sdekit.load_scheduler("dpm-solver", DDPMScheduler().config, solver_order=3)
except Exception as err:
    report["load_scheduler"] = f"{type(err).__name__}: {err}"
else:
    report["module"] = sys.modules["sdekit_dpm_solver"].__file__
    unet = tiny_unet(1, 8)
    calls = []
    unet.register_forward_hook(lambda *args: calls.append(1))
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)  # the unmodified diffusers pipeline
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, output_type="np").images
    report["pipeline"] = {"shape": list(images.shape), "calls": len(calls), "timesteps": len(scheduler.timesteps),
                          "finite": bool((images == images).all())}
try:
    reloaded = DiffusionPipeline.from_pretrained(arguments["reload"])
    report["reloaded"] = type(reloaded.scheduler).__name__
except Exception as err:
    report["reloaded"] = f"{type(err).__name__}: {err}"
print(json.dumps(report))
"""


def _shared_site(target: Path) -> Path:
    """Symlinks to every entry of this environment's site-packages except sdekit's and its plugins' (``sdekit*``
    and their editable-install hooks); ``.pth`` files are left out too, as a path added by a ``.pth`` file is not
    a site directory."""
    target.mkdir(parents=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        name = entry.name.lower().removeprefix("__editable__").lstrip("._")
        if name.startswith("sdekit") or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def _fresh_venv(root: Path) -> Path:
    """A venv of the base interpreter with system site-packages, plus this environment's packages (sdekit's left
    out); returns its python."""
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # Named site-packages, as some libraries tell installed modules from the user's by that (dill, for datasets).
    (Path(site) / "sdekit-test-shared-site.pth").write_text(f"{_shared_site(root / 'shared' / 'site-packages')}\n")
    return python


def _sdekit_source(target: Path) -> Path:
    """The files sdekit's wheel is built from (its pyproject, README, the core and the built-in plugins)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "sdekit", target / "sdekit", ignore=ignore)
    for package in (ROOT / "plugins").glob("sdekit_*"):
        shutil.copytree(package, target / "plugins" / package.name, ignore=ignore)
    return target


def _run(args: list, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True)


def _plugin_rows(output: str) -> dict[str, list[str]]:
    """``sdekit plugins --kind sampler`` rows by name: [distribution, version, status]."""
    rows = {}
    for line in output.strip().splitlines()[1:]:
        name, _kind, distribution, version, status, *_ = line.split(None, 5)
        rows[name] = [distribution, version, status]
    return rows


def _check(python: Path, env: dict[str, str], cwd: Path, model: Path, out: str, trained: str, reload: str) -> dict:
    """Run :data:`CHECK` in the fresh environment: ``sdekit sample --sampler dpm-solver`` into ``out``,
    ``training/train.py --sampler dpm-solver`` into ``trained``, the ``DDPMPipeline`` and the reload of ``reload``."""
    arguments = {
        "training": str(ROOT / "training"),
        "sample": ["sample", "--model", str(model), "--sampler", "dpm-solver", "--option", "solver_order=3", "--steps",
                   "4", "--num-samples", "3", "--batch-size", "2", "--device", "cpu", "--out", out],
        "train": [*TINY_TRAINING, "--sampler", "dpm-solver", "--max_train_steps", "1", "--checkpointing_steps", "0",
                  "--output_dir", trained],
        "reload": reload,
    }  # fmt: skip
    checked = _run([python, "-c", CHECK, json.dumps(arguments)], env, cwd)
    assert checked.returncode == 0, checked.stderr[-3000:]
    return json.loads(checked.stdout.strip().splitlines()[-1])


def _listed(sdekit: Path, env: dict[str, str], cwd: Path) -> dict[str, list[str]]:
    """``sdekit plugins --kind sampler``, run as the console script, as rows by name."""
    listed = _run([sdekit, "plugins", "--kind", "sampler"], env, cwd)
    assert listed.returncode == 0, listed.stderr
    return _plugin_rows(listed.stdout)


def test_a_pip_installed_plugin_is_found_everywhere_and_gone_after_uninstall(tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path)
    sdekit = python.parent / "sdekit"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RANK")}
    env.update(HF_HUB_OFFLINE="1", SDEKIT_PROGRESS="off")
    env.pop("SDEKIT_DISABLE_PLUGINS", None)
    torch.manual_seed(0)
    model = tmp_path / "tiny-ddpm"  # a DDPM model folder for `sdekit sample`
    DDPMPipeline(unet=tiny_unet(1, 8), scheduler=DDPMScheduler()).save_pretrained(model)

    # Install sdekit, then the plugin, from copies of their sources.
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    plugin = shutil.copytree(PLUGIN, tmp_path / "plugin-src", ignore=ignore)
    for source in (_sdekit_source(tmp_path / "sdekit-src"), plugin):
        done = _run([python, *PIP, "install", *OFFLINE, source], env, tmp_path)
        assert done.returncode == 0, done.stderr

    rows = _listed(sdekit, env, tmp_path)
    assert rows["dpm-solver"] == ["sdekit-dpm-solver", "0.1.0", "ok"] and rows["ddim"][0] == "sdekit", rows
    off = _listed(sdekit, {**env, "SDEKIT_DISABLE_PLUGINS": "dpm-solver"}, tmp_path)
    assert off["dpm-solver"][2] == "disabled" and off["ddim"][2] == "ok", off

    report = _check(python, env, tmp_path, model, "samples.npz", "trained", "trained")
    venv_dir = str(python.parent.parent)
    assert report["sdekit"].startswith(venv_dir) and report["module"].startswith(venv_dir), report
    assert "dpm-solver" in report["samplers"]
    # sdekit sample --sampler dpm-solver
    assert report["sample"]["status"] == 0, report["sample"]
    assert "wrote 3 samples (dpm-solver, 4 model calls each)" in report["sample"]["stdout"]
    with np.load(tmp_path / "samples.npz") as arrays:
        assert arrays["samples"].shape[0] == 3 and np.isfinite(arrays["samples"]).all()
    # training/train.py --sampler dpm-solver: the saved pipeline's scheduler, and the sample images made with it.
    assert report["train"]["status"] == 0, report["train"]["stderr"][-3000:]
    index = json.loads((tmp_path / "trained" / "model_index.json").read_text())
    assert index["scheduler"] == ["sdekit", "DPMSolverScheduler"]
    saved = json.loads((tmp_path / "trained" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverScheduler" and saved["algorithm_type"] == "dpmsolver++"
    assert (tmp_path / "trained" / "samples.png").is_file()
    # The unmodified DDPMPipeline, one UNet call per timestep; the trained folder reloaded by diffusers.
    assert report["pipeline"] == {"shape": [2, 8, 8, 1], "calls": 4, "timesteps": 4, "finite": True}
    assert report["reloaded"] == "DPMSolverScheduler"

    # Uninstall: gone everywhere, and each place says so.
    removed = _run([python, *PIP, "uninstall", "--yes", "sdekit-dpm-solver"], env, tmp_path)
    assert removed.returncode == 0, removed.stderr
    rows = _listed(sdekit, env, tmp_path)
    assert "dpm-solver" not in rows and "ddim" in rows, rows
    report = _check(python, env, tmp_path, model, "again.npz", "trained-again", "trained")
    assert "dpm-solver" not in report["samplers"] and "ddim" in report["samplers"]
    unknown = "Unknown sampler plugin 'dpm-solver'"
    sample, trained = report["sample"], report["train"]
    assert sample["status"] == 2 and unknown in sample["stderr"] and "Traceback" not in sample["stderr"], sample
    assert trained["status"] == 2 and unknown in trained["stderr"] and "Traceback" not in trained["stderr"], trained
    assert not (tmp_path / "again.npz").exists() and not (tmp_path / "trained-again").exists()
    assert report["load_scheduler"].startswith(f"UnknownPluginError: {unknown}")
    assert "DPMSolverScheduler" in report["reloaded"] and report["reloaded"] != "DPMSolverScheduler"

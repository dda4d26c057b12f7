"""``train.py --push_to_hub`` end to end: a real ``accelerate launch`` run pushing to a local Hub (HubServer) through
``HF_ENDPOINT``, downloaded again with ``snapshot_download`` and loaded with ``DiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file

from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_train_secret_7d41a2"
REPO = "hub-user/digits-vp"
TINY = [
    "--resolution", "8",
    "--train_batch_size", "8",
    "--sample_steps", "2",
    "--num_sample_images", "4",
    "--lr_warmup_steps", "1",
    "--save_images_steps", "0",
    "--max_train_steps", "2",
    "--checkpointing_steps", "1",
]  # fmt: skip


def _launch(out: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch training/train.py`` (one process) with the tiny settings; never raises on failure."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(ROOT / "training" / "train.py"), *TINY, "--output_dir", str(out), *flags,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _client_env(server: HubServer, tmp_path: Path, *, token: bool = True) -> dict[str, str]:
    """This environment pointed at ``server``, with a cache and login of its own (and ``HF_TOKEN`` if asked)."""
    env = {**os.environ, **server.client_env(), "HF_HOME": str(tmp_path / "hf-home")}
    if not token:
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(name, None)
    return env


def _published_files(out: Path) -> dict[str, bytes]:
    """What a push of ``out`` must upload: everything but checkpoints and hidden entries."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_file() and not relative.parts[0].startswith((".", "checkpoint-")):
            files[relative.as_posix()] = path.read_bytes()
    return files


def test_push_to_hub_round_trip_is_bit_identical(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with HubServer(token=TOKEN) as server:
        run = _launch(out, _client_env(server, tmp_path), "--push_to_hub", "--hub_model_id", REPO)
        assert run.returncode == 0, run.stderr[-4000:]
        # The token is taken from HF_TOKEN and shows up nowhere: not in the logs, the tracker, the card or configs.
        assert TOKEN not in run.stdout + run.stderr
        assert all(TOKEN.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

        commits = [path for method, path in server.requests if method == "POST" and "/commit/" in path]
        assert len(commits) == 1  # one commit for the whole folder
        local = _published_files(out)
        assert {"model_index.json", "README.md", "samples.png", "unet/diffusion_pytorch_model.safetensors"} <= set(
            local
        )
        with server.configure_client():
            remote = set(HfApi(endpoint=server.url).list_repo_files(REPO))
            assert remote == set(local) | {".gitattributes"}  # no checkpoint, no staging folder
            snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=server.url))
    assert {name: (snapshot / name).read_bytes() for name in local} == local

    pipe = DiffusionPipeline.from_pretrained(snapshot)
    assert type(pipe.scheduler).__name__ == "ProbabilityFlowScheduler"
    trained = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "diffusers" and {"sdekit", "vp"} <= set(card.data.tags)


def test_missing_token_stops_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with HubServer(token=TOKEN) as server:
        run = _launch(out, _client_env(server, tmp_path, token=False), "--push_to_hub", "--hub_model_id", REPO)
        assert not any(method == "POST" for method, _ in server.requests)
    assert run.returncode != 0
    # A one-line message from train.py, not its traceback (accelerate's launcher still prints its own).
    assert "train.py: error: cannot create the Hub repo hub-user/digits-vp: no Hugging Face token found" in run.stderr
    assert "HubError" not in run.stderr
    assert not out.exists() or not any(out.glob("checkpoint-*"))  # nothing was trained


@pytest.mark.parametrize("failure", ["error", "disconnect"])
def test_failed_upload_is_clear_and_leaves_the_output_intact(tmp_path: Path, failure: str) -> None:
    out = tmp_path / "out"
    with HubServer(token=TOKEN, fail_commits=failure) as server:
        run = _launch(out, _client_env(server, tmp_path), "--push_to_hub", "--hub_model_id", REPO)
    assert run.returncode != 0
    assert f"The local output is intact at {out.resolve()}" in run.stderr and "hf upload" in run.stderr
    assert TOKEN not in run.stdout + run.stderr
    pipe = DiffusionPipeline.from_pretrained(out)  # trained and saved before the push was tried
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)

"""training/publish.py: the atomic pipeline folder, the model card, and pushes to a local Hub (HubServer)."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from PIL import Image
from safetensors.torch import load_file

import sdekit

from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

from conftest import tiny_unet  # noqa: E402
from publish import (  # noqa: E402
    HubError,
    PushError,
    create_hub_repo,
    push_folder,
    recover_pipeline,
    save_pipeline,
    write_model_card,
)

TOKEN = "hf_test_secret_5b1e9c"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PIPELINE_FILES = {"model_index.json", "unet/config.json", WEIGHTS, "scheduler/scheduler_config.json"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def _training_output(tmp_path: Path) -> Path:
    """A trainer's output folder: the pipeline, its card and grid, checkpoints, a staging folder and logs."""
    out = tmp_path / "output"
    save_pipeline(out, tiny_unet(1), sdekit.load_scheduler("ddim"))
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(out / "samples.png")
    write_model_card(
        out,
        sde="vp",
        objective="dsm",
        dataset="sklearn-digits",
        hyperparameters={"learning_rate": 1e-4},
        sample_grid=out / "samples.png",
    )
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "optimizer.bin").write_bytes(b"\0" * 128)
    (out / ".checkpoint-20.tmp").mkdir()
    (out / ".checkpoint-20.tmp" / "model.safetensors").write_bytes(b"\0" * 64)
    (out / "logs").mkdir()
    (out / "logs" / "loss.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return out


def _commits(server: HubServer) -> int:
    return sum(method == "POST" and "/commit/" in path for method, path in server.requests)


def _assert_published(server: HubServer, repo_id: str, out: Path, cache: Path, revision: str | None = None) -> None:
    """The repo holds the pipeline, card and grid, no checkpoint nor hidden entry, and loads bit-identically."""
    files = set(HfApi(endpoint=server.url).list_repo_files(repo_id, revision=revision))
    assert files == PIPELINE_FILES | {".gitattributes", "README.md", "samples.png", "logs/loss.jsonl"}
    snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=server.url))
    assert (snapshot / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()
    pipe = DiffusionPipeline.from_pretrained(snapshot)
    local = load_file(out / WEIGHTS)
    remote = pipe.unet.state_dict()
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[name], local[name]) for name in local)
    assert type(pipe.scheduler).__name__ == "DDIMSDEScheduler"


# -- the pipeline folder ------------------------------------------------------------------------------------


def test_saved_pipeline_loads_and_samples_and_keeps_other_content(tmp_path: Path) -> None:
    out = tmp_path / "output"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "optimizer.bin").write_bytes(b"state")
    unet, scheduler = tiny_unet(1), sdekit.load_scheduler("ddim")
    assert save_pipeline(out, unet, scheduler) == out
    assert set(_files(out)) == PIPELINE_FILES | {"checkpoint-5/optimizer.bin"}  # no staging leftovers
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DDPMPipeline)
    assert type(pipe.scheduler) is type(scheduler)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in unet.state_dict().items())
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1)
    assert np.isfinite(images.images).all()


def test_failed_save_leaves_the_previous_pipeline_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "output"
    save_pipeline(out, tiny_unet(1, 0), sdekit.load_scheduler("ddim"))
    (out / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale weights from an old save")
    before = _files(out)
    original = UNet2DModel.save_pretrained

    def broken(self: UNet2DModel, save_directory: str, **kwargs: object) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "diffusion_pytorch_model.safetensors").write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(UNet2DModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(out, tiny_unet(1, 1), sdekit.load_scheduler("pc"))
    assert _files(out) == before
    assert not list(out.glob(".*"))

    monkeypatch.setattr(UNet2DModel, "save_pretrained", original)
    save_pipeline(out, tiny_unet(1, 1), sdekit.load_scheduler("pc"))
    after = _files(out)
    assert set(after) == PIPELINE_FILES  # the whole unet/ folder was replaced: no stale .bin
    assert after[WEIGHTS] != before[WEIGHTS]
    assert type(DiffusionPipeline.from_pretrained(out).scheduler).__name__ == "PCScheduler"


class _Killed(BaseException):
    """Stands in for the process dying."""


def test_a_kill_mid_swap_is_finished_by_recover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "output"
    save_pipeline(out, tiny_unet(1, 0), sdekit.load_scheduler("ddim"))
    calls = []
    rename = Path.rename

    def dying_rename(self: Path, target: Path) -> Path:
        calls.append(self)
        if len(calls) == 4:  # staging -> .new, unet -> .old, new unet in; dies moving the old scheduler out
            raise _Killed
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", dying_rename)
    new_unet = tiny_unet(1, 1)
    with pytest.raises(_Killed):
        save_pipeline(out, new_unet, sdekit.load_scheduler("pc"))
    monkeypatch.setattr(Path, "rename", rename)
    assert len(list(out.glob(".pipeline-*.new"))) == 1
    recover_pipeline(out)
    assert set(_files(out)) == PIPELINE_FILES
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "PCScheduler"
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in new_unet.state_dict().items())


def test_save_rejects_a_wrapped_model(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unwrap"):
        save_pipeline(tmp_path, torch.nn.Linear(1, 1), sdekit.load_scheduler("ddim"))  # type: ignore[arg-type]


# -- the model card -----------------------------------------------------------------------------------------


def test_model_card_metadata_body_and_no_token(tmp_path: Path) -> None:
    out = tmp_path / "output"
    save_pipeline(out, tiny_unet(1), sdekit.load_scheduler("ddim"))
    grid = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(grid)
    hyperparameters = {"learning_rate": 1e-4, "train_batch_size": 16, "hub_token": TOKEN, "HF_TOKEN_X": TOKEN}
    hyperparameters |= {"block_out_channels": [8, 16], "note": "a|b", "resume_from_checkpoint": None}
    write_model_card(
        out,
        sde="subvp",
        objective="dsm",
        dataset="sklearn-digits",
        hyperparameters=hyperparameters,
        sample_grid=grid,
        hub_model_id="hub-user/tiny-subvp",
    )
    text = (out / "README.md").read_text()
    assert TOKEN not in text and "token" not in text.lower()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert set(card.data.tags) == {"sdekit", "subvp", "unconditional-image-generation"}
    assert card.data.datasets == ["sklearn-digits"]
    assert (out / "grid.png").read_bytes() == grid.read_bytes()
    assert "![samples](grid.png)" in card.text
    assert "| learning_rate | 0.0001 |" in card.text
    assert "| block_out_channels | 8, 16 |" in card.text and "| note | a\\|b |" in card.text
    assert "resume_from_checkpoint" not in card.text
    assert "DDIMSDEScheduler" in card.text
    # The usage snippet runs as written against the local folder (fewer steps to stay fast).
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert 'from_pretrained("hub-user/tiny-subvp")' in snippet and "sdekit.load_scheduler(" in snippet
    snippet = snippet.replace('"hub-user/tiny-subvp"', repr(str(out))).replace(
        "num_inference_steps=50", "num_inference_steps=2"
    )
    scope: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), scope)
    assert type(scope["pipe"].scheduler).__name__ == "PCScheduler" and len(scope["images"]) == 4


# -- pushing ------------------------------------------------------------------------------------------------


def test_push_in_process_is_one_commit_without_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = _training_output(tmp_path)
    before, stats = _files(out), _stats(out)
    caplog.set_level(logging.DEBUG)
    with HubServer(token=TOKEN) as server, server.configure_client():
        info = push_folder(out, "tiny-vp", token=TOKEN)
        assert _commits(server) == 1
        assert info.oid and info.startswith(server.url)
        _assert_published(server, "hub-user/tiny-vp", out, tmp_path / "cache", revision=info.oid)
        assert _files(out) == before and _stats(out) == stats
        # After the card changes, pushing again is one more commit to the same repo.
        write_model_card(
            out, sde="vp", objective="dsm", dataset=None, hyperparameters={}, hub_model_id="hub-user/tiny-vp"
        )
        again = push_folder(out, "hub-user/tiny-vp", token=TOKEN, commit_message="Update the card")
        assert _commits(server) == 2 and again.oid != info.oid
    assert TOKEN not in caplog.text


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_push_in_a_subprocess_takes_the_token_from_the_environment(tmp_path: Path) -> None:
    out = _training_output(tmp_path)
    before = _files(out)
    with HubServer(token=TOKEN) as server:
        env = {**os.environ, **server.client_env(), "HF_HOME": str(tmp_path / "hf-home")}
        code = (
            "import logging, sys; logging.basicConfig(level=logging.DEBUG); sys.path.insert(0, 'training'); "
            f"from publish import push_folder; print(push_folder({str(out)!r}, 'hub-user/tiny-vp').oid)"
        )
        result = _run(code, env)
        assert result.returncode == 0, result.stderr
        assert TOKEN not in result.stdout + result.stderr
        assert _commits(server) == 1
        with server.configure_client():
            _assert_published(server, "hub-user/tiny-vp", out, tmp_path / "cache", revision=result.stdout.split()[-1])
    assert _files(out) == before


@pytest.mark.parametrize("failure", ["error", "disconnect"])
def test_network_failures_are_clear_and_leave_the_folder_intact(tmp_path: Path, failure: str) -> None:
    out = _training_output(tmp_path)
    before, stats = _files(out), _stats(out)
    with HubServer(token=TOKEN, fail_commits=failure) as server:
        with server.configure_client(), pytest.raises(PushError) as caught:
            push_folder(out, "hub-user/tiny-vp", token=TOKEN)
        message = str(caught.value)
        assert f"local output is intact at {out}" in message
        assert ("HTTP 500" if failure == "error" else "network error") in message
        assert TOKEN not in message and TOKEN not in repr(caught.value.__cause__)
        assert _files(out) == before and _stats(out) == stats
        # The suggested command is correct: run with the same token (from the environment) it publishes the folder.
        server.fail_commits = None
        words = shlex.split(caught.value.retry_command)
        assert words[:2] == ["hf", "upload"] and caught.value.retry_command in message
        env = {**os.environ, **server.client_env(), "HF_HOME": str(tmp_path / "hf-home")}
        result = subprocess.run(
            [str(Path(sys.executable).with_name("hf")), *words[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        with server.configure_client():
            _assert_published(server, "hub-user/tiny-vp", out, tmp_path / "cache")
    assert _files(out) == before


def test_missing_or_wrong_token_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _training_output(tmp_path)
    before = _files(out)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubServer(token=TOKEN) as server, server.configure_client():
        with pytest.raises(PushError, match="no Hugging Face token found") as caught:
            push_folder(out, "hub-user/tiny-vp")
        assert "hf auth login" in str(caught.value)
        assert server.requests == []  # nothing was sent
        wrong = "hf_wrong_token_0000"
        with pytest.raises(PushError, match="refused the token") as caught:
            push_folder(out, "hub-user/tiny-vp", token=wrong)
        assert f"intact at {out}" in str(caught.value)
        assert wrong not in str(caught.value) and TOKEN not in str(caught.value)
        assert wrong not in repr(caught.value.__cause__)
        assert _commits(server) == 0
    assert _files(out) == before


def test_create_hub_repo_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubServer(token=TOKEN) as server, server.configure_client():
        assert create_hub_repo("tiny-vp", token=TOKEN) == "hub-user/tiny-vp"
        assert create_hub_repo("hub-user/tiny-vp", token=TOKEN) == "hub-user/tiny-vp"  # exists: fine
        with pytest.raises(HubError, match="cannot create the Hub repo other: no Hugging Face token found"):
            create_hub_repo("other")
        wrong = "hf_wrong_token_1111"
        with pytest.raises(HubError, match="refused the token") as caught:
            create_hub_repo("other", token=wrong)
        assert not isinstance(caught.value, PushError) and wrong not in str(caught.value)
        assert HfApi(endpoint=server.url).list_repo_files("hub-user/tiny-vp") == [".gitattributes"]

"""The trainer's output side: an atomic pipeline folder, its model card, and one-commit pushes to the Hub.

* :func:`save_pipeline` writes ``model_index.json``, ``unet/`` (config and safetensors weights) and ``scheduler/``
  (the sdekit scheduler's config) so that ``DiffusionPipeline.from_pretrained(output_dir)`` returns a
  ``DDPMPipeline`` with the sdekit scheduler. Everything is written to a hidden staging folder inside
  ``output_dir`` first and only then renamed into place, so a failure (or a kill) while writing leaves the
  previous pipeline untouched. Other content of ``output_dir`` (``checkpoint-*``, logs, sample grids) is kept.
* :func:`write_model_card` writes ``README.md`` with ``huggingface_hub``'s ``ModelCard``: Hub metadata, the training
  hyperparameters (never a token), the sample grid and a usage snippet.
* :func:`push_folder` creates the repo and uploads the folder in one commit, without training checkpoints or
  staging folders. Network and authentication failures raise :class:`PushError`, which says that the local output
  is intact and how to retry; the token appears in no message. :func:`create_hub_repo` makes the repo up front, so
  the trainer reports a token or network problem before it trains (:class:`HubError`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx2
from diffusers import DDPMPipeline, ModelMixin, SchedulerMixin
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "PIPELINE_ENTRIES",
    "HubError",
    "PushError",
    "create_hub_repo",
    "push_folder",
    "recover_pipeline",
    "save_pipeline",
    "write_model_card",
]

logger = logging.getLogger(__name__)

PIPELINE_ENTRIES: tuple[str, ...] = ("unet", "scheduler", "model_index.json")
"""What :func:`save_pipeline` owns in the output folder, in the order it swaps them in (``model_index.json`` last)."""

DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = ("checkpoint-*", ".*")
"""Never uploaded by :func:`push_folder`: accelerate checkpoints (``checkpoint-N/``) and hidden entries, which
include the trainer's ``.checkpoint-N.tmp`` folders and :func:`save_pipeline`'s ``.pipeline-*`` staging folders."""

_STAGING_PREFIX = ".pipeline-"
_WRITING, _COMPLETE, _REPLACED = ".tmp", ".new", ".old"
_PIPELINE_TAG = "unconditional-image-generation"


# -- the pipeline folder ------------------------------------------------------------------------------------


def save_pipeline(output_dir: str | os.PathLike[str], unet: ModelMixin, scheduler: SchedulerMixin) -> Path:
    """Write (or replace) the pipeline in ``output_dir`` so that ``DiffusionPipeline.from_pretrained`` loads it.

    The folder gets ``model_index.json`` (a ``DDPMPipeline``), ``unet/`` (``config.json`` and
    ``diffusion_pytorch_model.safetensors``) and ``scheduler/`` (``scheduler_config.json``; an sdekit scheduler is
    recorded as ``["sdekit", "<Class>"]``, which diffusers resolves through ``sdekit.<Class>``).

    Atomicity: the pipeline is saved into ``output_dir/.pipeline-<id>.tmp``; once complete, that folder is renamed
    to ``.pipeline-<id>.new``, which marks it complete. Only then are the three entries swapped in, one rename each
    (the old ones move to ``.pipeline-<id>.old`` and are deleted at the end). A failure while writing (serializing,
    disk full, a kill) therefore leaves the previous pipeline as it was; the staging folder is removed on an
    exception, and a leftover from a kill is cleaned up by the next call. A kill in the few microseconds between
    the swap's renames leaves a complete ``.new`` folder behind, and the next call (or :func:`recover_pipeline`)
    finishes the swap. Entries other than the three above are never touched.

    Args:
        output_dir: the output folder; created if missing.
        unet: the denoiser, unwrapped (``accelerator.unwrap_model(model)``, or the EMA copy); saved on its device
            and dtype, in safetensors.
        scheduler: the (sdekit) scheduler to ship with the model.

    Returns:
        ``output_dir`` as a ``Path``.

    Raises:
        TypeError: ``unet`` is not a diffusers model (for example still wrapped in DistributedDataParallel) or
            ``scheduler`` is not a diffusers scheduler.
    """
    if not isinstance(unet, ModelMixin):
        raise TypeError(
            f"unet must be a diffusers model such as UNet2DModel, got {type(unet).__name__}; unwrap it first "
            "(accelerator.unwrap_model(model))."
        )
    if not isinstance(scheduler, SchedulerMixin):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recover_pipeline(output_dir)
    stem = output_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    writing = stem.with_name(stem.name + _WRITING)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(writing, safe_serialization=True)
    except BaseException:
        shutil.rmtree(writing, ignore_errors=True)
        raise
    writing.rename(stem.with_name(stem.name + _COMPLETE))
    _swap_in(output_dir, stem)
    logger.info("saved the pipeline (%s) to %s", type(scheduler).__name__, output_dir)
    return output_dir


def recover_pipeline(output_dir: str | os.PathLike[str]) -> None:
    """Finish or discard what an interrupted :func:`save_pipeline` left in ``output_dir``.

    A complete staged pipeline (``.pipeline-<id>.new``) is swapped in; incomplete ones (``.tmp``) and replaced
    entries (``.old``) are deleted. :func:`save_pipeline` calls this first; call it yourself to repair a folder
    whose writer was killed mid-swap before loading it.

    Args:
        output_dir: the output folder (nothing happens if it does not exist).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    staged = sorted(output_dir.glob(f"{_STAGING_PREFIX}*"))
    for path in staged:
        if path.name.endswith(_COMPLETE):
            logger.warning("finishing an interrupted pipeline save in %s", output_dir)
            _swap_in(output_dir, path.with_name(path.name[: -len(_COMPLETE)]))
    for path in staged:
        if path.name.endswith((_WRITING, _REPLACED)):
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(output_dir: Path, stem: Path) -> None:
    """Move the entries of the complete staged pipeline ``stem.new`` into ``output_dir``; idempotent."""
    new, old = stem.with_name(stem.name + _COMPLETE), stem.with_name(stem.name + _REPLACED)
    old.mkdir(exist_ok=True)
    staged = {path.name for path in new.iterdir()}
    for name in [*(n for n in PIPELINE_ENTRIES if n in staged), *sorted(staged - set(PIPELINE_ENTRIES))]:
        target = output_dir / name
        if target.exists():
            shutil.rmtree(old / name, ignore_errors=True)  # left by an earlier, interrupted swap
            target.rename(old / name)
        (new / name).rename(target)
    shutil.rmtree(new)
    shutil.rmtree(old)


# -- the model card -----------------------------------------------------------------------------------------


def write_model_card(
    output_dir: str | os.PathLike[str],
    *,
    sde: str,
    objective: str,
    dataset: str | None,
    hyperparameters: Mapping[str, Any],
    sample_grid: str | os.PathLike[str] | None = None,
    hub_model_id: str | None = None,
    sampler: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata key
) -> ModelCard:
    """Write ``output_dir/README.md``: a model card for the pipeline saved there.

    Metadata: ``library_name: diffusers``, ``pipeline_tag: unconditional-image-generation``, the tags ``sdekit``,
    ``sde`` and ``unconditional-image-generation``, ``datasets: [dataset]`` and ``license``. Body: what was trained,
    the sample grid, a usage snippet (load with ``DiffusionPipeline.from_pretrained``, swap the sampler with
    ``sdekit.load_scheduler``) and a table of the training hyperparameters. The file is written to a temporary
    name and renamed, so an existing card is replaced whole or not at all.

    Args:
        output_dir: the pipeline folder (it must exist).
        sde: the SDE's plugin name (``vp``, ``subvp``, ``ve``, ...); it becomes a tag.
        objective: the training objective (``dsm``, ``ddpm``, ``smld``).
        dataset: the training data as a Hub dataset id, or a short name for local data (the embedded default is
            ``sklearn-digits``; for an image folder pass its name, not a full local path); ``None`` leaves
            ``datasets`` out.
        hyperparameters: the training settings to list, for example ``vars(args)``. Keys containing ``token``
            (any case) are dropped, as are ``None`` values.
        sample_grid: a PNG of samples, default ``None`` (no image). A file outside ``output_dir`` is copied in
            under its own name; the card links it by a relative path.
        hub_model_id: the repo the folder is pushed to, default ``None``; the usage snippet loads from it (else
            from the folder's path).
        sampler: the sdekit sampler saved with the model, default ``None`` (read from ``model_index.json``);
            the snippet swaps in a different one.
        license: the license id for the metadata, default ``None`` (none given).

    Returns:
        The ``ModelCard`` that was written.

    Raises:
        FileNotFoundError: ``output_dir`` or ``sample_grid`` does not exist.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output_dir {output_dir} does not exist; save the pipeline first.")
    image = None
    if sample_grid is not None:
        image = _grid_in_folder(output_dir, Path(sample_grid))
    if sampler is None:
        sampler = _saved_scheduler_class(output_dir)
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=_PIPELINE_TAG,
        tags=["sdekit", sde, _PIPELINE_TAG],
        datasets=[dataset] if dataset else None,
        license=license,
    )
    location = hub_model_id or output_dir.name
    body = _card_body(location, sde, objective, dataset, _public_hyperparameters(hyperparameters), image, sampler)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = output_dir / "README.md"
    partial = output_dir / f".README.md.{uuid.uuid4().hex[:12]}.tmp"
    try:
        card.save(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return card


def _grid_in_folder(output_dir: Path, grid: Path) -> str:
    """The grid's path relative to ``output_dir`` (POSIX), copying it in if it lives elsewhere."""
    if not grid.is_file():
        raise FileNotFoundError(f"sample_grid {grid} does not exist.")
    try:
        return grid.resolve().relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        shutil.copyfile(grid, output_dir / grid.name)
        return grid.name


def _saved_scheduler_class(output_dir: Path) -> str | None:
    index = output_dir / "model_index.json"
    if not index.is_file():
        return None
    entry = json.loads(index.read_text()).get("scheduler")
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _public_hyperparameters(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    return {
        str(key): value
        for key, value in hyperparameters.items()
        if "token" not in str(key).lower() and value is not None
    }


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _card_body(
    location: str,
    sde: str,
    objective: str,
    dataset: str | None,
    hyperparameters: dict[str, Any],
    image: str | None,
    sampler: str | None,
) -> str:
    other = "pf-ode" if sampler == "pc" else "pc"  # both sample any SDE
    saved = f"`{sampler}`" if sampler else "the sdekit scheduler it was trained with"
    lines = [
        f"# {location.rsplit('/', 1)[-1]}",
        "",
        f"A diffusers `UNet2DModel` trained as a score model for the `{sde}` SDE with the `{objective}` objective"
        + (f" on `{dataset}`" if dataset else "")
        + " with sdekit (score-based generative modeling through SDEs, Song et al. 2021). "
        f"The pipeline ships with {saved} as its scheduler.",
        "",
    ]
    if image:
        lines += ["## Samples", "", f"![samples]({image})", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "import sdekit",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{location}")',
        "images = pipe(batch_size=4, num_inference_steps=50).images",
        "",
        "# Any sdekit sampler reuses the model's noise schedule:",
        f'pipe.scheduler = sdekit.load_scheduler("{other}", pipe.scheduler.config)',
        "images = pipe(batch_size=4, num_inference_steps=50).images",
        "```",
        "",
        "## Training hyperparameters",
        "",
        "| hyperparameter | value |",
        "| --- | --- |",
        *(f"| {_cell(key)} | {_cell(value)} |" for key, value in hyperparameters.items()),
        "",
    ]
    return "\n".join(lines)


# -- pushing ------------------------------------------------------------------------------------------------


class HubError(RuntimeError):
    """Talking to the Hub failed: no token, a rejected token, or a network or server failure. The message says why
    and what to do; the token appears in no message."""


class PushError(HubError):
    """Pushing to the Hub failed; the local output is intact. The message says why and how to retry.

    Attributes:
        output_dir: the local folder, unchanged by the attempt.
        repo_id: the target repo.
        retry_command: a shell command (``hf upload ...``) that uploads the folder the same way.
    """

    def __init__(self, reason: str, output_dir: Path, repo_id: str, retry_command: str) -> None:
        self.output_dir, self.repo_id, self.retry_command = output_dir, repo_id, retry_command
        super().__init__(
            f"could not push {output_dir} to the Hub repo {repo_id}: {reason}\n"
            f"The local output is intact at {output_dir}. To retry, run\n    {retry_command}\n"
            "with HF_TOKEN set or after `hf auth login`."
        )


_NO_TOKEN = "no Hugging Face token found. Set HF_TOKEN, run `hf auth login`, or pass a token."


def create_hub_repo(hub_model_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create the Hub repo ``hub_model_id`` if it does not exist yet, and return its full id.

    The trainer calls this before it trains, so that a missing or rejected token, or an unreachable Hub, is reported
    in seconds rather than after the run. The token is resolved as in :func:`push_folder`.

    Args:
        hub_model_id: ``"name"`` (in the token owner's namespace) or ``"namespace/name"``.
        token: a Hub token, default ``None`` (``HF_TOKEN``, then the login cache).
        private: create the repo private, default ``False`` (an existing repo keeps its visibility).

    Returns:
        The repo id, ``"namespace/name"``.

    Raises:
        HubError: no token was found, the Hub rejected it, or the network or the Hub failed.
    """
    secret = token if token is not None else get_token()
    if not secret:
        raise HubError(f"cannot create the Hub repo {hub_model_id}: {_NO_TOKEN}")
    try:
        return HfApi(token=secret).create_repo(hub_model_id, private=private, exist_ok=True).repo_id
    except (httpx2.HTTPError, OSError) as err:
        reason = _describe(err).replace(secret, "***")
        raise HubError(f"cannot create the Hub repo {hub_model_id}: {reason}") from _chained(err, secret)


def push_folder(
    output_dir: str | os.PathLike[str],
    hub_model_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload sdekit pipeline",
    ignore_patterns: Sequence[str] = (),
) -> CommitInfo:
    """Create the Hub repo ``hub_model_id`` (if needed) and upload ``output_dir`` to it in one commit.

    Training checkpoints and hidden entries (:data:`DEFAULT_IGNORE_PATTERNS`) are left out. The folder is only
    read. The token is ``token``, else huggingface_hub's own resolution: ``HF_TOKEN``, then the login cache
    (``hf auth login``). It is sent to the Hub only, never logged nor put in a message.

    Args:
        output_dir: the pipeline folder to upload.
        hub_model_id: ``"name"`` (in the token owner's namespace) or ``"namespace/name"``.
        token: a Hub token, default ``None`` (resolved as above).
        private: create the repo private, default ``False`` (an existing repo keeps its visibility).
        commit_message: the commit's title, default ``"Upload sdekit pipeline"``.
        ignore_patterns: more glob patterns (relative paths) to leave out, default ``()``.

    Returns:
        The ``CommitInfo``: a ``str`` (the commit URL) with ``.oid`` (the commit sha) and ``.repo_url``.

    Raises:
        FileNotFoundError: ``output_dir`` is not a folder.
        PushError: no token was found, the Hub rejected it, or the network or the Hub failed.
    """
    output_dir = Path(output_dir).resolve()
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output_dir {output_dir} is not a folder; nothing to push.")
    ignore = [*DEFAULT_IGNORE_PATTERNS, *ignore_patterns]
    retry = _retry_command(output_dir, hub_model_id, ignore, commit_message, private)
    secret = token if token is not None else get_token()
    if not secret:
        raise PushError(_NO_TOKEN, output_dir, hub_model_id, retry)
    api = HfApi(token=secret)
    logger.info("pushing %s to the Hub repo %s", output_dir, hub_model_id)
    try:
        repo_id = api.create_repo(hub_model_id, private=private, exist_ok=True).repo_id
        info = api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, commit_message=commit_message, ignore_patterns=ignore
        )
    except (httpx2.HTTPError, OSError) as err:
        reason = _describe(err).replace(secret, "***")
        raise PushError(reason, output_dir, hub_model_id, retry) from _chained(err, secret)
    logger.info("pushed %s as commit %s", repo_id, info.oid)
    return info


def _chained(err: BaseException, secret: str) -> BaseException | None:
    """The cause to chain to a Hub error: ``err``, unless its text would show the token."""
    return None if secret in str(err) else err


def _describe(err: BaseException) -> str:
    """One short, user-facing line for a failure of the client."""
    if isinstance(err, OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to push."
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = (err.server_message or "").strip().splitlines()
        detail_text = f" ({detail[0]})" if detail else ""
        if status in (401, 403):
            return (
                f"the Hub refused the token (HTTP {status}){detail_text}. Check that it is valid and has write "
                "access (HF_TOKEN, or `hf auth login`)."
            )
        return f"the Hub answered HTTP {status}{detail_text}."
    if isinstance(err, httpx2.TransportError):
        return f"network error talking to the Hub ({type(err).__name__}: {err})."
    return f"{type(err).__name__}: {err}"


def _retry_command(output_dir: Path, repo_id: str, ignore: Sequence[str], message: str, private: bool) -> str:
    words = ["hf", "upload", repo_id, str(output_dir), "."]
    for pattern in ignore:
        words += ["--exclude", pattern]
    words += ["--commit-message", message]
    if private:
        words.append("--private")
    return shlex.join(words)

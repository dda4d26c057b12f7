"""The conformance kit: :func:`check_scheduler` runs a scheduler through everything sdekit promises of one.

``check_scheduler(cls_or_name, **config)`` builds ``cls(**config)`` (a class, or the name of an installed sampler
plugin) and checks it clause by clause. The first broken clause raises ``AssertionError`` with a message that
names it::

    check_scheduler(MyScheduler): clause "config round trip": key 'snr' lost by save_pretrained/from_pretrained
    (saved 0.1, loaded 0.16)

When every clause holds it returns a :class:`ConformanceReport` listing the clauses that ran and those that did
not apply, with the reason.

Clauses, in the order they run, and the tests of diffusers' ``SchedulerCommonTest``
(``tests/schedulers/test_schedulers.py``, v0.42) each one mirrors:

=========================== ========================================================== ============================
clause                      what it checks                                             ``SchedulerCommonTest``
=========================== ========================================================== ============================
``public API``              ``init_noise_sigma``; ``scale_model_input`` keeps the      ``test_scheduler_public_api``
                            shape; ``set_timesteps`` gives 1-d ``timesteps``;          ``test_deprecated_kwargs``
                            ``**kwargs`` in ``__init__`` if and only if                ``test_getattr_is_correct``
                            ``_deprecated_kwargs``; own attributes read silently,
                            config keys read as attributes warn ``FutureWarning``,
                            unknown ones raise diffusers' ``AttributeError``
``config round trip``       ``save_pretrained`` writes every config key;               ``test_from_pretrained``
                            ``from_pretrained`` and ``from_config`` give the same      ``test_from_save_pretrained``
                            config back; the reloaded scheduler's step equals the      (its ``check_over_configs``,
                            original's under the same generator                        ``check_over_forward``)
``compatibles round trip``  every entry of ``compatibles`` is a class that builds      ``test_compatibles``
                            from the config (or refuses it with ``ValueError``); back
                            from a compatible the config is the same,
                            ``_use_default_values`` included, and no ``__init__``
                            parameter is added
``trained_betas``           two ``trained_betas`` are accepted whatever                ``test_trained_betas``
                            ``num_train_timesteps`` says, and ``betas`` survives save
                            and load; an sdekit VP-type scheduler's ``betas`` /
                            ``alphas`` / ``alphas_cumprod`` have diffusers' form and,
                            on a DDPM table, ``DDPMScheduler``'s values
``step``                    ``prev_sample`` has the sample's shape and dtype;          ``test_step_shape``
                            ``return_dict=False`` gives the same tensors; a step       ``test_scheduler_outputs_``
                            moves the sample                                           ``equivalence``
``add_noise``               one timestep per sample ``(B,)``, one for the batch        ``test_add_noise_device``
                            (``(1,)`` or 0-d) and per-sample levels agree; any rank;
                            the dtype is kept
``one model call per step`` a loop over ``timesteps`` makes ``len(timesteps)`` model   (sdekit)
                            calls and ``step()`` calls, and every step's model output
                            changes the result
``determinism``             the same seed gives the same samples, twice on one         (sdekit)
                            scheduler (``set_timesteps`` resets the state) and on a
                            new one
``no host sync``            after the first step, ``step()`` never reads a tensor on   (sdekit)
                            the host (``.item()``, ``float()``, ``bool()``,
                            ``.cpu()``, ``.tolist()``, ``.numpy()``, ``torch.equal``,
                            boolean masks): on CPU tensors and on ``meta`` tensors,
                            which have no data to read
``oracle``                  with the exact score of a Gaussian mixture, the Frechet    (sdekit)
                            distance of the samples to the data falls as steps grow
                            (2, 6, 24)
``prediction types``        every ``prediction_type`` the scheduler accepts runs; with (sdekit)
                            the oracle, the exact model in each parametrization gives
                            the same samples
``pipelines``               unmodified ``DDPMPipeline``, ``DDIMPipeline`` and          (sdekit)
                            ``LDMPipeline`` run, call the UNet once per timestep and
                            repeat under the same seed
``pipeline save/load``      ``pipe.save_pretrained`` then                              (sdekit)
                            ``DiffusionPipeline.from_pretrained`` gives back the
                            scheduler's class and config (a registered sdekit sampler
                            is saved as ``["sdekit", class]``)
=========================== ========================================================== ============================

diffusers' ``SchedulerBaseTests`` (``ConfigMixin`` on dummy classes) and the Hub tests
(``test_default_arguments_not_in_config``, ``test_default_solver_type_after_switch``, the push tests) test
diffusers itself, not a scheduler: they have no clause.

**Which clauses apply.** A third-party scheduler need not use sdekit's configuration. The clauses that hold for
any diffusers scheduler are mandatory for every scheduler; a clause that needs something a scheduler does not
have is skipped and listed in the report with the reason:

* ``trained_betas`` applies when ``__init__`` takes ``trained_betas`` (for an sdekit scheduler, when its SDE is
  VP-type: other SDEs have no DDPM table);
* ``prediction types`` applies when ``__init__`` takes ``prediction_type``; only the values of
  :data:`sdekit.parametrization.PREDICTION_TYPES` that construct and step are tried;
* ``DDPMPipeline`` needs ``step(..., generator=...)`` and ``DDIMPipeline`` ``step(..., eta=...,
  use_clipped_model_output=...)`` (``DDIMPipeline`` turns any scheduler given to its constructor into a
  ``DDIMScheduler``, so the kit assigns it afterwards, as users do); ``LDMPipeline`` always applies;
* the ``compatibles round trip`` goes back through every compatible that is not one of diffusers' own classes
  (or through the class itself when there is none): sdekit deliberately keeps a diffusers source's defaults
  (``DDPMScheduler``'s ``clip_sample=True``), so an sdekit default does not survive a trip through them;
* ``oracle`` needs to know which SDE the scheduler samples. A scheduler opts in by exposing it as an attribute
  ``sde`` holding a :class:`sdekit.sde.SDE` after construction, as every :class:`sdekit.SDEScheduler` does.
  The oracle then answers in the scheduler's ``prediction_type`` (config, default ``epsilon``) and model-time
  units (attribute or config ``time_input``, default the SDE's own), so the scheduler must accept the
  mixture's data (shape ``(B, 1, 2, 2)``, values within [-1, 1]) and that SDE's prior. Without ``sde`` the
  clause is skipped, and ``prediction types`` only checks that each accepted type runs.

Everything is tiny (4-value samples, two-level 8x8 UNets, a one-level VQ-VAE, at most 24 levels), so the kit
takes a few seconds on one CPU core. It leaves the global random state as it found it.
"""

from __future__ import annotations

import inspect
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..parametrization import PREDICTION_TYPES
from ..registry import get_sampler_class, registered_name
from ..sde import SDE, VPTypeSDE
from .metrics import gaussian_frechet_distance
from .mixture import GaussianMixture
from .oracle import MixtureScoreModel

__all__ = ["CLAUSES", "ConformanceReport", "NoHostSync", "check_scheduler", "tiny_unet"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClauseFailure(AssertionError):
    """A clause does not hold; the message says why."""


class ClauseSkipped(Exception):
    """A clause does not apply to this scheduler; the message says why."""


@dataclass
class ConformanceReport:
    """What :func:`check_scheduler` checked: the clauses that held (``passed``), and those that did not apply
    (``skipped``, with the reason)."""

    scheduler: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    """What a clause that held left out (``pipelines``: a pipeline whose calls ``step()`` does not take)."""

    def __str__(self) -> str:
        lines = [f"{self.scheduler}: {len(self.passed)} clauses hold: {', '.join(self.passed)}"]
        lines += [f"  {name!r} held, but: {note}" for name, note in self.notes.items()]
        lines += [f"  {name!r} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


# -- what the clauses share ------------------------------------------------------------------------------


def _mixture() -> GaussianMixture:
    """Two unequal components in 4 values, shaped as 1-channel 2 x 2 images, within [-1, 1]."""
    means = torch.tensor([[-0.5, 0.3, -0.4, 0.2], [0.4, -0.3, 0.5, -0.2]])
    return GaussianMixture(
        means, stds=torch.tensor([0.15, 0.25]), weights=torch.tensor([0.6, 0.4]), event_shape=(1, 2, 2)
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON would store it (tuples and arrays become lists), for comparing configs."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _public(config: Any) -> dict[str, Any]:
    return {key: _plain(value) for key, value in dict(config).items() if not key.startswith("_")}


def _accepts(function: Callable[..., Any], name: str) -> bool:
    params = inspect.signature(function).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


class _Subject:
    """The scheduler class under test, its configuration, and the models the clauses call."""

    def __init__(self, cls: type, config: dict[str, Any]) -> None:
        self.cls = cls
        self.config = config
        self.mixture = _mixture()
        self.batch_shape = (4, *self.mixture.event_shape)

    def build(self, **overrides: Any) -> Any:
        return self.cls(**{**self.config, **overrides})

    def sde_of(self, scheduler: Any) -> SDE | None:
        sde = scheduler.__dict__.get("sde", None)
        return sde if isinstance(sde, SDE) else None

    def model_for(self, scheduler: Any) -> Model:
        """The exact oracle when the scheduler names its SDE (in its prediction type and model time), else a
        smooth stand-in ``0.2 x``."""
        sde = self.sde_of(scheduler)
        if sde is None:
            return lambda x, t: 0.2 * x
        prediction_type = scheduler.config.get("prediction_type", None) or "epsilon"
        time_input = (
            scheduler.__dict__.get("time_input", None)
            or scheduler.config.get("time_input", None)
            or sde.default_time_input()
        )
        oracle = MixtureScoreModel(self.mixture, sde, prediction_type=prediction_type, time_input=time_input)
        return lambda x, t: oracle(x, t).sample

    def step(self, scheduler: Any, output: torch.Tensor, t: Any, x: torch.Tensor, gen: Any, **kw: Any) -> Any:
        if _accepts(type(scheduler).step, "generator"):
            kw["generator"] = gen
        return scheduler.step(output, t, x, **kw)

    def sample(self, scheduler: Any, steps: int, seed: int = 0, batch: int | None = None, dtype=torch.float32,
               model: Model | None = None, perturb: int | None = None) -> torch.Tensor:  # fmt: skip
        """A full sampling loop from the scaled prior: ``steps`` levels, one model call per entry of timesteps."""
        model = model or self.model_for(scheduler)
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        shape = (batch or self.batch_shape[0], *self.batch_shape[1:])
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * float(scheduler.init_noise_sigma)
        for index, t in enumerate(scheduler.timesteps):
            output = model(scheduler.scale_model_input(x, t), t)
            if index == perturb:
                output = output + 0.1
            x = self.step(scheduler, output, t, x, gen).prev_sample
        return x


def tiny_unet(channels: int = 3, sample_size: int = 8) -> Any:
    """A two-level ``UNet2DModel`` of 8 and 16 channels in eval mode, initialised from torch's global generator:
    a real network that costs nothing, for scheduler and pipeline tests."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _first_step_input(s: _Subject, scheduler: Any) -> tuple[torch.Generator, torch.Tensor, Any]:
    """Plan 4 steps and return a seeded generator, a sample in ``[0, 1)`` and the first timestep."""
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    return gen, torch.rand(s.batch_shape, generator=gen), scheduler.timesteps[0]


def _tiny_vqvae() -> Any:
    from diffusers import VQModel

    return VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8,),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        num_vq_embeddings=16,
        vq_embed_dim=3,
    ).eval()


def _fail(message: str) -> None:
    raise ClauseFailure(message)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ClauseFailure(message)


# -- clauses -----------------------------------------------------------------------------------------------


def _public_api(s: _Subject) -> None:
    scheduler = s.build()
    _check(hasattr(scheduler, "init_noise_sigma"), "no init_noise_sigma attribute (pipelines scale the prior by it)")
    for name in ("set_timesteps", "step", "scale_model_input", "add_noise"):
        _check(callable(getattr(scheduler, name, None)), f"no {name}() method")
    scheduler.set_timesteps(5)
    timesteps = scheduler.timesteps
    _check(
        isinstance(timesteps, torch.Tensor) and timesteps.ndim == 1 and len(timesteps) >= 1,
        f"after set_timesteps(5), timesteps must be a non-empty 1-d tensor, got {timesteps!r}",
    )
    sample = torch.rand(s.batch_shape)
    scaled = scheduler.scale_model_input(sample, timesteps[0])
    _check(
        isinstance(scaled, torch.Tensor) and scaled.shape == sample.shape,
        f"scale_model_input changed the sample's shape from {tuple(sample.shape)} to "
        f"{tuple(getattr(scaled, 'shape', ()))}",
    )
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _init_params(s.cls).values())
    deprecated = list(getattr(s.cls, "_deprecated_kwargs", []))
    _check(
        has_kwargs == bool(deprecated),
        f"__init__ {'takes' if has_kwargs else 'does not take'} **kwargs but _deprecated_kwargs is {deprecated}: "
        "diffusers passes deprecated keys through **kwargs, so have both or neither",
    )
    scheduler.conformance_probe = 5
    scheduler.register_to_config(conformance_config_probe=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check(scheduler.conformance_probe == 5, "an attribute set on the scheduler does not read back")
    _check(not caught, f"reading an ordinary attribute warned: {[str(w.message) for w in caught]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = scheduler.conformance_config_probe
    _check(
        value == 5 and any(issubclass(w.category, FutureWarning) for w in caught),
        "a config key read as an attribute must give its value with diffusers' FutureWarning",
    )
    try:
        scheduler.conformance_missing_attribute  # noqa: B018
    except AttributeError as err:
        expected = f"'{type(scheduler).__name__}' object has no attribute 'conformance_missing_attribute'"
        _check(
            str(err) == expected,
            f"an unknown attribute raised AttributeError({str(err)!r}), not diffusers' {expected!r}",
        )
    else:
        _fail("reading an unknown attribute did not raise AttributeError")


def _config_round_trip(s: _Subject) -> None:
    scheduler = s.build()
    saved = _public(scheduler.config)
    with tempfile.TemporaryDirectory() as folder:
        scheduler.save_pretrained(folder)
        in_file = json.loads((Path(folder) / scheduler.config_name).read_text())
        loaded = s.cls.from_pretrained(folder)
    loaded_config = _public(loaded.config)
    for key, value in saved.items():
        lost = (
            f"key {key!r} lost by save_pretrained/from_pretrained (saved {value!r}, loaded {loaded_config.get(key)!r}"
        )
        _check(key in in_file, f"{lost}; it is not in {scheduler.config_name})")
        _check(key in loaded_config and loaded_config[key] == value, f"{lost})")
    extra = sorted(set(loaded_config) - set(saved))
    _check(not extra, f"save_pretrained/from_pretrained added config keys {extra}")
    _check(type(loaded) is s.cls, f"from_pretrained built a {type(loaded).__name__}, not a {s.cls.__name__}")
    rebuilt = s.cls.from_config(scheduler.config)
    for key, value in saved.items():
        got = _public(rebuilt.config).get(key, None)
        _check(got == value, f"key {key!r} changed by from_config(scheduler.config) ({value!r} -> {got!r})")
    # The reloaded scheduler steps exactly as the original does.
    outputs = []
    for each in (scheduler, loaded):
        gen, x, t = _first_step_input(s, each)
        outputs.append(s.step(each, 0.1 * x, t, x, gen).prev_sample)
    _check(
        torch.equal(outputs[0], outputs[1]),
        f"the reloaded scheduler's first step differs from the original's (max |difference| "
        f"{(outputs[0] - outputs[1]).abs().max().item():.3g})",
    )


def _compatibles_round_trip(s: _Subject) -> None:
    scheduler = s.build()
    compatibles = list(scheduler.compatibles)
    _check(
        all(isinstance(c, type) for c in compatibles), f"compatibles holds something that is not a class: {compatibles}"
    )
    built = {}
    for comp in compatibles:
        try:
            built[comp] = comp.from_config(scheduler.config)
        except ValueError:
            if comp is s.cls:
                raise
            # A compatible may refuse a configuration it cannot sample (ddim and a VE SDE): not a defect.
    # Back through every compatible whose from_config keeps sdekit's defaults as defaults: for an sdekit
    # scheduler the sdekit ones (a diffusers-style class replaces them by its own, which sdekit then carries back
    # on purpose); for any other scheduler all of them, as diffusers' rule holds both ways.
    if _is_sdekit_scheduler(s.cls):
        targets = [comp for comp in built if _is_sdekit_scheduler(comp)]
    else:
        targets = list(built)
    targets = targets or [s.cls]
    original = dict(scheduler.config)
    init_keys = set(_init_params(s.cls))
    for comp in targets:
        middle = built.get(comp) or comp.from_config(scheduler.config)
        back = s.cls.from_config(middle.config)
        through = f"through {comp.__name__}"
        for key, value in original.items():
            got = back.config.get(key, None)
            if key == "_use_default_values":
                was, now = set(value), set(got or [])
                _check(
                    was == now,
                    f"{through}, the keys left at their defaults changed (_use_default_values): now set explicitly "
                    f"{sorted(was - now)}, newly defaulted {sorted(now - was)}",
                )
            elif key not in back.config:
                _fail(f"{through}, key {key!r} was lost (was {_plain(value)!r})")
            else:
                _check(
                    _plain(got) == _plain(value),
                    f"{through}, key {key!r} came back as {_plain(got)!r} (was {_plain(value)!r})",
                )
        added = sorted((set(back.config) - set(original)) & init_keys)
        _check(not added, f"{through}, __init__ parameters {added} appeared in the config")


def _trained_betas(s: _Subject) -> None:
    if "trained_betas" not in _init_params(s.cls):
        raise ClauseSkipped("__init__ takes no trained_betas")
    plain = s.build()
    sde = s.sde_of(plain)
    if sde is not None and not isinstance(sde, VPTypeSDE):
        raise ClauseSkipped(f"its SDE ({type(sde).__name__}) is not VP-type, so it has no DDPM table")
    trained = np.array([0.1, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sdekit warns that 2 entries disagree with num_train_timesteps
        try:
            scheduler = s.build(trained_betas=trained)
        except ValueError as err:
            _fail(
                f"trained_betas={trained.tolist()} refused ({type(err).__name__}: {err}); diffusers takes any table "
                "whatever num_train_timesteps says"
            )
        _check(hasattr(scheduler, "betas"), "takes trained_betas but has no betas attribute")
        with tempfile.TemporaryDirectory() as folder:
            scheduler.save_pretrained(folder)
            loaded = s.cls.from_pretrained(folder)
    _check(
        scheduler.betas.tolist() == loaded.betas.tolist(),
        "betas built from trained_betas differ after save_pretrained/from_pretrained",
    )
    if sde is None:
        return
    # sdekit's VP-type schedulers: diffusers' attributes, in diffusers' form.
    for each in (plain, scheduler):
        betas, alphas, cumprod = each.betas, each.alphas, each.alphas_cumprod
        _check(
            all(v.dtype == torch.float32 and v.ndim == 1 for v in (betas, alphas, cumprod)),
            "betas / alphas / alphas_cumprod must be 1-d float32 tensors, as diffusers' DDPMScheduler has them",
        )
        _check(
            torch.equal(alphas, 1.0 - betas) and torch.equal(cumprod, torch.cumprod(alphas, dim=0)),
            "alphas must be 1 - betas and alphas_cumprod their cumulative product, as in diffusers",
        )
    config = plain.config
    if sde.is_discrete and config.get("sde_params", None) is None and "beta_schedule" in config:
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        reference = DDPMScheduler(**{key: config[key] for key in keys if key in config})
        _check(
            torch.equal(plain.alphas_cumprod, reference.alphas_cumprod) and torch.equal(plain.betas, reference.betas),
            "on a DDPM table, betas / alphas_cumprod differ from DDPMScheduler's for the same configuration",
        )


def _step(s: _Subject) -> None:
    scheduler = s.build()
    results = []
    for return_dict in (True, False):
        gen, x, t = _first_step_input(s, scheduler)
        results.append((x, s.step(scheduler, s.model_for(scheduler)(x, t), t, x, gen, return_dict=return_dict)))
    (x, as_dict), (_, as_tuple) = results
    _check(hasattr(as_dict, "prev_sample"), f"step() returned {type(as_dict).__name__}, which has no prev_sample")
    _check(isinstance(as_tuple, tuple), f"step(return_dict=False) returned {type(as_tuple).__name__}, not a tuple")
    prev = as_dict.prev_sample
    _check(prev.shape == x.shape, f"prev_sample has shape {tuple(prev.shape)}, the sample {tuple(x.shape)}")
    _check(prev.dtype == x.dtype, f"prev_sample is {prev.dtype}, the sample {x.dtype}")
    fields = [value for value in as_dict.values()] if hasattr(as_dict, "values") else [prev]
    for index, (a, b) in enumerate(zip(fields, as_tuple)):
        if isinstance(a, torch.Tensor):
            _check(
                isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-5),
                f"step(return_dict=False)[{index}] differs from the same field of step(return_dict=True)",
            )
    _check(
        prev is not x and not torch.equal(prev, x),
        "step() returned its input sample unchanged: prev_sample must be the sample after the update",
    )


def _add_noise(s: _Subject) -> None:
    scheduler = s.build()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[min(5, len(scheduler.timesteps) - 1)]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(s.batch_shape, generator=gen)
    noise = torch.randn(s.batch_shape, generator=gen)
    batch = x0.shape[0]
    try:
        one = scheduler.add_noise(x0, noise, t[None])
    except Exception as err:  # noqa: BLE001
        _fail(f"one timestep for the whole batch (shape (1,) against batch {batch}) raised {type(err).__name__}: {err}")
    each = scheduler.add_noise(x0, noise, t.repeat(batch))
    scalar = scheduler.add_noise(x0, noise, t)
    _check(one.shape == x0.shape, f"add_noise returned shape {tuple(one.shape)} for samples {tuple(x0.shape)}")
    _check(
        torch.allclose(one, each) and torch.allclose(scalar, each),
        "add_noise with one timestep for the batch ((1,) or 0-d) differs from the same timestep given per sample",
    )
    levels = scheduler.timesteps[torch.linspace(0, len(scheduler.timesteps) - 1, batch).round().long()]
    mixed = scheduler.add_noise(x0, noise, levels)
    for i in range(batch):
        alone = scheduler.add_noise(x0[i : i + 1], noise[i : i + 1], levels[i : i + 1])
        _check(torch.allclose(mixed[i : i + 1], alone), f"add_noise with per-sample timesteps mixes samples (row {i})")
    for shape in [(batch,), (batch, 7), (batch, 2, 3, 4, 2)]:
        for dtype in (torch.float32, torch.float16):
            a, b = torch.rand(shape).to(dtype), torch.randn(shape).to(dtype)
            noisy = scheduler.add_noise(a, b, t.repeat(batch))
            _check(
                noisy.shape == a.shape and noisy.dtype == dtype,
                f"add_noise on {dtype} samples of shape {shape} returned {noisy.dtype} of shape {tuple(noisy.shape)}",
            )


def _one_model_call_per_step(s: _Subject) -> None:
    scheduler = s.build()
    calls = {"model": 0, "step": 0}
    inner = s.model_for(scheduler)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["model"] += 1
        return inner(x, t)

    original_step = scheduler.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        calls["step"] += 1
        return original_step(*args, **kwargs)

    scheduler.step = counted_step  # s.step() reads the signature off the class, so generator= still goes through
    try:
        reference = s.sample(scheduler, 3, model=model)
    finally:
        del scheduler.step
    n = len(scheduler.timesteps)
    _check(
        calls["model"] == n and calls["step"] == n,
        f"a loop over the {n} timesteps made {calls['model']} model calls and {calls['step']} step() calls",
    )
    for index in range(n):
        changed = s.sample(scheduler, 3, perturb=index)
        _check(
            not torch.equal(changed, reference),
            f"the model output given at step {index + 1} of {n} does not change the result: every step must consume "
            "the output it is given",
        )


def _determinism(s: _Subject) -> None:
    scheduler = s.build()
    first = s.sample(scheduler, 4, seed=3)
    again = s.sample(scheduler, 4, seed=3)
    _check(
        torch.equal(first, again),
        f"two runs with generators seeded alike differ (max |difference| {(first - again).abs().max().item():.3g}): "
        "step() must draw randomness only from its generator, and set_timesteps() must reset all state",
    )
    fresh = s.sample(s.build(), 4, seed=3)
    _check(torch.equal(first, fresh), "a new scheduler with the same seed samples differently from a used one")


class NoHostSync(TorchDispatchMode):
    """Within this mode, any operation that makes the host wait for a device tensor's value fails.

    Caught: reading a value (``.item()``, ``float()``, ``int()``, ``bool()``: ``aten._local_scalar_dense``),
    ``torch.equal``, data-dependent shapes (``nonzero``, ``masked_select``, boolean-mask indexing) and copies from
    a device to the host (``.cpu()``, ``.tolist()``, ``.to("cpu")`` of a ``meta`` or accelerator tensor). On CPU
    tensors ``.cpu()`` and ``.tolist()`` dispatch nothing: run the code on ``meta`` tensors to catch them too.

    Args:
        allow_host_tensors: let reads of tensors that already live on the host (CPU) through, and catch only
            those of device tensors (a first ``step()`` may look its CPU timestep up once).
    """

    _READS = {
        "aten._local_scalar_dense.default": ".item() / float() / int() / bool() of a tensor",
        "aten.equal.default": "torch.equal",
        "aten.nonzero.default": "nonzero() (a data-dependent shape)",
        "aten.masked_select.default": "masked_select() (a data-dependent shape)",
    }

    def __init__(self, allow_host_tensors: bool = False) -> None:
        super().__init__()
        self.allow_host_tensors = allow_host_tensors

    def _on_device(self, tensors: Any) -> bool:
        found = [leaf for leaf in tree_flatten(tensors)[0] if isinstance(leaf, torch.Tensor)]
        return not self.allow_host_tensors or any(t.device.type != "cpu" for t in found)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func)
        if name in self._READS and self._on_device(args):
            raise ClauseFailure(f"{name} ({self._READS[name]})")
        if name == "aten.index.Tensor" and self._on_device(args):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                raise ClauseFailure(f"{name} with a boolean mask (a data-dependent shape)")
        if name in ("aten._to_copy.default", "aten.copy_.default"):
            source = args[1] if name == "aten.copy_.default" else args[0]
            target = args[0].device if name == "aten.copy_.default" else kwargs.get("device", None)
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None:
                if torch.device(target).type == "cpu":
                    raise ClauseFailure(f"{name} from {source.device.type} to the host (.cpu(), .tolist(), .to('cpu'))")
        return func(*args, **kwargs)


def _no_host_sync(s: _Subject) -> None:
    # On CPU tensors as sdekit's tests always did, then on meta tensors, whose missing data makes every read and
    # every copy to the host visible (on CPU .cpu() and .tolist() dispatch nothing).
    for device in ("cpu", "meta"):
        scheduler = s.build()
        scheduler.set_timesteps(4)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(s.batch_shape, generator=gen).to(device)
        timesteps = list(scheduler.timesteps)
        outputs = [torch.randn(s.batch_shape, generator=gen).to(device) for _ in timesteps]
        for index, t in enumerate(timesteps):
            where = f"at step {index + 1} of {len(timesteps)} ({device} tensors)"
            # The first step may look its (host) timestep up once, as diffusers' schedulers find their index.
            mode = NoHostSync(allow_host_tensors=index == 0)
            try:
                with mode:
                    x = s.step(scheduler, outputs[index], t, x, gen).prev_sample
            except ClauseFailure as err:
                _fail(f"step() synchronises with the host through {err} {where}")
            except Exception as err:  # noqa: BLE001
                if device != "meta":
                    raise
                _fail(
                    f"step() needs tensor values on the host {where}: on meta tensors, which hold no data as a "
                    f"device's hold none for the host, it raised {type(err).__name__}: {err}"
                )


def _oracle(s: _Subject) -> None:
    scheduler = s.build()
    sde = s.sde_of(scheduler)
    if sde is None:
        raise ClauseSkipped("the scheduler has no sde attribute (an sdekit.sde.SDE), so no exact score can be served")
    limit = len(scheduler) if hasattr(type(scheduler), "__len__") else None
    counts = sorted({min(n, limit) if limit else n for n in (2, 6, 24)})
    if len(counts) < 2:
        raise ClauseSkipped(f"only {limit} training levels: too few to compare step counts")
    mean, cov = s.mixture.mean(), s.mixture.covariance()
    distances = []
    for steps in counts:
        x = s.sample(scheduler, steps, seed=0, batch=512, dtype=torch.float64).reshape(512, -1)
        finite = bool(torch.isfinite(x).all())
        value = gaussian_frechet_distance(x.mean(0), torch.cov(x.T), mean, cov) if finite else math.inf
        distances.append(value)
    listing = ", ".join(f"{n} steps {d:.4g}" for n, d in zip(counts, distances))
    _check(math.isfinite(distances[-1]), f"samples are not finite at {counts[-1]} steps ({listing})")
    falls = all(later < earlier for earlier, later in zip(distances, distances[1:]))
    _check(falls, f"the Frechet distance to the data does not fall as steps grow: {listing}")


def _prediction_types(s: _Subject) -> None:
    if "prediction_type" not in _init_params(s.cls):
        raise ClauseSkipped("__init__ takes no prediction_type")
    runs = {}
    refused = {}
    for kind in PREDICTION_TYPES:
        try:
            scheduler = s.build(prediction_type=kind)
            sde = s.sde_of(scheduler)
            dtype = torch.float64 if sde is not None else torch.float32
            runs[kind] = s.sample(scheduler, 6, seed=1, batch=64, dtype=dtype)
        except (ValueError, NotImplementedError) as err:
            refused[kind] = f"{type(err).__name__}: {err}"
    _check(bool(runs), f"no prediction_type works: {refused}")
    for kind, x in runs.items():
        _check(bool(torch.isfinite(x).all()), f"prediction_type={kind!r} gives samples that are not finite")
    if s.sde_of(s.build()) is None:
        return
    first, reference = next(iter(runs.items()))
    for kind, x in runs.items():
        # Model timesteps are float32, so the oracle's noise level can differ from the scheduler's in the 7th digit.
        gap = (x - reference).abs().max().item()
        _check(
            gap < 1e-4 * (1 + reference.abs().max().item()),
            f"prediction_type={kind!r} gives other samples than {first!r} for the same exact model "
            f"(max |difference| {gap:.3g}): its output is not converted as {kind!r}",
        )


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' notes on keys a compatible class ignores, and its loading progress bars, off for the check."""
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.calls += 1


def _run_pipeline(pipe: Any, scheduler: Any, name: str, runs: int = 1, **call: Any) -> None:
    pipe.set_progress_bar_config(disable=True)
    counter = _CallCounter(pipe.unet)
    images = []
    for _ in range(runs):
        counter.calls = 0
        try:
            out = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call).images
        except Exception as err:  # noqa: BLE001
            _fail(f"{name}: {type(err).__name__}: {err}")
        _check(np.isfinite(out).all(), f"{name} produced images that are not finite")
        _check(
            counter.calls == len(scheduler.timesteps),
            f"{name} called the UNet {counter.calls} times for {len(scheduler.timesteps)} timesteps",
        )
        images.append(out)
    for again in images[1:]:
        _check(np.array_equal(images[0], again), f"{name} gave other images for the same generator seed")


def _pipelines(s: _Subject) -> str | None:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, LDMPipeline

    with _seeded(0):
        unet, vqvae = tiny_unet(), _tiny_vqvae()
    step = s.cls.step
    left_out = []
    if _accepts(step, "generator"):
        scheduler = s.build()
        _run_pipeline(DDPMPipeline(unet=unet, scheduler=scheduler), scheduler, "DDPMPipeline", runs=2,
                      batch_size=2, num_inference_steps=3)  # fmt: skip
    else:
        left_out.append("DDPMPipeline (step() takes no generator)")
    if _accepts(step, "eta") and _accepts(step, "use_clipped_model_output"):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
        pipe.scheduler = scheduler = s.build()  # its constructor would turn any scheduler into a DDIMScheduler
        _run_pipeline(pipe, scheduler, "DDIMPipeline", batch_size=1, num_inference_steps=3)
    else:
        left_out.append("DDIMPipeline (step() takes no eta / use_clipped_model_output)")
    scheduler = s.build()
    _run_pipeline(LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler), scheduler, "LDMPipeline",
                  batch_size=1, num_inference_steps=3)  # fmt: skip
    return "not run: " + "; ".join(left_out) if left_out else None


def _pipeline_save_load(s: _Subject) -> None:
    from diffusers import DDPMPipeline, DiffusionPipeline

    with _seeded(0):
        unet = tiny_unet()
    scheduler = s.build()
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    with tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(folder)
        library, class_name = json.loads((Path(folder) / "model_index.json").read_text())["scheduler"]
        _check(
            class_name == s.cls.__name__, f"model_index.json names the scheduler {class_name!r}, not {s.cls.__name__!r}"
        )
        if registered_name(s.cls, "sampler") is not None and _is_sdekit_scheduler(s.cls):
            _check(
                library == "sdekit", f"a registered sdekit sampler must be saved as ['sdekit', ...], got {library!r}"
            )
        try:
            reloaded = DiffusionPipeline.from_pretrained(folder)
        except Exception as err:  # noqa: BLE001
            _fail(
                f"DiffusionPipeline.from_pretrained could not load the saved scheduler {[library, class_name]}: "
                f"{type(err).__name__}: {err}"
            )
        alone = s.cls.from_pretrained(folder, subfolder="scheduler")
    _check(
        type(reloaded.scheduler) is s.cls,
        f"DiffusionPipeline.from_pretrained gave a {type(reloaded.scheduler).__name__}, not a {s.cls.__name__}",
    )
    for what, config in (
        ("DiffusionPipeline.from_pretrained", reloaded.scheduler.config),
        ("from_pretrained", alone.config),
    ):
        got, want = _public(config), _public(scheduler.config)
        changed = sorted(key for key in set(got) | set(want) if got.get(key) != want.get(key))
        _check(not changed, f"{what} of the saved pipeline changed config keys {changed}")


def _is_sdekit_scheduler(cls: type) -> bool:
    from ..scheduler import SDEScheduler

    return issubclass(cls, SDEScheduler)


CLAUSES: dict[str, Callable[[_Subject], str | None]] = {
    "public API": _public_api,
    "config round trip": _config_round_trip,
    "compatibles round trip": _compatibles_round_trip,
    "trained_betas": _trained_betas,
    "step": _step,
    "add_noise": _add_noise,
    "one model call per step": _one_model_call_per_step,
    "determinism": _determinism,
    "no host sync": _no_host_sync,
    "oracle": _oracle,
    "prediction types": _prediction_types,
    "pipelines": _pipelines,
    "pipeline save/load": _pipeline_save_load,
}
"""Every clause of :func:`check_scheduler`, by name, in the order they run."""


def check_scheduler(cls_or_name: type | str, **config: Any) -> ConformanceReport:
    """Check that ``cls_or_name(**config)`` keeps diffusers' scheduler contract and sdekit's (see the module).

    Args:
        cls_or_name: a scheduler class, or the name of an installed sampler plugin (as for
            :func:`sdekit.load_scheduler`).
        **config: the constructor arguments to check it with (default: its defaults).

    Returns:
        A :class:`ConformanceReport` of the clauses that held and those that did not apply.

    Raises:
        AssertionError: a clause does not hold; the message is
            ``check_scheduler(<Class>): clause "<clause>": <what is wrong>``.
    """
    cls = get_sampler_class(cls_or_name) if isinstance(cls_or_name, str) else cls_or_name
    if not inspect.isclass(cls):
        raise TypeError(f"check_scheduler needs a scheduler class or a sampler plugin name, got {cls_or_name!r}.")
    subject = _Subject(cls, dict(config))
    report = ConformanceReport(cls.__name__)
    with torch.random.fork_rng(devices=[]), _quiet_diffusers():
        for name, clause in CLAUSES.items():
            try:
                note = clause(subject)
            except ClauseSkipped as why:
                report.skipped[name] = str(why)
                continue
            except AssertionError as err:
                raise AssertionError(f'check_scheduler({cls.__name__}): clause "{name}": {err}') from err
            except Exception as err:  # noqa: BLE001
                raise AssertionError(
                    f'check_scheduler({cls.__name__}): clause "{name}": {type(err).__name__}: {err}'
                ) from err
            report.passed.append(name)
            if note:
                report.notes[name] = note
    return report

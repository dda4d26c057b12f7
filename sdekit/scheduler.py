"""The diffusers-scheduler plumbing every sdekit sampler shares.

The public extension API, what sdekit's own samplers use and a third-party sampler uses the same way
(``docs/plugins.md`` has a complete sampler written against it). A sampler subclasses :class:`SDEScheduler`,
lists the shared configuration (:data:`COMMON_CONFIG`) plus its own parameters in an ``@register_to_config``
``__init__`` that ends with :meth:`SDEScheduler.setup`, and implements two methods:

* :meth:`~SDEScheduler.plan_evaluations` ``(times)``: given the noise levels to visit (continuous ``t``,
  descending), return the continuous time of every model evaluation, in order, and precompute whatever ``step()``
  needs (as Python floats, so that ``step()`` launches no host-device syncs);
* :meth:`~SDEScheduler.update` ``(index, model_output, sample, generator, use_clipped_model_output, eta)``: one
  evaluation's update, returning ``(prev_sample, pred_original_sample)``.

It may override :meth:`~SDEScheduler.spaced_times` / :meth:`~SDEScheduler.custom_times` (how ``set_timesteps``
chooses the levels) and :meth:`~SDEScheduler.check_eta`, and uses the helpers :meth:`~SDEScheduler.kernel_coeffs`,
:meth:`~SDEScheduler.x0_and_eps`, :meth:`~SDEScheduler.noise_like`, :meth:`~SDEScheduler.model_timesteps`,
:meth:`~SDEScheduler.grid_times`, :meth:`~SDEScheduler.grid_levels_and_end` and
:meth:`~SDEScheduler.check_num_inference_steps`. A sampler that takes the
time-grid option (:data:`GRID_PARAMETERS`: ``time_grid``, ``rho``) gets its levels on that grid (:mod:`sdekit.grids`).

The base builds the SDE from the config, maps continuous time to the model's timestep units, keeps the step
index as diffusers' schedulers do, checks shapes, honours ``check_finite``, and translates configs saved by
diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` / ``ScoreSdeVeScheduler``.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .grids import check_time_grid, time_grid
from .parametrization import (
    PREDICTION_TYPES,
    TIME_INPUTS,
    check_choice,
    from_model_time,
    split_model_output,
    time_to_level,
    to_model_time,
)
from .registry import get_sampler_class, get_sde, get_sde_class, list_plugins, registered_name
from .sde import SDE, TimeLike, VPTypeSDE, broadcast_time, compute_dtype

__all__ = [
    "COMMON_CONFIG",
    "GRID_PARAMETERS",
    "SHARED_DOC",
    "SHARED_PARAMETERS",
    "SDEScheduler",
    "SDESchedulerOutput",
    "SharedParameter",
    "check_shared_parameters",
    "sde_from_config",
    "shared_config",
]


@dataclass(frozen=True)
class SharedParameter:
    """One key of the configuration every sdekit scheduler takes: its name, default and annotation (as written in
    the ``__init__`` signature, under ``from __future__ import annotations``)."""

    name: str
    default: Any
    annotation: str


SHARED_PARAMETERS: tuple[SharedParameter, ...] = (
    SharedParameter("num_train_timesteps", 1000, "int"),
    SharedParameter("beta_start", 0.0001, "float"),
    SharedParameter("beta_end", 0.02, "float"),
    SharedParameter("beta_schedule", "linear", "str"),
    SharedParameter("trained_betas", None, "list[float] | None"),
    SharedParameter("sigma_min", 0.01, "float"),
    SharedParameter("sigma_max", 50.0, "float"),
    SharedParameter("sde", "vp", "str"),
    SharedParameter("sde_params", None, "dict | None"),
    SharedParameter("sampling_eps", None, "float | None"),
    SharedParameter("prediction_type", "epsilon", "str"),
    SharedParameter("time_input", None, "str | None"),
    SharedParameter("clip_sample", False, "bool"),
    SharedParameter("clip_sample_range", 1.0, "float"),
    SharedParameter("check_finite", False, "bool"),
)
"""The shared configuration, declared once: every sdekit scheduler's ``__init__`` starts with these parameters,
with these defaults and annotations (:func:`check_shared_parameters`); :class:`SDEScheduler` documents them."""

COMMON_CONFIG: tuple[str, ...] = tuple(p.name for p in SHARED_PARAMETERS)
"""Configuration keys every sdekit scheduler takes (see :class:`SDEScheduler` for their meaning)."""

SHARED_DOC = (
    "num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde, "
    "sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite: the "
    "shared configuration of :class:`sdekit.SDEScheduler`"
)
"""How a sampler's docstring names the shared parameters (whitespace aside): by reference to the base, which
documents them, so that their descriptions and defaults are written once."""

_SHARED_DEFAULTS: dict[str, Any] = {p.name: p.default for p in SHARED_PARAMETERS}

GRID_PARAMETERS: tuple[SharedParameter, ...] = (
    SharedParameter("time_grid", None, "str | None"),
    SharedParameter("rho", 7.0, "float"),
)
"""The time-grid option a sampler may take: ``time_grid`` (``uniform``, ``logsnr`` or ``karras``, see
:mod:`sdekit.grids`; ``None`` for the sampler's own choice, :meth:`SDEScheduler.default_time_grid`) and ``rho`` (the
Karras exponent). A sampler that lists both in its ``__init__`` (together, in this order, with these annotations; the
defaults are its own) gets them validated by :meth:`SDEScheduler.setup` and its ``set_timesteps(n)`` levels laid out
on that grid by :meth:`SDEScheduler.grid_times`. Samplers without them step on the uniform grid."""


def check_shared_parameters(cls: type) -> None:
    """Check that the sampler ``cls`` takes the shared configuration as declared in :data:`SHARED_PARAMETERS`.

    Its ``__init__`` must start with those parameters, in that order, with the same annotations and defaults (a
    sampler may change a default only by declaring it in :attr:`SDEScheduler.shared_default_overrides`), and its
    docstring must refer to them with :data:`SHARED_DOC` rather than describe them again.

    Raises:
        TypeError: naming the first parameter that differs, what it is and what it should be.
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    overrides = dict(getattr(cls, "shared_default_overrides", {}))
    for index, shared in enumerate(SHARED_PARAMETERS):
        default = overrides.get(shared.name, shared.default)
        if index >= len(params) or params[index].name != shared.name:
            found = params[index].name if index < len(params) else "nothing"
            raise TypeError(
                f"{cls.__name__}.__init__: parameter {index + 1} must be the shared {shared.name!r}, found {found!r}."
            )
        param = params[index]
        if param.default != default or type(param.default) is not type(default):
            declared = " (declared in shared_default_overrides)" if shared.name in overrides else ""
            raise TypeError(
                f"{cls.__name__}.__init__: {shared.name} defaults to {param.default!r}; the shared configuration's "
                f"default is {default!r}{declared}."
            )
        annotation = param.annotation
        written = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
        if written != shared.annotation:
            raise TypeError(
                f"{cls.__name__}.__init__: {shared.name} is annotated {written}; the shared configuration's "
                f"annotation is {shared.annotation}."
            )
    names = [p.name for p in params]
    grid_names = [p.name for p in GRID_PARAMETERS]
    if any(name in names for name in grid_names):
        if not all(name in names for name in grid_names):
            raise TypeError(
                f"{cls.__name__}.__init__ takes only part of the time-grid option; take all of {grid_names}."
            )
        start = names.index(grid_names[0])
        if names[start : start + len(grid_names)] != grid_names:
            raise TypeError(
                f"{cls.__name__}.__init__: the time-grid option's parameters must follow each other as {grid_names}."
            )
        for shared in GRID_PARAMETERS:
            annotation = params[names.index(shared.name)].annotation
            written = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            if written != shared.annotation:
                raise TypeError(
                    f"{cls.__name__}.__init__: {shared.name} is annotated {written}; the time-grid option's "
                    f"annotation is {shared.annotation}."
                )
    if " ".join(SHARED_DOC.split()) not in " ".join((cls.__doc__ or "").split()):
        raise TypeError(
            f"{cls.__name__}'s docstring must name the shared parameters as {SHARED_DOC!r} (they are documented "
            "once, on SDEScheduler)."
        )


@dataclass
class SDESchedulerOutput(BaseOutput):
    """Output of ``step()``.

    Args:
        prev_sample: the sample after this evaluation's update, to feed to the next ``step()``.
        pred_original_sample: the model's estimate of the clean sample ``x_0`` at this evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def shared_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every SDE key of the shared configuration present, missing ones at :class:`SDEScheduler`'s
    defaults (``sde``, ``sde_params``, the DDPM table, ``sigma_min`` / ``sigma_max``, ``sampling_eps``).

    Handing this to ``from_config`` of any scheduler gives it the keys it knows, so a scheduler that reads
    ``sigma_max`` (a third-party VE sampler) sees the same value as the SDE does.
    """
    return {**_SHARED_DEFAULTS, **config}


def sde_from_config(config: Mapping[str, Any]) -> SDE:
    """The SDE a scheduler configuration describes: the plugin ``config["sde"]`` built from the arguments it
    picks itself (:meth:`sdekit.sde.SDE.scheduler_params`: ``sde_params``, or else the shared keys that describe
    it, such as the DDPM table for ``vp`` / ``subvp`` or ``sigma_min`` / ``sigma_max`` for ``ve``). Missing keys
    take :class:`SDEScheduler`'s defaults.

    This is how every sdekit scheduler builds its SDE, so the trainer's objective and a saved pipeline's
    scheduler agree on it.
    """
    c = shared_config(config)
    return get_sde(c["sde"], **get_sde_class(c["sde"]).scheduler_params(c))


def _diffusers_defaults(class_name: str) -> dict[str, Any]:
    cls = getattr(diffusers, class_name, None)
    if cls is None or not inspect.isclass(cls):
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _source_class(config: Mapping[str, Any]) -> str | None:
    """The class that saved ``config``: its ``_class_name``, or for an in-memory config (which has none) the
    diffusers class its keys identify (``ScoreSdeVeScheduler`` has no beta schedule but ``correct_steps``)."""
    name = config.get("_class_name")
    if isinstance(name, str):
        return name
    if "sde" not in config and "correct_steps" in config and "beta_start" not in config:
        return "ScoreSdeVeScheduler"
    return None


class SDEScheduler(SchedulerMixin, ConfigMixin, metaclass=abc.ABCMeta):
    """Base of sdekit's diffusers schedulers. Not used directly: sampler plugins subclass it.

    Shared configuration (every subclass's ``__init__`` takes these):

    Args:
        num_train_timesteps: ``N``, the number of training noise levels (DDPM table length, VE ``N``); default 1000.
        beta_start, beta_end, beta_schedule, trained_betas: a diffusers DDPM schedule (defaults 0.0001, 0.02,
            ``"linear"``, ``None``); with ``sde`` ``vp`` or ``subvp`` and no ``sde_params`` the SDE runs on this
            table.
        sigma_min, sigma_max: the VE noise range when ``sde="ve"`` and no ``sde_params`` (defaults 0.01, 50).
        sde: name of the SDE plugin (``vp``, ``subvp``, ``ve`` or any installed one); default ``vp``.
        sde_params: keyword arguments for that SDE instead of the ones above, e.g.
            ``{"beta_min": 0.1, "beta_max": 20}`` for the continuous VP SDE; default ``None``.
        sampling_eps: the smallest time sampled; ``None`` (default) takes the SDE's own (0 on a DDPM table,
            1e-3 for continuous VP / sub-VP, 1e-5 for VE).
        prediction_type: what the model returns: ``epsilon`` (default), ``v_prediction``, ``sample``, ``score``.
        time_input: the model's timestep units, ``ddpm`` (``t (N - 1)``), ``sigma`` or ``continuous``; ``None``
            (default) is the SDE's own :meth:`~sdekit.sde.SDE.default_time_input` (``sigma`` for VE, ``ddpm`` for VP
            and sub-VP).
        clip_sample: clip the predicted ``x_0`` to ``[-clip_sample_range, clip_sample_range]``; default False.
        clip_sample_range: default 1.0.
        check_finite: after every step, raise if the sample holds NaN or Inf. Off by default: the check makes
            the host wait for the device at every step.

    The time-grid option (:data:`GRID_PARAMETERS`), for samplers that take it:

    Args:
        time_grid: where ``set_timesteps(n)`` puts the levels (:mod:`sdekit.grids`): ``uniform`` in ``t``,
            ``logsnr`` (uniform in log signal-to-noise ratio), ``karras`` (Karras et al. 2022, eq. 5), or ``None``
            for the sampler's choice (:meth:`default_time_grid`). ``set_timesteps(timesteps=...)`` ignores it.
        rho: the ``karras`` grid's exponent, > 0; default 7.
    """

    _compatibles = ["DDPMScheduler", "DDIMScheduler", "ScoreSdeVeScheduler"]
    order = 1
    shared_default_overrides: Mapping[str, Any] = {}
    """Shared parameters whose default this sampler changes, with the new default (e.g. ``{"clip_sample": True}``);
    :func:`check_shared_parameters` holds the signature to it."""
    integer_timesteps = False
    """Whether ``timesteps`` are the model's integer training levels (DDPM-style samplers) on ``ddpm`` model time."""
    lands_past_last_level = False
    """Whether ``set_timesteps(n)`` evaluates the first ``n`` of ``n + 1`` grid points (:meth:`grid_levels_and_end`)
    and keeps the last, where the last step lands without a model evaluation, as :attr:`grid_end`."""
    grid_end: float | None = None
    """With :attr:`lands_past_last_level`, the time the last step of ``set_timesteps(n)`` lands on; ``None`` before,
    for a sampler without it, and for levels given as ``timesteps=``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # diffusers saves a pipeline component as [top-level module, class name] and loads it back by getattr on
        # that module. A registered sampler is reachable as sdekit.<Class> (see sdekit.__getattr__), so it is
        # recorded as ["sdekit", "<Class>"], independent of the plugin's internal layout.
        if registered_name(cls, "sampler") is not None:
            cls.__module__ = "sdekit"

    # -- construction -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the SDE from the configuration (:func:`sde_from_config`), resolve the model's time input,
        validate the shared configuration and reset the sampling state. A sampler calls it at the end of its
        ``__init__``, after checking its own parameters; afterwards ``self.sde``, ``self.time_input``,
        ``self.init_noise_sigma`` and ``self.eval_times`` (the continuous time of each planned evaluation) exist."""
        c = self.config
        check_choice("prediction_type", c.prediction_type, PREDICTION_TYPES)
        if c.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {c.clip_sample_range!r}.")
        self.sde: SDE = sde_from_config(c)
        self.time_input = c.time_input or self.sde.default_time_input()
        check_choice("time_input", self.time_input, TIME_INPUTS)
        if self.takes_time_grid():
            check_time_grid(self.default_time_grid() if c.time_grid is None else c.time_grid, c.rho)
        self.init_noise_sigma = self.sde.prior_std()
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.eval_times: list[float] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """Build from a config, translating those saved by diffusers' own schedulers.

        A ``ScoreSdeVeScheduler`` config becomes the VE SDE with its ``sigma_min``, ``sigma_max`` and
        ``sampling_eps``, score outputs and ``sigma`` model time (``snr`` and ``correct_steps`` go to samplers
        that take them). DDPM-style configs keep their beta schedule. Keys the original class left at its own
        defaults take that class's defaults, not sdekit's.

        The result's config has diffusers' form: the keys the source left at its defaults are listed in
        ``_use_default_values`` again. Those whose default is also this class's are not passed on, as diffusers'
        ``from_config`` does; those whose default differs are passed (sdekit's rule above) yet still listed. So a
        round trip through a compatible sdekit class gives back the same config.
        """
        if config is None:
            raise ValueError("from_config needs a config (e.g. pipe.scheduler.config).")
        config = dict(config)
        # A scheduler's config holds the value of every key, defaults included. diffusers drops the keys listed
        # here, so the source's defaults become this class's; sdekit keeps a source default that differs from its
        # own (DDPMScheduler's clip_sample=True stays True), and drops the rest below, as diffusers does.
        used_defaults = config.pop("_use_default_values", [])
        source = _source_class(config)
        for key in ("rescale_betas_zero_snr", "thresholding"):
            if config.get(key):
                raise ValueError(
                    f"the {source or 'given'} config sets {key}=True, which sdekit's samplers do not implement; "
                    "set it to False."
                )
        if source is not None and source != cls.__name__:
            defaults = _diffusers_defaults(source)
            for key in used_defaults:
                if key in defaults:
                    config[key] = defaults[key]
            if source == "ScoreSdeVeScheduler":
                config.update(sde="ve", prediction_type="score", time_input="sigma", sde_params=None)
                config.setdefault("sigma_max", defaults.get("sigma_max"))
                if "correct_steps" in config:
                    config["corrector_steps"] = config.pop("correct_steps")

        def same(value: Any, default: Any) -> bool:
            if value is None or default is None:
                return value is default
            try:
                return bool(value == default)
            except (TypeError, ValueError, RuntimeError):  # arrays and tensors compare elementwise
                return False

        own_defaults = {
            name: param.default
            for name, param in inspect.signature(cls.__init__).parameters.items()
            if param.default is not inspect.Parameter.empty
        }
        carried = set()  # the source's defaults that differ from this class's: passed, yet still defaults
        for key in used_defaults:
            if key in config and (key not in own_defaults or same(config[key], own_defaults[key])):
                del config[key]
            elif key in own_defaults and key in config and key not in kwargs:
                carried.add(key)
        built = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if carried:
            scheduler = built[0] if return_unused_kwargs else built
            # Listed as diffusers lists the defaults of a directly constructed scheduler, so that a later switch
            # drops them again instead of taking them for the user's settings.
            defaults = set(scheduler.config.get("_use_default_values", [])) | carried
            scheduler.register_to_config(_use_default_values=[key for key in own_defaults if key in defaults])
        return built

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers' schedulers in ``_compatibles`` and every usable sdekit sampler plugin.

        diffusers moves a config between compatible classes quietly: settings that only another compatible class
        takes (``pc``'s ``snr`` given to ``ddim``) are neither passed nor warned about, and stay in the config for
        the way back. It finds compatibles by name in the ``diffusers`` module only, so sdekit adds its plugins
        here; ``pipe.scheduler.compatibles`` lists them all.
        """
        plugins = [get_sampler_class(p.name) for p in list_plugins(kind="sampler") if p.status == "ok"]
        return [*super()._get_compatibles(), *plugins]

    # -- the diffusers scheduler interface ----------------------------------------------------------------

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int | None:
        """Index of the next evaluation in ``timesteps``; ``None`` until the first ``step()``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first evaluation, set by pipelines (e.g. img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation ``begin_index`` (call before the first ``step()``)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: TimeLike | None = None) -> torch.Tensor:
        """sdekit models take ``x_t`` unscaled: returns ``sample``."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Choose the noise levels to visit and reset all sampler state.

        Args:
            num_inference_steps: number of noise levels (spaced as the sampler defines; evenly in ``t`` from 1 to
                ``sampling_eps`` unless it says otherwise).
            device: where ``timesteps`` live.
            timesteps: the levels instead, in the model's timestep units, strictly decreasing.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps.")
        if timesteps is not None:
            times = self.custom_times(timesteps)
        else:
            times = self.spaced_times(num_inference_steps)
        self.num_inference_steps = len(times)
        self.eval_times = self.plan_evaluations(times)
        self.timesteps = self.model_timesteps(torch.tensor(self.eval_times, dtype=torch.float64)).to(device=device)
        self._step_index = None
        self._begin_index = None

    def spaced_times(self, num_inference_steps: int) -> list[float]:
        """Continuous times of ``num_inference_steps`` levels from ``T`` to ``sampling_eps`` (both included), on the
        sampler's time grid (:meth:`grid_times`; evenly spaced in ``t`` for a sampler without the option)."""
        self.check_num_inference_steps(num_inference_steps)
        if self.lands_past_last_level:
            times, self.grid_end = self.grid_levels_and_end(num_inference_steps)
            return times
        return self.grid_times(num_inference_steps)

    def check_num_inference_steps(self, num_inference_steps: int) -> None:
        """Raise ``ValueError`` unless ``num_inference_steps`` is an integer >= 1 and, on a discrete table, at most
        its ``num_train_timesteps`` levels (more would visit some table level twice over)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if self.sde.is_discrete and num_inference_steps > self.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the {self.config.num_train_timesteps} noise "
                f"levels of this discrete schedule; use at most {self.config.num_train_timesteps}."
            )

    def grid_times(self, num_points: int) -> list[float]:
        """``num_points`` continuous times from ``T`` down to ``sampling_eps`` (both included) on the configured time
        grid: :func:`sdekit.grids.time_grid` with the sampler's ``time_grid`` and ``rho``, or the uniform grid for
        a sampler that does not take the option (:data:`GRID_PARAMETERS`)."""
        if not self.takes_time_grid():  # a config handed over from a sampler that does (e.g. pc's) may hold it
            return time_grid(self.sde, num_points, self.default_time_grid())
        c = self.config
        return time_grid(self.sde, num_points, c.time_grid or self.default_time_grid(), c.rho)

    def grid_levels_and_end(self, num_levels: int) -> tuple[list[float], float]:
        """``num_levels`` levels to evaluate on the configured time grid, and the grid point after the last one,
        where the last step lands without a model evaluation (no level is spent where the sample is already at
        the data end): :meth:`grid_times` of ``num_levels + 1`` points, split as ``(points[:-1], points[-1])``."""
        points = self.grid_times(num_levels + 1)
        return points[:-1], points[-1]

    @classmethod
    def takes_time_grid(cls) -> bool:
        """Whether this sampler takes the time-grid option (:data:`GRID_PARAMETERS`) in its ``__init__``."""
        return "time_grid" in inspect.signature(cls.__init__).parameters

    def default_time_grid(self) -> str:
        """The grid :meth:`grid_times` uses when the sampler's ``time_grid`` is ``None`` (or it takes no time-grid
        option): ``uniform``. A sampler whose best grid depends on its other settings overrides this."""
        return "uniform"

    def custom_times(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """Continuous times of user-given model timesteps, which must be strictly decreasing (all evaluated:
        :attr:`grid_end` becomes ``None``)."""
        self.grid_end = None
        levels = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        if levels.numel() < 1 or not bool(torch.all(levels[1:] < levels[:-1])):
            raise ValueError(f"timesteps must be a non-empty, strictly decreasing sequence; got {levels.tolist()}.")
        return from_model_time(self.sde, levels, self.time_input).tolist()

    def model_timesteps(self, eval_times: torch.Tensor) -> torch.Tensor:
        """The ``timesteps`` tensor for evaluation times ``eval_times`` (float64): int64 table levels for samplers
        with :attr:`integer_timesteps` on ``ddpm`` model time, float32 model units otherwise."""
        if self.integer_timesteps and self.time_input == "ddpm":
            return time_to_level(eval_times, self.config.num_train_timesteps)
        return to_model_time(self.sde, eval_times, self.time_input).to(torch.float32)

    def _init_step_index(self, timestep: TimeLike) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        timestep = torch.as_tensor(timestep, dtype=self.timesteps.dtype, device=self.timesteps.device)
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of this scheduler's timesteps; call set_timesteps() and "
                "pass the values of scheduler.timesteps in order."
            )
        self._step_index = int(matches[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimeLike,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
    ) -> SDESchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One model evaluation's update.

        Args:
            model_output: the model's output at ``sample`` and ``timestep`` (of ``prediction_type``).
            timestep: the current entry of ``timesteps``.
            sample: the current sample ``x_t``.
            generator: the only source of randomness.
            return_dict: return :class:`SDESchedulerOutput` (default) or a tuple.
            eta: DDIM's noise scale; only samplers that define it accept a value other than ``None`` / 0.
            use_clipped_model_output: with ``clip_sample``, re-derive the noise from the clipped ``x_0``.

        Returns:
            ``prev_sample`` and ``pred_original_sample``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step().")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "the model must predict one value per sample element (a model with learned variances returns "
                "twice the channels: pass only the first half)."
            )
        self.check_eta(eta)
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self.eval_times):
            raise ValueError(f"all {len(self.eval_times)} evaluations are done; call set_timesteps() to start over.")
        prev_sample, x0 = self.update(index, model_output, sample, generator, bool(use_clipped_model_output), eta)
        if self.config.check_finite and not bool(torch.isfinite(prev_sample).all()):
            raise FloatingPointError(
                f"step {index} (timestep {float(self.timesteps[index])}) produced NaN or Inf; check the model output "
                "and the configuration (prediction_type, time_input)."
            )
        self._step_index = index + 1
        prev_sample, x0 = prev_sample.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0
        return SDESchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | TimeLike
    ) -> torch.Tensor:
        """``x_t = alpha(t) x_0 + sigma(t) noise`` at model timesteps ``timesteps``.

        As in diffusers' schedulers, ``timesteps`` holds one timestep per sample (shape ``(B,)``) or one for the
        whole batch (a number, a 0-d tensor, or shape ``(1,)``, e.g. ``scheduler.timesteps[k][None]``).
        """
        t = from_model_time(self.sde, torch.as_tensor(timesteps, device=original_samples.device), self.time_input)
        batch = original_samples.shape[0] if original_samples.ndim else 1
        if t.numel() == 1:
            t = t.reshape(())
        elif t.numel() == batch:
            t = t.reshape(batch)
        else:
            raise ValueError(
                f"add_noise needs one timestep per sample ({batch}) or one for the whole batch; got timesteps of "
                f"shape {tuple(t.shape)} for samples of shape {tuple(original_samples.shape)}."
            )
        tt = broadcast_time(t, original_samples)
        alpha, sigma = self.sde.marginal_coeffs(tt)
        noisy = alpha * original_samples.to(tt.dtype) + sigma * noise.to(tt.dtype)
        return noisy.to(original_samples.dtype)

    # -- the extension API: what a sampler implements, overrides and uses ------------------------------------

    def check_eta(self, eta: float | None) -> None:
        """Validate the ``eta`` passed to ``step()``; raise ``ValueError`` if this sampler cannot take it.

        The default: samplers without DDIM's ``eta`` accept only ``None`` or 0 (what DDIM / LDM pipelines pass).
        Override it in a sampler that has an ``eta``.
        """
        if eta not in (None, 0, 0.0):
            raise ValueError(
                f"eta={eta!r} is DDIM's noise scale; {type(self).__name__} does not use it. Pass eta=0 (or none), "
                "or use the ddim or analytic-dpm sampler."
            )

    def kernel_coeffs(self, t: float) -> tuple[float, float]:
        """``(alpha(t), sigma(t))`` of the SDE's kernel as Python floats (for precomputation)."""
        alpha, sigma = self.sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
        return float(alpha), float(sigma)

    def x0_and_eps(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        alpha: float,
        sigma: float,
        use_clipped_model_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_0, eps)`` from the model output, in the compute dtype; ``x_0`` clipped when configured.

        With ``use_clipped_model_output`` the noise is re-derived from the clipped ``x_0``.
        """
        x0, eps = split_model_output(model_output, sample, alpha, sigma, self.config.prediction_type)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
            if use_clipped_model_output:
                _, eps = split_model_output(x0, sample.to(x0.dtype), alpha, sigma, "sample")
        return x0, eps

    def noise_like(
        self, sample: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Standard normal noise like ``sample`` in the compute dtype, from ``generator`` (or a list of generators,
        one per sample); the only source of randomness a sampler should use."""
        dtype = compute_dtype(sample.dtype)
        return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)

    @abc.abstractmethod
    def plan_evaluations(self, times: list[float]) -> list[float]:
        """The continuous time of every model evaluation, in order, for the noise levels ``times`` (descending,
        from :meth:`spaced_times` or :meth:`custom_times`); precompute what :meth:`update` needs.

        Called by ``set_timesteps``; ``timesteps`` becomes these times in the model's units, so a sampler that
        evaluates the model twice per level (a corrector, a second-order solver) lists the level twice.
        """

    @abc.abstractmethod
    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation ``index``'s update: ``(prev_sample, pred_original_sample)``, in the compute dtype (the base
        casts them back to the sample's dtype).

        Called by ``step()`` once per model evaluation after the base has checked the shapes and ``eta``
        (:meth:`check_eta`) and found the index. ``model_output`` is the model's prediction at ``sample`` and
        ``eval_times[index]``; draw noise only with :meth:`noise_like` from ``generator``; read no tensor on the
        host.
        """

    # -- diffusers' DDPM table: betas, alphas, alphas_cumprod (VP-type SDEs only) -------------------------

    @property
    def betas(self) -> torch.Tensor:
        """``beta_k = 1 - alpha_bar_k / alpha_bar_{k-1}`` of the ``N`` training levels, float32, as diffusers'
        ``DDPMScheduler.betas`` (on a DDPM table, that table exactly). VP-type SDEs only (:meth:`_ddpm_table`)."""
        return self._ddpm_table()[0]

    @property
    def alphas(self) -> torch.Tensor:
        """``1 - betas``, float32, as diffusers' ``alphas``. VP-type SDEs only."""
        return self._ddpm_table()[1]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alpha_bar_k``, the cumulative product of :attr:`alphas` in float32, as diffusers' ``alphas_cumprod``.
        VP-type SDEs only."""
        return self._ddpm_table()[2]

    def _ddpm_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(betas, alphas, alphas_cumprod)`` of a VP-type SDE (:class:`~sdekit.sde.VPTypeSDE`) at its ``N``
        training levels ``k``, continuous time ``t_k = k / (N - 1)`` (model time ``k`` on ``ddpm`` time input).

        Built as diffusers builds them: float32 betas, ``alphas = 1 - betas``, a float32 cumulative product. The
        betas come from the SDE, ``-expm1(log alpha_bar(t_k) - log alpha_bar(t_{k-1}))`` with
        ``alpha_bar(t_{-1}) = 1``, so on a DDPM table they are the table's betas bit for bit, and a continuous VP
        SDE gets the table of its levels (``beta_0 = 0`` for the linear schedule: level 0 is the clean data). For
        sub-VP, ``alphas_cumprod`` is the squared mean coefficient; its noise std is ``1 - alpha_bar``, not
        ``sqrt(1 - alpha_bar)``. Other SDEs have no such table: the attributes raise ``AttributeError``.
        """
        sde = self.__dict__.get("sde")
        if not isinstance(sde, VPTypeSDE):
            raise AttributeError(self._no_ddpm_table_message())
        cached = self.__dict__.get("_ddpm_table_cache")
        if cached is None or cached[0] is not sde:
            n = sde.N
            levels = torch.arange(-1, n, dtype=torch.float64) / max(n - 1, 1)
            log_abar = sde.log_alpha_bar(levels)
            log_abar[0] = 0.0  # the clean data before level 0
            betas = (-torch.expm1(log_abar[1:] - log_abar[:-1])).to(torch.float32)
            alphas = 1.0 - betas
            cached = (sde, betas, alphas, torch.cumprod(alphas, dim=0))
            self.__dict__["_ddpm_table_cache"] = cached
        return cached[1], cached[2], cached[3]

    def _no_ddpm_table_message(self, name: str = "betas / alphas / alphas_cumprod") -> str:
        sde = self.__dict__.get("sde")
        return (
            f"{type(self).__name__} has no {name}: its SDE ({sde!r}) is not VP-type, so there is no DDPM table "
            "of betas. Read the noise schedule from the SDE instead: scheduler.sde.marginal_coeffs(t)."
        )

    def __getattr__(self, name: str) -> Any:
        # A property that raises AttributeError falls through to __getattr__; keep its message.
        if name in ("betas", "alphas", "alphas_cumprod"):
            raise AttributeError(self._no_ddpm_table_message(name))
        return super().__getattr__(name)

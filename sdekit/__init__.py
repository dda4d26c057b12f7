"""sdekit: score-based diffusion samplers, SDEs and likelihoods for the Hugging Face ecosystem.

SDEs and samplers are plugins (entry-point groups ``sdekit.sdes`` and ``sdekit.samplers``); find them with
:func:`list_plugins`, build them with :func:`get_sde` and :func:`load_scheduler`.
"""

from diffusers import SchedulerMixin

from .bound import GaussianReverseProcess, GaussianStep, nll_bound
from .encoding import decode, encode, slerp
from .flow_likelihood import LikelihoodResult, likelihood
from .guidance import ClassifierGuidance, sample
from .inpainting import Colorization, Inpainting, colorize, inpaint
from .ode import ODEResult, sample_ode
from .registry import (
    API_VERSION,
    InvalidPluginError,
    PluginError,
    PluginInfo,
    PluginWarning,
    UnknownPluginError,
    get_sampler_class,
    get_sde,
    get_sde_class,
    list_plugins,
    load_scheduler,
    refresh_plugins,
    validate_plugin,
)
from .sampling import sample_probability_flow, sample_reverse_sde
from .scheduler import SDEScheduler, SDESchedulerOutput, sde_from_config
from .sde import SDE, ReverseSDE, VPTypeSDE

__version__ = "0.1.0"


def __getattr__(name: str) -> type:
    """``sdekit.X`` for the class ``X`` of any installed sampler plugin (loaded on first use).

    diffusers resolves a saved pipeline's ``model_index.json`` entry ``["sdekit", "X"]`` as
    ``getattr(importlib.import_module("sdekit"), "X")``; this makes that work for built-in and third-party
    schedulers alike without sdekit importing any plugin up front.
    """
    if not name.startswith("_"):
        for info in list_plugins(kind="sampler"):
            if info.status in ("ok", "shadowed") and info.entry_point.rpartition(":")[2] == name:
                return get_sampler_class(info.qualified_name)
    raise AttributeError(f"module 'sdekit' has no attribute {name!r}")


__all__ = [
    "API_VERSION",
    "ClassifierGuidance",
    "Colorization",
    "GaussianReverseProcess",
    "GaussianStep",
    "Inpainting",
    "InvalidPluginError",
    "LikelihoodResult",
    "ODEResult",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "ReverseSDE",
    "SDE",
    "SDEScheduler",
    "SDESchedulerOutput",
    "SchedulerMixin",
    "UnknownPluginError",
    "VPTypeSDE",
    "__version__",
    "colorize",
    "decode",
    "encode",
    "get_sampler_class",
    "get_sde",
    "get_sde_class",
    "inpaint",
    "likelihood",
    "list_plugins",
    "load_scheduler",
    "nll_bound",
    "refresh_plugins",
    "sample",
    "sample_probability_flow",
    "sample_ode",
    "sample_reverse_sde",
    "sde_from_config",
    "slerp",
    "validate_plugin",
]

"""sdekit: score-based diffusion samplers, SDEs and likelihoods for the Hugging Face ecosystem.

SDEs and samplers are plugins (entry-point groups ``sdekit.sdes`` and ``sdekit.samplers``); find them with
:func:`list_plugins`, build them with :func:`get_sde` and :func:`load_scheduler`.
"""

from diffusers import SchedulerMixin

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
from .sde import SDE, ReverseSDE, VPTypeSDE

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
    "InvalidPluginError",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "ReverseSDE",
    "SDE",
    "SchedulerMixin",
    "UnknownPluginError",
    "VPTypeSDE",
    "__version__",
    "get_sampler_class",
    "get_sde",
    "get_sde_class",
    "list_plugins",
    "load_scheduler",
    "refresh_plugins",
    "sample_probability_flow",
    "sample_reverse_sde",
    "validate_plugin",
]

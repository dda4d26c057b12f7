"""The public extension API for sampler authors: the shared configuration declared once and held to it."""

from __future__ import annotations

import inspect

import pytest
from diffusers.configuration_utils import register_to_config

import sdekit
from sdekit.scheduler import COMMON_CONFIG, SHARED_PARAMETERS, SDEScheduler, check_shared_parameters

BUILTINS = ("pc", "pf-ode", "ddim", "analytic-dpm")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_take_the_shared_configuration_as_declared(name: str) -> None:
    cls = sdekit.get_sampler_class(name)
    check_shared_parameters(cls)
    params = list(inspect.signature(cls.__init__).parameters)[1 : len(COMMON_CONFIG) + 1]
    assert params == list(COMMON_CONFIG)
    built = cls()
    overrides = dict(cls.shared_default_overrides)
    assert {k: built.config[k] for k in COMMON_CONFIG} == {
        p.name: overrides.get(p.name, p.default) for p in SHARED_PARAMETERS
    }


def _variant(**changes: object) -> type:
    """A pc subclass whose ``__init__`` signature (or docstring) differs from pc's as ``changes`` say."""
    base = sdekit.get_sampler_class("pc")
    signature = inspect.signature(base.__init__)
    doc = changes.pop("doc", base.__doc__)
    params = []
    for param in signature.parameters.values():
        if param.name in changes:
            default, annotation = changes[param.name]
            param = param.replace(default=default, annotation=annotation)
        params.append(param)

    def __init__(self, *args: object, **kwargs: object) -> None:  # noqa: N807
        base.__init__(self, *args, **kwargs)

    __init__.__signature__ = signature.replace(parameters=params)
    return type("Variant", (base,), {"__init__": __init__, "__doc__": doc})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sigma_max": (80.0, "float")}, "sigma_max defaults to 80.0; the shared configuration's default is 50.0"),
        ({"clip_sample": (0, "bool")}, "clip_sample defaults to 0; the shared configuration's default is False"),
        (
            {"trained_betas": (None, "Sequence[float] | None")},
            "trained_betas is annotated Sequence[float] | None; the shared configuration's annotation is "
            "list[float] | None",
        ),
        ({"doc": "PC, re-describing num_train_timesteps: ..."}, "docstring must name the shared parameters"),
    ],
)
def test_a_sampler_that_drifts_from_the_shared_configuration_is_named(changes: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message.replace("[", r"\[").replace("|", r"\|")):
        check_shared_parameters(_variant(**changes))


def test_a_declared_default_override_is_allowed_and_held_to() -> None:
    analytic = sdekit.get_sampler_class("analytic-dpm")
    assert analytic.shared_default_overrides == {"clip_sample": True} and analytic().config.clip_sample is True
    undeclared = type("Undeclared", (analytic,), {"shared_default_overrides": {}})
    with pytest.raises(TypeError, match="clip_sample defaults to True; the shared configuration's default is False"):
        check_shared_parameters(undeclared)


def test_a_parameter_out_of_order_is_named() -> None:
    class Reordered(SDEScheduler):
        """A sampler that forgot the shared configuration."""

        @register_to_config
        def __init__(self, snr: float = 0.1) -> None:
            self.setup()

        def plan_evaluations(self, times: list[float]) -> list[float]:
            return times

        def update(self, index, model_output, sample, generator, use_clipped_model_output, eta):  # noqa: ANN001, ANN201
            return sample, sample

    with pytest.raises(TypeError, match="parameter 1 must be the shared 'num_train_timesteps', found 'snr'"):
        check_shared_parameters(Reordered)

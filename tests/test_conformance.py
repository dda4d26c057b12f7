"""The conformance kit: every built-in sampler passes ``check_scheduler``, and each kind of broken scheduler fails
it with a message that names its defect.

The kit mirrors diffusers' ``SchedulerCommonTest`` (see the table in ``sdekit/testing/conformance.py``), so these
tests are also how sdekit shows that diffusers' scheduler suite passes for every built-in.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, DDPMScheduler
from test_scheduler_contract import CASES, IDS

import sdekit
from sdekit.testing import ConformanceReport, check_scheduler
from sdekit.testing.conformance import CLAUSES

PC = sdekit.get_sampler_class("pc")
PF_ODE = sdekit.get_sampler_class("pf-ode")
DDIM = sdekit.get_sampler_class("ddim")


@pytest.mark.parametrize("name,config", CASES, ids=IDS)
def test_every_built_in_passes(name: str, config: dict) -> None:
    report = check_scheduler(name, **config)
    assert isinstance(report, ConformanceReport)
    assert set(report.passed) == set(CLAUSES) and not report.skipped and not report.notes


def test_a_class_and_other_configurations_pass_too() -> None:
    check_scheduler(PF_ODE, sde="subvp")
    check_scheduler(DDIM, clip_sample=True, prediction_type="sample", num_train_timesteps=500)
    check_scheduler(PC, sde_params={"beta_min": 0.1, "beta_max": 20.0}, prediction_type="v_prediction")
    report = check_scheduler(PC, sde="ve", snr=0.1)
    assert report.skipped == {"trained_betas": "its SDE (VESDE) is not VP-type, so it has no DDPM table"}


# -- deliberately broken schedulers: each fails with the clause it breaks ---------------------------------------


class ReturnsInput(PF_ODE):
    """step() hands the sample back untouched."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out = super().step(model_output, timestep, sample, *args, **kwargs)
        return (sample, out[1]) if isinstance(out, tuple) else type(out)(prev_sample=sample)


class ForgetsSnr(PC):
    """save_pretrained writes the config without snr."""

    def to_json_string(self) -> str:
        data = json.loads(super().to_json_string())
        data.pop("snr", None)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


class ReadsItem(PC):
    """step() reads a statistic of the batch on the host."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.last_scale = float(sample.abs().max())
        return super().step(model_output, timestep, sample, *args, **kwargs)


class CopiesToHost(PC):
    """step() keeps a host copy of the batch (invisible on CPU tensors: the kit also steps meta tensors)."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.last_sample = sample.detach().cpu()
        return super().step(model_output, timestep, sample, *args, **kwargs)


class Reshapes(PF_ODE):
    """scale_model_input flattens the sample."""

    def scale_model_input(self, sample, timestep=None):  # noqa: ANN001
        return sample.flatten(1)


class PassesEveryKey(PC):
    """sdekit's old from_config: it dropped _use_default_values and passed every key as if the user had set it."""

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):  # noqa: ANN001, ANN003
        config = {key: value for key, value in dict(config).items() if key != "_use_default_values"}
        return ConfigMixin.from_config.__func__(cls, config, return_unused_kwargs=return_unused_kwargs, **kwargs)


class RefusesShortTable(DDIM):
    """Refuses trained_betas whose length is not num_train_timesteps (sdekit's ddim did)."""

    @functools.wraps(DDIM.__init__)
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        betas = kwargs.get("trained_betas")
        if betas is not None and len(betas) != kwargs.get("num_train_timesteps", 1000):
            raise ValueError("trained_betas must have num_train_timesteps entries")
        super().__init__(*args, **kwargs)


class NoBroadcast(PC):
    """add_noise wants one timestep per sample."""

    def add_noise(self, original_samples, noise, timesteps):  # noqa: ANN001
        if torch.as_tensor(timesteps).numel() != original_samples.shape[0]:
            raise ValueError("need one timestep per sample")
        return super().add_noise(original_samples, noise, timesteps)


class StaleOutput(PF_ODE):
    """Every second step() reuses the previous model output instead of the one it is given."""

    def set_timesteps(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().set_timesteps(*args, **kwargs)
        self._previous, self._calls = None, 0

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self._calls += 1
        given = self._previous if self._calls % 2 == 0 else model_output
        self._previous = model_output
        return super().step(given, timestep, sample, *args, **kwargs)


class GlobalNoise(PC):
    """After the first step, step() adds noise from torch's global generator instead of its generator argument."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.step_index:
            sample = sample + 1e-3 * torch.randn_like(sample)
        return super().step(model_output, timestep, sample, *args, **kwargs)


class NegatedOutput(PF_ODE):
    """Integrates with the model output's sign flipped: it runs away from the data."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return super().step(-model_output, timestep, sample, *args, **kwargs)


class VSignFlip(PF_ODE):
    """Reads v_prediction outputs with the wrong sign."""

    def step(self, model_output, timestep, sample, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.config.prediction_type == "v_prediction":
            model_output = -model_output
        return super().step(model_output, timestep, sample, *args, **kwargs)


class RejectsEta(PF_ODE):
    """step() takes eta but fails on the eta=0.0 that DDIMPipeline and LDMPipeline pass."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, eta=None, **kwargs):  # noqa: ANN001, ANN003
        if eta is not None:
            raise ValueError(f"eta={eta} is not supported")
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict, **kwargs)


class Unreachable(PC):
    """Saved under a module that cannot be imported, so a saved pipeline cannot find it again."""


Unreachable.__module__ = "sdekit_conformance_nowhere"

HOST_READ = "aten._local_scalar_dense.default (.item() / float() / int() / bool() of a tensor)"
HOST_COPY = "aten._to_copy.default from meta to the host (.cpu(), .tolist(), .to('cpu'))"
BROKEN = [
    (ReturnsInput, {}, "step", "returned its input sample unchanged"),
    (ForgetsSnr, {"snr": 0.1}, "config round trip", "key 'snr' lost by save_pretrained/from_pretrained (saved 0.1, "
     "loaded 0.3"),
    (ReadsItem, {}, "no host sync", f"through {HOST_READ} at step 2 of 8 (cpu tensors)"),
    (CopiesToHost, {}, "no host sync", f"through {HOST_COPY} at step 1 of 8 (meta tensors)"),
    (Reshapes, {}, "public API", "scale_model_input changed the sample's shape from (4, 1, 2, 2) to (4, 4)"),
    (PassesEveryKey, {}, "compatibles round trip", "the keys left at their defaults changed (_use_default_values): "
     "now set explicitly"),
    (RefusesShortTable, {}, "trained_betas", "trained_betas=[0.1, 0.3] refused (ValueError: trained_betas must have "
     "num_train_timesteps entries)"),
    (NoBroadcast, {}, "add_noise", "one timestep for the whole batch (shape (1,) against batch 4) raised ValueError: "
     "need one timestep per sample"),
    (StaleOutput, {}, "one model call per step", "the model output given at step 2 of 5 does not change the result"),
    (GlobalNoise, {}, "determinism", "two runs with generators seeded alike differ"),
    (NegatedOutput, {}, "oracle", "the Frechet distance to the data does not fall as steps grow: 2 steps"),
    (VSignFlip, {}, "prediction types", "prediction_type='v_prediction' gives other samples than 'epsilon' for the "
     "same exact model"),
    (RejectsEta, {}, "pipelines", "DDIMPipeline: ValueError: eta=0.0 is not supported"),
    (Unreachable, {}, "pipeline save/load", "DiffusionPipeline.from_pretrained could not load the saved scheduler "
     "['sdekit_conformance_nowhere', 'Unreachable']"),
]  # fmt: skip


@pytest.mark.parametrize("cls,config,clause,defect", BROKEN, ids=[case[0].__name__ for case in BROKEN])
def test_each_broken_scheduler_fails_naming_its_defect(cls: type, config: dict, clause: str, defect: str) -> None:
    with pytest.raises(AssertionError) as failure:
        check_scheduler(cls, **config)
    message = str(failure.value)
    assert message.startswith(f'check_scheduler({cls.__name__}): clause "{clause}": '), message
    assert defect in message, message


def test_every_clause_has_a_broken_scheduler() -> None:
    assert {clause for _, _, clause, _ in BROKEN} == set(CLAUSES)


def test_the_kit_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    check_scheduler("ddim")
    assert torch.equal(torch.rand(3), expected)


def test_a_name_that_is_no_sampler_is_refused() -> None:
    with pytest.raises(sdekit.UnknownPluginError, match="ddim"):
        check_scheduler("ddimm")
    with pytest.raises(TypeError, match="scheduler class"):
        check_scheduler(PC())


# -- the core fixes the kit checks, shown directly ------------------------------------------------------------


def test_vp_type_schedulers_carry_diffusers_table_and_others_say_why_not() -> None:
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = sdekit.load_scheduler("pc", reference.config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name
    continuous = sdekit.load_scheduler("pf-ode", sde_params={"beta_min": 0.1, "beta_max": 20.0})
    assert continuous.betas[0] == 0 and len(continuous.alphas_cumprod) == 1000  # level 0 is the clean data
    abar = continuous.sde.alpha_bar(torch.tensor(0.5, dtype=torch.float64))
    assert float(continuous.alphas_cumprod[round(0.5 * 999)]) == pytest.approx(float(abar), rel=1e-2)
    ve = sdekit.load_scheduler("pc", sde="ve")
    with pytest.raises(AttributeError, match=re.escape("PCScheduler has no alphas_cumprod: its SDE (VESDE(")):
        ve.alphas_cumprod  # noqa: B018
    assert not hasattr(ve, "betas")


def test_a_directly_built_scheduler_round_trips_through_a_compatible_in_diffusers_form() -> None:
    scheduler = PC(snr=0.1)
    back = PC.from_config(DDIM.from_config(scheduler.config).config)
    assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
    # A diffusers source keeps its own defaults (DDPMScheduler clips), and they stay marked as defaults.
    from_ddpm = PC.from_config(DDPMScheduler().config)
    assert from_ddpm.config.clip_sample is True
    assert "clip_sample" in from_ddpm.config["_use_default_values"]


def test_add_noise_takes_one_timestep_for_the_batch() -> None:
    scheduler = sdekit.load_scheduler("ddim")
    scheduler.set_timesteps(10)
    x0, noise = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = scheduler.timesteps[5]
    one = scheduler.add_noise(x0, noise, t[None])
    assert torch.equal(one, scheduler.add_noise(x0, noise, t.repeat(4)))
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(one, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    with pytest.raises(ValueError, match=r"one timestep per sample \(4\) or one for the whole batch"):
        scheduler.add_noise(x0, noise, t.repeat(3))


# -- a third-party sampler (last: its plugins stay installed for the rest of the module) ----------------------


def test_third_party_euler_flow_passes_the_mandatory_clauses(plugins_on_path: Path) -> None:
    report = check_scheduler("euler-flow", sigma_max=2.0)
    assert report.scheduler == "EulerFlowScheduler"
    mandatory = set(CLAUSES) - {"trained_betas", "oracle", "prediction types"}
    assert set(report.passed) == mandatory
    assert set(report.skipped) == {"trained_betas", "oracle", "prediction types"}
    assert "no sde attribute" in report.skipped["oracle"]
    assert "DDIMPipeline" in report.notes["pipelines"]
    assert "skipped" in str(report)

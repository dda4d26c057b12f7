"""Classifier guidance (score-SDE section 5, eq. 14, appendix I.1) with every built-in sampler and prediction type,
checked against the exact component posterior of a Gaussian mixture."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, ScoreSdeVeScheduler

import sdekit
from sdekit.parametrization import model_output_to
from sdekit.testing import GaussianMixture, MixtureScoreModel
from sdekit.testing.conditional import MixturePosteriorClassifier, class_mixture

from conftest import oracle_scheduler

NUM = 800  # samples per run: a rate of 0.99 has a standard error of 0.0035
STEPS = 50


def _component(mixture: GaussianMixture, k: int) -> GaussianMixture:
    return GaussianMixture(
        mixture.means[k : k + 1], covs=mixture.component_covariances()[k : k + 1], event_shape=mixture.event_shape
    )


@pytest.mark.parametrize(
    ("config", "prediction_type", "time_input"),
    [
        ({}, "epsilon", None),
        ({}, "v_prediction", None),
        ({}, "sample", None),
        ({"sde": "subvp", "sde_params": {}}, "v_prediction", "continuous"),
        (dict(ScoreSdeVeScheduler(sigma_max=20.0).config), "score", "sigma"),
    ],
    ids=["vp-epsilon", "vp-v", "vp-sample", "subvp-v", "ve-score"],
)
def test_the_guided_output_carries_the_exact_conditional_score(
    config: dict, prediction_type: str, time_input: str | None
) -> None:
    """With the exact classifier at scale 1, score + grad log p(y | x_t) is the score of component y itself."""
    mixture = class_mixture()
    base = config or dict(DDPMScheduler().config)
    scheduler = sdekit.load_scheduler("pf-ode", base, prediction_type=prediction_type, time_input=time_input)
    model = MixtureScoreModel(mixture, scheduler.sde, prediction_type=prediction_type, time_input=time_input)
    classifier = MixturePosteriorClassifier(mixture, scheduler.sde, time_input=time_input)
    labels = torch.tensor([0, 1, 2, 3, 3, 2])
    guidance = sdekit.ClassifierGuidance(scheduler, classifier, labels)
    scheduler.set_timesteps(5)
    for t, timestep in zip(scheduler.eval_times, scheduler.timesteps):
        alpha, sigma = scheduler.kernel_coeffs(t)
        x = alpha * mixture.sample(6, torch.Generator().manual_seed(0), dtype=torch.float64)
        x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        guided = guidance(model(x, timestep).sample, timestep, x)
        assert guided.dtype == x.dtype
        score = model_output_to(scheduler.sde, guided, x, t, prediction_type, "score")
        expected = torch.stack(
            [_component(mixture, int(k)).score(x[i : i + 1], alpha, sigma)[0] for i, k in enumerate(labels)]
        )
        torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-6 / sigma)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("pc", {}),
        ("pf-ode", {}),
        ("ddim", {"eta": 0.0}),
        ("ddim", {"eta": 1.0}),
        ("analytic-dpm", {"eta": 0.0}),
        ("analytic-dpm", {"eta": 1.0}),
    ],
    ids=["pc", "pf-ode", "ddim-eta0", "ddim-eta1", "analytic-dpm-eta0", "analytic-dpm-eta1"],
)
def test_guided_samples_land_in_the_requested_component(name: str, options: dict) -> None:
    mixture = class_mixture()
    scheduler = oracle_scheduler(name, mixture, STEPS, **options)
    model = MixtureScoreModel(mixture, scheduler.sde)
    classifier = MixturePosteriorClassifier(mixture, scheduler.sde)
    labels = torch.arange(NUM) % 4  # as many of the rare class 3 (weight 0.1) as of the others
    rates = {}
    for scale in (0.0, 1.0):
        out = sdekit.sample(
            model,
            scheduler,
            NUM,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(2),
            classifier=classifier,
            class_labels=labels,
            guidance_scale=scale,
            show_progress=False,
        )
        with torch.no_grad():
            landed = classifier(out, torch.tensor(0)).argmax(dim=1)  # the exact posterior on the clean data
        rates[scale] = float((landed == labels).float().mean())
    assert rates[1.0] >= 0.95, rates
    assert rates[0.0] < 0.4, rates  # unguided, the samples follow the mixture weights


def test_sample_draws_each_sample_from_its_own_generator() -> None:
    """With one generator per sample, a sample does not depend on the batch it is drawn in."""
    mixture = class_mixture()
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config, eta=1.0)
    model = MixtureScoreModel(mixture, scheduler.sde)
    classifier = MixturePosteriorClassifier(mixture, scheduler.sde)
    both = sdekit.sample(
        model,
        scheduler,
        2,
        num_inference_steps=5,
        classifier=classifier,
        class_labels=[1, 2],
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        show_progress=False,
    )
    alone = sdekit.sample(
        model,
        scheduler,
        1,
        num_inference_steps=5,
        classifier=classifier,
        class_labels=2,
        generator=[torch.Generator().manual_seed(8)],
        show_progress=False,
    )
    torch.testing.assert_close(both[1:], alone, rtol=1e-6, atol=1e-6)
    assert both.shape == (2, 1, 4, 4) and model.num_calls == 10 and classifier.num_calls == 10


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture
def parts() -> tuple[MixtureScoreModel, object, MixturePosteriorClassifier]:
    mixture = class_mixture()
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config)
    return MixtureScoreModel(mixture, scheduler.sde), scheduler, MixturePosteriorClassifier(mixture, scheduler.sde)


def test_logits_of_the_wrong_batch_size_are_refused(parts) -> None:  # noqa: ANN001
    model, scheduler, classifier = parts

    def first_half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return classifier(x[: x.shape[0] // 2], t)

    with pytest.raises(ValueError, match=r"logits of shape \(2, 4\) for a batch of 4 samples.*\(4, classes\)"):
        sdekit.sample(
            model, scheduler, 4, num_inference_steps=2, classifier=first_half, class_labels=0, show_progress=False
        )
    with pytest.raises(ValueError, match=r"logits of shape \(4,\) for a batch of 4"):
        sdekit.sample(
            model,
            scheduler,
            4,
            num_inference_steps=2,
            classifier=lambda x, t: classifier(x, t)[:, 0],
            class_labels=0,
            show_progress=False,
        )


def test_labels_and_options_are_checked(parts) -> None:  # noqa: ANN001
    model, scheduler, classifier = parts
    run = {"num_inference_steps": 2, "show_progress": False}
    with pytest.raises(ValueError, match="class_labels holds 4, but the classifier has 4 classes"):
        sdekit.sample(model, scheduler, 2, classifier=classifier, class_labels=[0, 4], **run)
    with pytest.raises(ValueError, match="class_labels has 3 labels for a batch of 2 samples"):
        sdekit.sample(model, scheduler, 2, classifier=classifier, class_labels=[0, 1, 2], **run)
    with pytest.raises(ValueError, match="integer class indices"):
        sdekit.sample(model, scheduler, 2, classifier=classifier, class_labels=[0.5, 1.0], **run)
    with pytest.raises(ValueError, match="class_labels is missing"):
        sdekit.sample(model, scheduler, 2, classifier=classifier, **run)
    with pytest.raises(ValueError, match="classifier is missing"):
        sdekit.sample(model, scheduler, 2, class_labels=1, **run)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0, got -1"):
        sdekit.sample(model, scheduler, 2, classifier=classifier, class_labels=1, guidance_scale=-1, **run)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        sdekit.sample(model, scheduler, 0, **run)
    with pytest.raises(ValueError, match="needs an sdekit scheduler"):
        sdekit.sample(model, DDPMScheduler(), 2, **run)
    flat = MixtureScoreModel(GaussianMixture(torch.zeros(1, 2), stds=torch.ones(1)), scheduler.sde)
    with pytest.raises(ValueError, match=r"pass sample_shape=\(C, H, W\)"):
        sdekit.sample(flat, scheduler, 2, **run)
    assert sdekit.sample(flat, scheduler, 2, sample_shape=(2,), **run).shape == (2, 2)

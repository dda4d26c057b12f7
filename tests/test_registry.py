"""The plugin registry against real installed distributions.

``tests/plugin_dist`` (sdekit-testplugins) and ``tests/plugin_dist2`` (sdekit-extra-plugins) are pip-installed
into a temporary directory once per session; ``plugins_on_path`` puts that directory on ``sys.path`` for one
test module and takes it off again afterwards. ``tests/plugin_dist3`` (sdekit-sampler-faults: a working sampler
beside one per way a sampler is skipped) is installed the same way by this module, and put on ``sys.path`` only by
the tests that ask for it (``faults_on_path``).

Other plugin distributions may be installed in the environment (``sdekit-dpm-solver``): the checks of what is
listed look at sdekit's own and the test distributions only.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from sdekit.registry import (
    API_VERSION,
    DISABLE_ENV,
    InvalidPluginError,
    PluginInfo,
    PluginWarning,
    UnknownPluginError,
    disabled_plugins,
    get_sampler_class,
    get_sde,
    get_sde_class,
    list_plugins,
    load_scheduler,
    refresh_plugins,
    validate_plugin,
)
from sdekit.sde import SDE
from sdekit_ddim import DDIMSDEScheduler

TEST_DIST = "sdekit-testplugins"
EXTRA_DIST = "sdekit-extra-plugins"
FAULTS_DIST = "sdekit-sampler-faults"
KNOWN = ("sdekit", TEST_DIST, EXTRA_DIST, FAULTS_DIST)
"""The distributions these tests know; others installed in the environment are left out of exact checks."""

pytestmark = [
    pytest.mark.usefixtures("plugins_on_path"),
    pytest.mark.filterwarnings("ignore::sdekit.registry.PluginWarning"),
]


def _by_key(infos: list[PluginInfo]) -> dict[tuple[str, str, str], PluginInfo]:
    return {(info.kind, info.name, info.distribution): info for info in infos if info.distribution in KNOWN}


def test_discovery_lists_builtins_and_test_plugins() -> None:
    infos = _by_key(list_plugins(refresh=True))
    sdekit_version = importlib.metadata.version("sdekit")
    for name in ("ve", "vp", "subvp"):
        info = infos["sde", name, "sdekit"]
        assert (info.version, info.status, info.reason) == (sdekit_version, "ok", None)
    constant = infos["sde", "constant-ve", TEST_DIST]
    assert constant == PluginInfo(
        name="constant-ve",
        kind="sde",
        distribution=TEST_DIST,
        version="0.3.1",
        status="ok",
        reason=None,
        entry_point="sdekit_testplugins.sdes:ConstantVESDE",
        api_version=API_VERSION,
    )
    assert constant.qualified_name == "sdekit-testplugins:constant-ve"
    euler = infos["sampler", "euler-flow", TEST_DIST]
    assert (euler.status, euler.version) == ("ok", "0.3.1")
    assert infos["sde", "twin", EXTRA_DIST].version == "1.2.0"
    statuses = {(kind, name, dist): info.status for (kind, name, dist), info in infos.items() if dist != "sdekit"}
    assert statuses == {
        ("sde", "constant-ve", TEST_DIST): "ok",
        ("sde", "broken-import", TEST_DIST): "import-error",
        ("sde", "not-an-sde", TEST_DIST): "protocol-error",
        ("sde", "Bad_Name", TEST_DIST): "bad-name",
        ("sde", "future-sde", TEST_DIST): "incompatible",
        ("sde", "vp", TEST_DIST): "shadowed",
        ("sde", "twin", TEST_DIST): "shadowed",
        ("sde", "twin", EXTRA_DIST): "ok",
        ("sde", "noise-levels", EXTRA_DIST): "ok",
        ("sde", "undeclared", TEST_DIST): "protocol-error",
        ("sampler", "euler-flow", TEST_DIST): "ok",
        ("sampler", "not-a-scheduler", TEST_DIST): "protocol-error",
    }


def test_list_is_sorted_and_filtered_by_kind() -> None:
    infos = list_plugins()
    kinds = [info.kind for info in infos]
    assert kinds == sorted(kinds, key=["sde", "sampler"].index)
    sde_names = [info.name for info in infos if info.kind == "sde"]
    assert sde_names == sorted(sde_names)
    assert {info.kind for info in list_plugins(kind="sampler")} == {"sampler"}
    with pytest.raises(ValueError, match="kind must be one of"):
        list_plugins(kind="sdes")


def test_discovery_is_lazy() -> None:
    refresh_plugins()
    for module in [m for m in sys.modules if m.split(".")[0] in ("sdekit_testplugins", "sdekit_extra_plugins")]:
        del sys.modules[module]
    sde = get_sde("constant-ve")
    assert type(sde).__module__ == "sdekit_testplugins.sdes"
    assert "sdekit_testplugins.samplers" not in sys.modules
    assert "sdekit_testplugins.broken" not in sys.modules
    assert "sdekit_extra_plugins" not in sys.modules


def test_results_are_cached_until_refresh() -> None:
    list_plugins(refresh=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list_plugins()
    assert not [w for w in caught if issubclass(w.category, PluginWarning)]
    with pytest.warns(PluginWarning, match="broken-import"):
        list_plugins(refresh=True)


def test_broken_plugin_is_reported_and_isolated() -> None:
    refresh_plugins()
    with pytest.warns(PluginWarning) as caught:
        infos = _by_key(list_plugins(kind="sde"))
    messages = [str(w.message) for w in caught]
    assert any(
        "'broken-import'" in m and f"'{TEST_DIST}'" in m and "sdekit_testplugins_missing_dependency" in m
        for m in messages
    ), messages
    broken = infos["sde", "broken-import", TEST_DIST]
    assert broken.status == "import-error"
    assert "ModuleNotFoundError" in broken.reason and "sdekit_testplugins_missing_dependency" in broken.reason
    with pytest.raises(InvalidPluginError, match="broken-import.*ModuleNotFoundError") as excinfo:
        get_sde("broken-import")
    assert excinfo.value.status == "import-error"

    # Everything else still works, the test SDE included.
    sde = get_sde("constant-ve", sigma=2.0)
    assert isinstance(sde, SDE)
    x0 = torch.zeros(3, 2)
    mean, std = sde.marginal_prob(x0, 0.25)
    torch.testing.assert_close(std, torch.tensor(1.0))
    torch.testing.assert_close(mean, x0)
    z = sde.prior_sampling((4, 2), generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 2)
    assert sde.prior_logp(z).shape == (4,)
    assert type(get_sde("ve")).__name__ == "VESDE"
    assert get_sampler_class("euler-flow").__name__ == "EulerFlowScheduler"


def test_protocol_violations_are_reported() -> None:
    infos = _by_key(list_plugins(refresh=True))
    not_sde = infos["sde", "not-an-sde", TEST_DIST]
    assert not_sde.status == "protocol-error"
    assert "marginal_prob" in not_sde.reason and "prior_sampling" in not_sde.reason
    # The math without the conventions an SDE declares: reported with the missing names, and skipped.
    undeclared = infos["sde", "undeclared", TEST_DIST]
    assert undeclared.status == "protocol-error"
    assert undeclared.reason.endswith(
        "lacks the sde protocol method(s) config_params, scheduler_params, default_time_input, prior_std, "
        "is_discrete, sigma, t_from_sigma"
    )
    with pytest.raises(InvalidPluginError, match="undeclared"):
        get_sde("undeclared")
    not_scheduler = infos["sampler", "not-a-scheduler", TEST_DIST]
    assert not_scheduler.status == "protocol-error"
    assert "SchedulerMixin and ConfigMixin" in not_scheduler.reason
    with pytest.raises(InvalidPluginError, match="not-a-scheduler"):
        load_scheduler("not-a-scheduler")


def test_validate_plugin() -> None:
    validate_plugin(type(get_sde("vp")), "sde")
    validate_plugin(get_sampler_class("euler-flow"), "sampler")
    with pytest.raises(InvalidPluginError, match="expected a class"):
        validate_plugin(get_sde("vp"), "sde")
    with pytest.raises(InvalidPluginError, match="abstract: it does not implement marginal_coeffs"):
        validate_plugin(SDE, "sde")
    with pytest.raises(InvalidPluginError, match="not a diffusers scheduler"):
        validate_plugin(type(get_sde("vp")), "sampler")

    class DeclaresText:
        sdekit_api_version = "1"

    with pytest.raises(InvalidPluginError, match="must be an int") as excinfo:
        validate_plugin(DeclaresText, "sde")
    assert excinfo.value.status == "protocol-error"
    with pytest.raises(ValueError, match="kind must be one of"):
        validate_plugin(DeclaresText, "scheduler")


def test_invalid_name_is_reported_and_skipped() -> None:
    refresh_plugins()
    with pytest.warns(PluginWarning, match=f"'Bad_Name' from distribution '{TEST_DIST}'.*invalid plugin name"):
        infos = _by_key(list_plugins())
    bad = infos["sde", "Bad_Name", TEST_DIST]
    assert (bad.status, bad.api_version) == ("bad-name", None)
    with pytest.raises(InvalidPluginError, match="invalid plugin name") as excinfo:
        get_sde("Bad_Name")
    assert excinfo.value.status == "bad-name"


def test_api_version_mismatch_is_reported_and_skipped() -> None:
    refresh_plugins()
    expected = (
        f"'future-sde' from distribution '{TEST_DIST}' 0.3.1: FutureSDE declares sdekit_api_version = 3, "
        f"but this sdekit supports API version {API_VERSION}"
    )
    with pytest.warns(PluginWarning, match=expected):
        info = _by_key(list_plugins())["sde", "future-sde", TEST_DIST]
    assert (info.status, info.api_version) == ("incompatible", 3)
    with pytest.raises(InvalidPluginError, match="sdekit_api_version = 3") as excinfo:
        get_sde("future-sde")
    assert excinfo.value.status == "incompatible"


def test_duplicate_names_warn_and_follow_the_rule() -> None:
    refresh_plugins()
    with pytest.warns(PluginWarning) as caught:
        vp = get_sde("vp")
    messages = [str(w.message) for w in caught]
    assert any(
        f"'vp' is registered by several distributions: 'sdekit', '{TEST_DIST}'. Using the one from 'sdekit'" in m
        and f"'{TEST_DIST}:vp'" in m
        for m in messages
    ), messages
    assert any(
        f"'twin' is registered by several distributions: '{EXTRA_DIST}', '{TEST_DIST}'. "
        f"Using the one from '{EXTRA_DIST}'" in m
        for m in messages
    ), messages
    # sdekit's built-in wins over any other distribution ...
    assert type(vp).__module__.startswith("sdekit_sdes")
    # ... and otherwise the alphabetically first distribution.
    assert type(get_sde("twin", sigma=1.0)).__name__ == "TwinSDE"
    # The qualified form selects a specific one; distribution names are compared normalized.
    assert type(get_sde(f"{TEST_DIST}:vp")).__name__ == "ShadowVPSDE"
    assert type(get_sde("sdekit_testplugins:twin")).__name__ == "ConstantVESDE"
    assert get_sde_class("sdekit:vp") is type(vp)
    infos = _by_key(list_plugins())
    shadowed = infos["sde", "vp", TEST_DIST]
    assert shadowed.status == "shadowed"
    assert "'sdekit'" in shadowed.reason and f"'{TEST_DIST}:vp'" in shadowed.reason


def test_same_distribution_seen_twice_is_not_a_duplicate(tmp_path: Path, plugin_site: Path) -> None:
    # A second copy of sdekit-extra-plugins' metadata further down sys.path.
    (dist_info,) = plugin_site.glob("sdekit_extra_plugins-*.dist-info")
    shutil.copytree(dist_info, tmp_path / dist_info.name)
    sys.path.append(str(tmp_path))
    try:
        refresh_plugins()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            infos = list_plugins(kind="sde")
    finally:
        sys.path.remove(str(tmp_path))
        refresh_plugins()
    twins = [(info.distribution, info.status) for info in infos if info.name == "twin"]
    assert twins == [(EXTRA_DIST, "ok"), (TEST_DIST, "shadowed")]
    (twin_warning,) = [str(w.message) for w in caught if "'twin' is registered" in str(w.message)]
    assert f"several distributions: '{EXTRA_DIST}', '{TEST_DIST}'." in twin_warning


def test_refresh_sees_sys_path_changes(plugin_site: Path) -> None:
    assert type(get_sde("constant-ve")).__name__ == "ConstantVESDE"
    sys.path.remove(str(plugin_site))
    try:
        refresh_plugins()
        with pytest.raises(UnknownPluginError):
            get_sde("constant-ve")
        assert {info.distribution for info in list_plugins()} & set(KNOWN) == {"sdekit"}
    finally:
        sys.path.insert(0, str(plugin_site))
        refresh_plugins()
    assert type(get_sde("constant-ve")).__name__ == "ConstantVESDE"


def test_unknown_name_lists_available_and_closest() -> None:
    list_plugins(refresh=True)
    with pytest.raises(UnknownPluginError) as excinfo:
        get_sde("constant-vee")
    err = excinfo.value
    assert isinstance(err, LookupError) and isinstance(err, ValueError)
    assert err.closest == "constant-ve"
    sdes = sorted(i.name for i in list_plugins(kind="sde") if i.status == "ok")
    assert {"constant-ve", "noise-levels", "subvp", "twin", "ve", "vp"} <= set(sdes)
    assert err.available == sdes
    message = str(err)
    assert "Unknown SDE plugin 'constant-vee'. Did you mean 'constant-ve'?" in message
    assert f"Available SDE plugins: {', '.join(sdes)}." in message

    with pytest.raises(UnknownPluginError, match="Did you mean 'euler-flow'") as excinfo:
        load_scheduler("euler-flo")
    samplers = sorted(i.name for i in list_plugins(kind="sampler") if i.status == "ok")
    assert {"analytic-dpm", "ddim", "euler-flow", "pc", "pf-ode"} <= set(samplers)
    assert excinfo.value.available == samplers
    with pytest.raises(UnknownPluginError, match=f"Did you mean '{TEST_DIST}:constant-ve'"):
        get_sde(f"{TEST_DIST}:constant-vee")
    with pytest.raises(UnknownPluginError) as excinfo:
        get_sde("zzzzzz")
    assert excinfo.value.closest is None and "Did you mean" not in str(excinfo.value)


def test_get_sde_parameter_errors() -> None:
    with pytest.raises(ValueError) as excinfo:
        get_sde("constant-ve", sigmaa=2.0)
    assert str(excinfo.value) == (
        "get_sde('constant-ve') got an unknown parameter 'sigmaa'. Did you mean 'sigma'? "
        "Accepted parameters: sigma, N, sampling_eps."
    )
    # The constructor's own ValueError propagates unchanged.
    with pytest.raises(ValueError, match=r"^sigma must be a finite number > 0, got -1.0.$"):
        get_sde("constant-ve", sigma=-1.0)
    assert get_sde("constant-ve", sigma=3.0, N=10).N == 10
    with pytest.raises(ValueError) as excinfo:
        get_sde("twin")
    assert str(excinfo.value) == (
        "get_sde('twin'): missing a required argument: 'sigma'. Accepted parameters: sigma, N, sampling_eps."
    )


def test_unreadable_metadata_is_skipped(tmp_path: Path) -> None:
    dist_info = tmp_path / "sdekit_garbled-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdekit-garbled\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[sdekit.sdes]\nthis line has no equals sign\n")
    sys.path.insert(0, str(tmp_path))
    try:
        refresh_plugins()
        with pytest.warns(PluginWarning, match="plugins of distribution 'sdekit-garbled': its entry points cannot"):
            assert type(get_sde("constant-ve")).__name__ == "ConstantVESDE"
    finally:
        sys.path.remove(str(tmp_path))
        refresh_plugins()


def test_load_scheduler_without_config() -> None:
    scheduler = load_scheduler("euler-flow", sigma_max=5.0)
    assert type(scheduler).__name__ == "EulerFlowScheduler"
    assert scheduler.config.sigma_max == 5.0 and scheduler.config.sigma_min == 0.01
    with pytest.raises(ValueError) as excinfo:
        load_scheduler("euler-flow", sigma_maxx=5.0)
    assert str(excinfo.value) == (
        "load_scheduler('euler-flow') got an unknown parameter 'sigma_maxx'. Did you mean 'sigma_max'? "
        "Accepted parameters: num_train_timesteps, sigma_min, sigma_max."
    )


def test_load_scheduler_with_config_and_overrides() -> None:
    config = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 50,
        "beta_start": 0.0001,
        "sigma_min": 0.1,
        "sigma_max": 2.0,
    }
    scheduler = load_scheduler("euler-flow", config, sigma_max=3.0)
    assert (scheduler.config.num_train_timesteps, scheduler.config.sigma_min) == (50, 0.1)
    assert scheduler.config.sigma_max == 3.0
    # A FrozenDict and an object with .config work the same way.
    assert load_scheduler("euler-flow", scheduler.config).config.sigma_max == 3.0
    assert load_scheduler("euler-flow", scheduler, sigma_min=0.5).config.sigma_min == 0.5
    # An override the class does not take is an error, even though config keys it does not take are not.
    with pytest.raises(ValueError, match="unknown parameter 'beta_start'.*Accepted parameters: num_train_timesteps"):
        load_scheduler("euler-flow", config, beta_start=0.001)
    with pytest.raises(TypeError, match="config must be None, a mapping"):
        load_scheduler("euler-flow", 42)


def test_loaded_scheduler_samples() -> None:
    # Data ~ N(0, s^2): the exact epsilon of x = x0 + sigma eps is sigma x / (s^2 + sigma^2); the
    # probability-flow ODE then carries N(0, s^2 + sigma_max^2) to N(0, s^2).
    s = 0.5
    scheduler = load_scheduler("euler-flow", {"sigma_min": 0.002, "sigma_max": 4.0})
    scheduler.set_timesteps(200)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1, generator=generator, dtype=torch.float64) * (s**2 + 4.0**2) ** 0.5
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(t * model_input / (s**2 + t**2), t, x).prev_sample
    assert abs(x.std().item() - s) < 0.03


def test_switching_samplers_keeps_the_other_samplers_settings_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """As between diffusers' own schedulers: ``pc``'s settings mean nothing to ``ddim``, are not warned about, and
    come back when the config returns to ``pc``."""
    pc = load_scheduler("pc", DDPMScheduler().config, corrector="none", snr=0.2)
    assert {DDIMSDEScheduler, DDPMScheduler, type(pc)} <= set(pc.compatibles)
    caplog.clear()
    ddim = load_scheduler("ddim", pc.config, eta=0.5)
    back = load_scheduler("pc", ddim.config)
    assert "were passed to" not in caplog.text
    assert ddim.config.eta == 0.5 and (back.config.corrector, back.config.snr) == ("none", 0.2)
    # A key that no compatible scheduler takes still gets diffusers' warning.
    load_scheduler("ddim", {**pc.config, "no_such_setting": 1})
    assert "{'no_such_setting': 1} were passed to DDIMSDEScheduler" in caplog.text


# -- sampler plugins that fail, beside one that works (tests/plugin_dist3) -------------------------------------


@pytest.fixture(scope="module")
def fault_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdekit-sampler-faults pip-installed (from a copy: no build files in the source tree) into its own folder."""
    root = tmp_path_factory.mktemp("sdekit-fault-site")
    source = shutil.copytree(Path(__file__).parent / "plugin_dist3", root / "src")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    subprocess.run([*pip, "--disable-pip-version-check", "--target", str(root / "site"), str(source)], check=True)
    return root / "site"


@pytest.fixture
def faults_on_path(fault_site: Path) -> Iterator[Path]:
    """sdekit-sampler-faults visible for one test, next to the other test distributions."""
    sys.path.insert(0, str(fault_site))
    refresh_plugins()
    yield fault_site
    sys.path.remove(str(fault_site))
    for module in [m for m in sys.modules if m.split(".")[0] == "sdekit_sampler_faults"]:
        del sys.modules[module]
    refresh_plugins()


@pytest.mark.usefixtures("faults_on_path")
def test_failing_samplers_are_each_reported_and_skipped_while_the_rest_works() -> None:
    with pytest.warns(PluginWarning) as caught:
        infos = _by_key(list_plugins(kind="sampler"))
    messages = [str(w.message) for w in caught]
    expected = {
        "raises-at-import": ("import-error", "import failed: RuntimeError: sdekit-sampler-faults: this module fails"),
        "no-step": ("protocol-error", "NoStepScheduler lacks the sampler protocol method(s) step"),
        "old-api": ("incompatible", f"OldAPIScheduler declares sdekit_api_version = 1, but this sdekit supports API "
                                    f"version {API_VERSION}"),
    }  # fmt: skip
    for name, (status, reason) in expected.items():
        info = infos["sampler", name, FAULTS_DIST]
        assert (info.status, info.version) == (status, "2.0.1") and info.reason.startswith(reason), info
        # Warned once each, naming the plugin, its distribution and the reason.
        assert sum(f"'{name}' from distribution '{FAULTS_DIST}' 2.0.1: {reason}" in m for m in messages) == 1
        with pytest.raises(InvalidPluginError, match=f"'{name}' from distribution '{FAULTS_DIST}'") as excinfo:
            load_scheduler(name, DDPMScheduler().config)
        assert excinfo.value.status == status
    assert infos["sampler", "old-api", FAULTS_DIST].api_version == 1
    # The working sampler of the same distribution, the other test plugins and the built-ins all work.
    assert infos["sampler", "flow-steps", FAULTS_DIST].status == "ok"
    assert infos["sampler", "euler-flow", TEST_DIST].status == "ok"
    assert {infos["sampler", name, "sdekit"].status for name in ("pc", "pf-ode", "ddim", "analytic-dpm")} == {"ok"}
    flow = load_scheduler("flow-steps", DDPMScheduler().config)
    ddim = load_scheduler("ddim", DDPMScheduler().config)
    names = {cls.__name__ for cls in flow.compatibles}
    assert "FlowStepScheduler" in names and "DDIMSDEScheduler" in names
    assert not names & {"NoStepScheduler", "OldAPIScheduler"}
    # It samples: with the same levels it is DDIM with eta = 0.
    levels = [999, 700, 400, 100, 0]
    results = []
    for scheduler in (flow, ddim):
        scheduler.set_timesteps(timesteps=levels)
        x = torch.linspace(-2, 2, 8, dtype=torch.float64).reshape(2, 1, 2, 2)
        for t in scheduler.timesteps:
            x = scheduler.step(0.3 * x, t, x).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1])


# -- SDEKIT_DISABLE_PLUGINS ------------------------------------------------------------------------------------


@pytest.fixture
def disable(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Set ``SDEKIT_DISABLE_PLUGINS`` (and rediscover) for one test; the registry is rediscovered afterwards."""

    def setting(value: str) -> None:
        monkeypatch.setenv(DISABLE_ENV, value)
        refresh_plugins()

    yield setting
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    refresh_plugins()


def test_disable_all_third_party_plugins(disable) -> None:
    for module in [m for m in sys.modules if m.split(".")[0] in ("sdekit_testplugins", "sdekit_extra_plugins")]:
        del sys.modules[module]
    disable("1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = _by_key(list_plugins())
    # Nothing third-party is imported or warned about (not even the broken plugin, nor the name clashes).
    assert not [w for w in caught if issubclass(w.category, PluginWarning)], [str(w.message) for w in caught]
    assert not [m for m in sys.modules if m.split(".")[0] in ("sdekit_testplugins", "sdekit_extra_plugins")]
    third_party = {key: info for key, info in infos.items() if key[2] != "sdekit"}
    assert third_party and {info.status for info in third_party.values()} == {"disabled"}
    reason = infos["sde", "constant-ve", TEST_DIST].reason
    assert reason == f"turned off by {DISABLE_ENV}=1 (every third-party plugin); unset it to use the plugin"
    assert {info.status for key, info in infos.items() if key[2] == "sdekit"} == {"ok"}
    with pytest.raises(InvalidPluginError, match=f"'constant-ve' from distribution '{TEST_DIST}' 0.3.1 is turned off"):
        get_sde("constant-ve")
    with pytest.raises(InvalidPluginError) as excinfo:
        get_sde(f"{TEST_DIST}:vp")
    assert excinfo.value.status == "disabled"
    # The built-ins work, and "vp" is sdekit's without a clash to report.
    assert type(get_sde("vp")).__module__.startswith("sdekit_sdes")
    assert type(load_scheduler("pc", DDPMScheduler().config)).__name__ == "PCScheduler"
    with pytest.raises(UnknownPluginError) as unknown:
        get_sde("constant-vee")
    assert "constant-ve" not in unknown.value.available


def test_disable_named_plugins_and_distributions(disable) -> None:
    # A plugin name, a distribution (any spelling) and a qualified name, comma- or space-separated.
    disable(f"broken-import, Sdekit_Extra_Plugins  {TEST_DIST}:euler-flow")
    assert disabled_plugins() >= {"broken-import", "sdekit-extra-plugins", f"{TEST_DIST}:euler-flow"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = _by_key(list_plugins())
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert not any("broken-import" in m for m in messages)
    assert not any("'twin' is registered by several" in m for m in messages)  # the other twin is off
    statuses = {key: info.status for key, info in infos.items() if key[2] != "sdekit"}
    assert statuses[("sde", "broken-import", TEST_DIST)] == "disabled"
    assert statuses[("sde", "twin", EXTRA_DIST)] == statuses[("sde", "noise-levels", EXTRA_DIST)] == "disabled"
    assert statuses[("sampler", "euler-flow", TEST_DIST)] == "disabled"
    assert "it names 'sdekit-extra-plugins'" in infos["sde", "twin", EXTRA_DIST].reason
    # The rest is as without the switch; the twin of sdekit-testplugins now serves "twin".
    assert statuses[("sde", "twin", TEST_DIST)] == "ok"
    assert type(get_sde("twin")).__name__ == "ConstantVESDE"
    assert statuses[("sde", "constant-ve", TEST_DIST)] == "ok"
    assert statuses[("sde", "future-sde", TEST_DIST)] == "incompatible"
    assert statuses[("sde", "vp", TEST_DIST)] == "shadowed"
    with pytest.raises(InvalidPluginError, match=f"it names '{TEST_DIST}:euler-flow'"):
        load_scheduler("euler-flow")


def test_builtins_are_never_disabled(disable) -> None:
    disable("vp, sdekit, pc")
    infos = _by_key(list_plugins())
    assert infos["sde", "vp", "sdekit"].status == infos["sampler", "pc", "sdekit"].status == "ok"
    assert infos["sde", "vp", TEST_DIST].status == "disabled"  # the third-party one of that name is
    assert type(get_sde("vp")).__module__.startswith("sdekit_sdes")


@pytest.mark.parametrize("value", ["", "0", "false", "No", " off "])
def test_disable_values_that_turn_nothing_off(disable, value: str) -> None:
    disable(value)
    assert disabled_plugins() is None
    assert "disabled" not in {info.status for info in list_plugins()}


def test_disable_is_read_at_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    refresh_plugins()
    list_plugins()
    monkeypatch.setenv(DISABLE_ENV, "constant-ve")
    try:
        assert type(get_sde("constant-ve")).__name__ == "ConstantVESDE"  # cached until refresh_plugins()
        refresh_plugins()
        with pytest.raises(InvalidPluginError, match="turned off"):
            get_sde("constant-ve")
    finally:
        monkeypatch.delenv(DISABLE_ENV)
        refresh_plugins()

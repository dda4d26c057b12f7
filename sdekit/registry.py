"""Plugin discovery: SDEs and samplers registered through Python entry points.

A distribution registers plugins in two entry-point groups:

* ``sdekit.sdes``: SDE classes, used through :func:`get_sde`;
* ``sdekit.samplers``: diffusers scheduler classes, used through :func:`load_scheduler`.

Discovery reads installed distributions' metadata only; a plugin's module is imported the first time the
plugin is requested (:func:`get_sde`, :func:`get_sampler_class`, :func:`load_scheduler`) or when
:func:`list_plugins` validates it. Both the metadata scan and every load result are cached until
:func:`refresh_plugins` is called.

A plugin that fails to import, does not satisfy its protocol, targets another sdekit API version or has an
invalid name is skipped with a :class:`PluginWarning` naming the plugin, its distribution and the reason; every
other plugin keeps working. ``sdekit plugins`` (or :func:`list_plugins`) shows the status of each one.

The environment variable :data:`DISABLE_ENV` (``SDEKIT_DISABLE_PLUGINS``) turns third-party plugins off for
debugging, all of them or those it names, without importing them (:func:`disabled_plugins`).

When several distributions register the same name, one of them wins (see :func:`list_plugins`); the others
stay reachable through the qualified form ``"distribution:name"``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .sde import SDE

__all__ = [
    "API_VERSION",
    "DISABLE_ENV",
    "ENTRY_POINT_GROUPS",
    "PLUGIN_NAME_PATTERN",
    "InvalidPluginError",
    "PluginError",
    "PluginInfo",
    "PluginKind",
    "PluginStatus",
    "PluginWarning",
    "UnknownPluginError",
    "check_sde_instance",
    "disabled_plugins",
    "get_sampler_class",
    "get_sde",
    "get_sde_class",
    "list_plugins",
    "load_scheduler",
    "refresh_plugins",
    "registered_name",
    "validate_plugin",
]

API_VERSION: int = 2
"""The plugin API version this sdekit implements; a plugin may declare the one it targets as
``sdekit_api_version`` on its class. Version 2 added what an SDE declares about itself (:data:`SDE_DECLARATIONS`)
and made :class:`sdekit.SDEScheduler`'s extension API public (``setup``, ``plan_evaluations``, ``update``, ...)."""

PluginKind = Literal["sde", "sampler"]
PluginStatus = Literal["ok", "shadowed", "disabled", "bad-name", "import-error", "protocol-error", "incompatible"]

ENTRY_POINT_GROUPS: dict[str, str] = {"sde": "sdekit.sdes", "sampler": "sdekit.samplers"}
"""Plugin kind -> entry-point group."""

PLUGIN_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
"""Valid plugin names: lower-case letters and digits in words joined by single hyphens, starting with a letter."""

SDE_METHODS = ("sde", "marginal_prob", "marginal_coeffs", "prior_sampling", "prior_logp", "discretize", "reverse")
SDE_DECLARATIONS = (
    "config_params",
    "scheduler_params",
    "default_time_input",
    "prior_std",
    "is_discrete",
    "sigma",
    "t_from_sigma",
)
"""What an SDE declares about itself (see :class:`sdekit.sde.SDE`); a subclass of ``SDE`` inherits defaults."""
SAMPLER_METHODS = ("set_timesteps", "step", "scale_model_input", "add_noise")

DISABLE_ENV = "SDEKIT_DISABLE_PLUGINS"
"""The environment variable that turns third-party plugins off: ``1`` (or ``all``, ``true``, ``yes``, ``*``) for all
of them, or a comma- or space-separated list of plugin names (``dpm-solver``), qualified names
(``sdekit-dpm-solver:dpm-solver``) or distribution names (``sdekit-dpm-solver``). Empty, ``0``, ``false``, ``no`` or
``off``: none. sdekit's own plugins are never turned off. Read at discovery (the first request, or
:func:`refresh_plugins`)."""

_DISABLE_ALL = frozenset({"1", "all", "true", "yes", "*"})
_DISABLE_NONE = frozenset({"", "0", "false", "no", "off"})

_BUILTIN_DISTRIBUTION = "sdekit"
_KIND_LABELS = {"sde": "SDE", "sampler": "sampler"}


class PluginError(Exception):
    """Base class of the errors the plugin registry raises."""


class UnknownPluginError(PluginError, LookupError, ValueError):
    """No plugin of the requested kind is registered under the requested name.

    Attributes:
        name: the name asked for.
        kind: ``"sde"`` or ``"sampler"``.
        available: the names that could have been asked for instead.
        closest: the available name closest to ``name``, or ``None`` when none is close.
    """

    def __init__(self, name: str, kind: str, available: list[str], closest: str | None) -> None:
        self.name = name
        self.kind = kind
        self.available = available
        self.closest = closest
        label = _KIND_LABELS[kind]
        hint = f" Did you mean {closest!r}?" if closest else ""
        listing = ", ".join(available) if available else "none"
        super().__init__(
            f"Unknown {label} plugin {name!r}.{hint} Available {label} plugins: {listing}. "
            f"Run `sdekit plugins` to see every registered plugin and its status."
        )


class InvalidPluginError(PluginError):
    """A plugin is registered but cannot be used (it failed to import, breaks its protocol, ...).

    Attributes:
        status: why it is unusable, one of the non-``"ok"`` :data:`PluginStatus` values.
        reason: a human-readable explanation.
    """

    def __init__(self, status: PluginStatus, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


class PluginWarning(UserWarning):
    """Warned when a plugin is skipped or a plugin name is registered more than once."""


@dataclass(frozen=True)
class PluginInfo:
    """What the registry knows about one registered plugin.

    Attributes:
        name: the entry-point name (what :func:`get_sde` / :func:`load_scheduler` take).
        kind: ``"sde"`` or ``"sampler"``.
        distribution: the name of the installed distribution that registers it.
        version: that distribution's version.
        status: ``"ok"`` (usable under ``name``), ``"shadowed"`` (usable, but another distribution's plugin
            of the same name wins; reach this one as ``"distribution:name"``), ``"disabled"`` (turned off by
            :data:`DISABLE_ENV`, not imported), or why it is skipped: ``"bad-name"``, ``"import-error"``,
            ``"protocol-error"``, ``"incompatible"`` (declares another sdekit API version).
        reason: explanation of any status other than ``"ok"``, else ``None``.
        entry_point: the entry point's value, ``"module:attribute"``.
        api_version: the ``sdekit_api_version`` the plugin declares, or ``None`` (undeclared, or not loaded).
    """

    name: str
    kind: PluginKind
    distribution: str
    version: str
    status: PluginStatus
    reason: str | None
    entry_point: str
    api_version: int | None

    @property
    def qualified_name(self) -> str:
        """``"distribution:name"``, which selects this plugin even when its name is shadowed."""
        return f"{self.distribution}:{self.name}"


@dataclass
class _Entry:
    """One registered entry point, its place among duplicates and (once loaded) its load result."""

    kind: PluginKind
    name: str
    distribution: str
    version: str
    entry_point: importlib.metadata.EntryPoint
    name_error: str | None = None
    disabled_by: str | None = None
    shadowed_by: str | None = None
    loaded: bool = False
    obj: Any = None
    failure: InvalidPluginError | None = None
    api_version: int | None = None

    @property
    def key(self) -> str:
        return _normalize_distribution(self.distribution)

    @property
    def label(self) -> str:
        return f"{_KIND_LABELS[self.kind]} plugin {self.name!r} from distribution {self.distribution!r} {self.version}"

    def info(self) -> PluginInfo:
        status: PluginStatus = "ok"
        reason = None
        if self.name_error is not None:
            status, reason = "bad-name", self.name_error
        elif self.disabled_by is not None:
            status, reason = "disabled", self.disabled_by
        elif self.failure is not None:
            status, reason = self.failure.status, self.failure.reason
        elif self.shadowed_by is not None:
            status = "shadowed"
            reason = (
                f"{self.name!r} is also registered by {self.shadowed_by!r}, which takes precedence; "
                f"select this one as {self.distribution + ':' + self.name!r}"
            )
        return PluginInfo(
            name=self.name,
            kind=self.kind,
            distribution=self.distribution,
            version=self.version,
            status=status,
            reason=reason,
            entry_point=self.entry_point.value,
            api_version=self.api_version,
        )


_lock = threading.RLock()
_entries: list[_Entry] | None = None


def _normalize_distribution(name: str) -> str:
    """PEP 503 normalization, so ``Foo_Bar`` and ``foo-bar`` name one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _check_kind(kind: str) -> None:
    if kind not in ENTRY_POINT_GROUPS:
        raise ValueError(f"kind must be one of {sorted(ENTRY_POINT_GROUPS)} or None, got {kind!r}.")


def _scan_metadata() -> list[_Entry]:
    """Every entry point in sdekit's groups, each distribution counted once (the first on ``sys.path``)."""
    entries: list[_Entry] = []
    seen: set[tuple[str, str, str]] = set()
    for dist in importlib.metadata.distributions():
        distribution = dist.metadata.get("Name")
        if not distribution:
            continue
        try:
            entry_points = dist.entry_points
        except Exception as exc:  # one distribution's unreadable metadata must not hide every other plugin
            warnings.warn(
                f"sdekit: skipping the plugins of distribution {distribution!r}: its entry points cannot be read "
                f"({type(exc).__name__}: {exc}).",
                PluginWarning,
                stacklevel=3,
            )
            continue
        dist_key = _normalize_distribution(distribution)
        for kind, group in ENTRY_POINT_GROUPS.items():
            for ep in entry_points.select(group=group):
                # A distribution visible twice on sys.path (or listing a name twice) registers it once.
                if (dist_key, kind, ep.name) in seen:
                    continue
                seen.add((dist_key, kind, ep.name))
                entries.append(_Entry(kind, ep.name, distribution, dist.version or "unknown", ep))
    return entries


def disabled_plugins() -> frozenset[str] | None:
    """What :data:`DISABLE_ENV` turns off: ``None`` for nothing, an empty set for every third-party plugin, else the
    names it lists (plugin, ``distribution:name`` or distribution names; distribution names normalized)."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if value.lower() in _DISABLE_NONE:
        return None
    if value.lower() in _DISABLE_ALL:
        return frozenset()
    tokens = set()
    for token in re.split(r"[\s,]+", value):
        distribution, sep, name = token.rpartition(":")
        if token:
            tokens.add(f"{_normalize_distribution(distribution)}:{name}" if sep else token)
            tokens.add(_normalize_distribution(token))
    return frozenset(tokens)


def _disable_reason(entry: _Entry, disabled: frozenset[str] | None) -> str | None:
    """Why ``entry`` is turned off by :data:`DISABLE_ENV`, or ``None`` (built-ins are never turned off)."""
    if disabled is None or entry.key == _BUILTIN_DISTRIBUTION:
        return None
    setting = f"{DISABLE_ENV}={os.environ.get(DISABLE_ENV, '').strip()}"
    if not disabled:
        return f"turned off by {setting} (every third-party plugin); unset it to use the plugin"
    for token in (entry.name, f"{entry.key}:{entry.name}", entry.key):
        if token in disabled:
            return f"turned off by {setting} (it names {token!r}); remove that to use the plugin"
    return None


def _precedence(entry: _Entry) -> tuple[bool, str]:
    """Sort key among plugins sharing a name: sdekit's built-ins first, then distributions alphabetically."""
    return (entry.key != _BUILTIN_DISTRIBUTION, entry.key)


def _discover() -> list[_Entry]:
    """Scan metadata, flag invalid names and resolve duplicate names, warning about both."""
    entries = _scan_metadata()
    disabled = disabled_plugins()
    by_name: dict[tuple[str, str], list[_Entry]] = {}
    for entry in entries:
        entry.disabled_by = _disable_reason(entry, disabled)
        if entry.disabled_by is not None:
            continue  # not imported, not warned about, and out of the name-clash resolution
        if PLUGIN_NAME_PATTERN.match(entry.name) is None:
            entry.name_error = (
                f"invalid plugin name {entry.name!r}: names are lower-case letters and digits in words joined "
                f"by single hyphens, starting with a letter (e.g. 'my-sampler')"
            )
            warnings.warn(f"sdekit: skipping {entry.label}: {entry.name_error}.", PluginWarning, stacklevel=2)
            continue
        by_name.setdefault((entry.kind, entry.name), []).append(entry)
    for (kind, name), group in by_name.items():
        if len(group) < 2:
            continue
        group.sort(key=_precedence)
        winner, losers = group[0], group[1:]
        for loser in losers:
            loser.shadowed_by = winner.distribution
        others = ", ".join(repr(f"{loser.distribution}:{name}") for loser in losers)
        warnings.warn(
            f"sdekit: {_KIND_LABELS[kind]} plugin name {name!r} is registered by several distributions: "
            f"{', '.join(repr(e.distribution) for e in group)}. Using the one from {winner.distribution!r} "
            f"(sdekit's built-ins win, then the alphabetically first distribution); select another as {others}.",
            PluginWarning,
            stacklevel=2,
        )
    return entries


def _get_entries() -> list[_Entry]:
    global _entries
    with _lock:
        if _entries is None:
            _entries = _discover()
        return _entries


def refresh_plugins() -> None:
    """Forget every cached discovery and load result; the next request re-reads installed metadata.

    Call it after installing or removing a plugin distribution (or changing ``sys.path``) in a running
    process. Modules already imported are not re-imported.
    """
    global _entries
    with _lock:
        _entries = None
        importlib.invalidate_caches()


def _declared_api_version(obj: object) -> int | None:
    declared = getattr(obj, "sdekit_api_version", None)
    if declared is None:
        return None
    if isinstance(declared, bool) or not isinstance(declared, int):
        raise InvalidPluginError(
            "protocol-error", f"sdekit_api_version must be an int, got {declared!r} of type {type(declared).__name__}"
        )
    return declared


def validate_plugin(obj: object, kind: str) -> None:
    """Check that ``obj`` can serve as a plugin of ``kind``; raise :class:`InvalidPluginError` if not.

    The registry runs this on every plugin it loads; plugin authors can call it in their own tests.

    * Both kinds: ``obj`` is a class, not abstract, whose ``sdekit_api_version`` (if declared) equals
      :data:`API_VERSION`. An undeclared version is assumed compatible.
    * ``"sde"``: a subclass of :class:`sdekit.sde.SDE`, or a class with callables ``sde``, ``marginal_prob``,
      ``marginal_coeffs``, ``prior_sampling``, ``prior_logp``, ``discretize`` and ``reverse`` and the declared
      conventions :data:`SDE_DECLARATIONS` (``config_params``, ``scheduler_params``, ``default_time_input``,
      ``prior_std``, ``is_discrete``, ``sigma``, ``t_from_sigma``).
    * ``"sampler"``: a subclass of diffusers' ``SchedulerMixin`` and ``ConfigMixin`` with callables
      ``set_timesteps``, ``step``, ``scale_model_input`` and ``add_noise``.

    Args:
        obj: the object an entry point resolved to.
        kind: ``"sde"`` or ``"sampler"``.
    """
    _check_kind(kind)
    if not inspect.isclass(obj):
        raise InvalidPluginError("protocol-error", f"expected a class, got {type(obj).__name__} {obj!r}")
    declared = _declared_api_version(obj)
    if declared is not None and declared != API_VERSION:
        raise InvalidPluginError(
            "incompatible",
            f"{obj.__qualname__} declares sdekit_api_version = {declared}, but this sdekit supports API version "
            f"{API_VERSION}; install a version of the plugin built for sdekit API {API_VERSION}",
        )
    if kind == "sde":
        required = () if issubclass(obj, SDE) else SDE_METHODS
        undeclared = [] if issubclass(obj, SDE) else [name for name in SDE_DECLARATIONS if not hasattr(obj, name)]
    else:
        undeclared = []
        missing_bases = [base.__name__ for base in (SchedulerMixin, ConfigMixin) if not issubclass(obj, base)]
        if missing_bases:
            raise InvalidPluginError(
                "protocol-error",
                f"{obj.__qualname__} is not a diffusers scheduler: it does not subclass {' and '.join(missing_bases)}",
            )
        required = SAMPLER_METHODS
    missing = [method for method in required if not callable(getattr(obj, method, None))] + undeclared
    if missing:
        raise InvalidPluginError(
            "protocol-error", f"{obj.__qualname__} lacks the {kind} protocol method(s) {', '.join(missing)}"
        )
    if inspect.isabstract(obj):
        raise InvalidPluginError(
            "protocol-error",
            f"{obj.__qualname__} is abstract: it does not implement {', '.join(sorted(obj.__abstractmethods__))}",
        )


def _load(entry: _Entry) -> None:
    """Import and validate ``entry`` once; a failure is recorded on it and warned about."""
    with _lock:
        if entry.loaded:
            return
        try:
            obj = entry.entry_point.load()
        except Exception as exc:  # any error while importing a plugin must not break sdekit
            entry.failure = InvalidPluginError("import-error", f"import failed: {type(exc).__name__}: {exc}")
        else:
            try:
                entry.api_version = _declared_api_version(obj)
                validate_plugin(obj, entry.kind)
            except InvalidPluginError as exc:
                entry.failure = exc
            else:
                entry.obj = obj
        entry.loaded = True
        if entry.failure is not None:
            warnings.warn(f"sdekit: skipping {entry.label}: {entry.failure.reason}.", PluginWarning, stacklevel=3)


def list_plugins(kind: str | None = None, refresh: bool = False) -> list[PluginInfo]:
    """Every registered plugin of ``kind`` (both kinds when ``None``), validated, with its status.

    Each plugin is imported and checked (see :func:`validate_plugin`) the first time it is listed or requested;
    the results are cached. Skipped plugins are listed too, with the reason.

    Duplicate names: when several distributions register one name in one group, the built-in ``sdekit``
    distribution wins; otherwise the distribution whose normalized name sorts first alphabetically wins. The
    others get status ``"shadowed"`` and are reachable as ``"distribution:name"``. A distribution that is
    visible twice on ``sys.path`` counts once (the first copy, as ``importlib.metadata`` orders them).

    Args:
        kind: ``"sde"``, ``"sampler"`` or ``None``.
        refresh: call :func:`refresh_plugins` first.

    Returns:
        :class:`PluginInfo` records sorted by kind (SDEs first), name, then precedence.
    """
    if kind is not None:
        _check_kind(kind)
    if refresh:
        refresh_plugins()
    kinds = list(ENTRY_POINT_GROUPS)
    selected = [e for e in _get_entries() if kind is None or e.kind == kind]
    for entry in selected:
        if entry.name_error is None and entry.disabled_by is None:
            _load(entry)
    selected.sort(key=lambda e: (kinds.index(e.kind), e.name, e.shadowed_by is not None, e.key))
    return [entry.info() for entry in selected]


def _available_names(entries: list[_Entry], kind: str, qualified: bool) -> list[str]:
    names = {
        f"{e.distribution}:{e.name}" if qualified else e.name
        for e in entries
        if e.kind == kind
        and e.name_error is None
        and e.disabled_by is None
        and e.failure is None
        and (qualified or e.shadowed_by is None)
    }
    return sorted(names)


def _resolve(name: str, kind: PluginKind) -> Any:
    """The loaded plugin object of ``kind`` registered as ``name`` or ``"distribution:name"``."""
    if not isinstance(name, str):
        raise TypeError(f"plugin name must be a str, got {type(name).__name__} {name!r}.")
    entries = _get_entries()
    distribution, sep, plain = name.rpartition(":")
    if sep:
        dist_key = _normalize_distribution(distribution)
        matches = [e for e in entries if e.kind == kind and e.name == plain and e.key == dist_key]
    else:
        matches = [e for e in entries if e.kind == kind and e.name == name and e.shadowed_by is None]
        # A turned-off plugin is reported as such rather than as unknown, unless another one serves the name.
        matches.sort(key=lambda e: e.disabled_by is not None)
    if not matches:
        available = _available_names(entries, kind, qualified=bool(sep))
        closest = difflib.get_close_matches(name, available, n=1)
        raise UnknownPluginError(name, kind, available, closest[0] if closest else None)
    entry = matches[0]
    if entry.disabled_by is not None:
        raise InvalidPluginError("disabled", f"the {entry.label} is {entry.disabled_by}")
    if entry.name_error is not None:
        raise InvalidPluginError("bad-name", f"the {entry.label} is skipped: {entry.name_error}")
    _load(entry)
    if entry.failure is not None:
        raise InvalidPluginError(entry.failure.status, f"the {entry.label} is skipped: {entry.failure.reason}")
    return entry.obj


def registered_name(cls: type, kind: str) -> str | None:
    """The name under which an entry point of ``kind`` registers ``cls``, read from metadata without importing.

    An entry point ``"pkg:Cls"`` matches a class ``Cls`` defined in ``pkg`` or one of its submodules.
    """
    _check_kind(kind)
    for entry in _get_entries():
        module, _, attr = entry.entry_point.value.partition(":")
        if entry.kind == kind and attr.strip() == cls.__qualname__:
            if cls.__module__ == module.strip() or cls.__module__.startswith(module.strip() + "."):
                return entry.name
    return None


def get_sde_class(name: str) -> type:
    """The SDE class registered as ``name`` (or ``"distribution:name"``) in ``sdekit.sdes``.

    Raises:
        UnknownPluginError: no such SDE is registered; the message lists the available ones and the closest.
        InvalidPluginError: it is registered but was skipped (the message says why).
    """
    return _resolve(name, "sde")


def get_sampler_class(name: str) -> type:
    """The scheduler class registered as ``name`` (or ``"distribution:name"``) in ``sdekit.samplers``.

    Raises:
        UnknownPluginError: no such sampler is registered; the message lists the available ones and the closest.
        InvalidPluginError: it is registered but was skipped (the message says why).
    """
    return _resolve(name, "sampler")


def _accepted_parameters(signature: inspect.Signature) -> tuple[list[str], bool]:
    """Keyword-passable parameter names of ``signature`` and whether it also takes ``**kwargs``."""
    names = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return names, var_keyword


def _reject_unknown(given: Mapping[str, Any], accepted: list[str], what: str) -> None:
    """Raise ``ValueError`` for the first key of ``given`` not in ``accepted``, with the closest accepted one."""
    for key in given:
        if key not in accepted:
            closest = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {closest[0]!r}?" if closest else ""
            raise ValueError(
                f"{what} got an unknown parameter {key!r}.{hint} Accepted parameters: "
                f"{', '.join(accepted) if accepted else 'none'}."
            )


def get_sde(name: str, /, **params: Any) -> SDE:
    """Instantiate the SDE plugin ``name`` (or ``"distribution:name"``) with ``params``.

    Args:
        name: the plugin's registered name, e.g. ``"vp"``.
        **params: keyword arguments for the SDE's constructor.

    Raises:
        UnknownPluginError: no such SDE is registered.
        InvalidPluginError: it is registered but was skipped.
        ValueError: a parameter the constructor does not accept or a required one is missing (the message
            lists the accepted parameters); the constructor's own ``ValueError`` for a bad value propagates
            unchanged.
    """
    cls = get_sde_class(name)
    signature = inspect.signature(cls)
    accepted, var_keyword = _accepted_parameters(signature)
    what = f"get_sde({name!r})"
    if not var_keyword:
        _reject_unknown(params, accepted, what)
    try:
        signature.bind(**params)
    except TypeError as exc:
        raise ValueError(f"{what}: {exc}. Accepted parameters: {', '.join(accepted) or 'none'}.") from None
    return check_sde_instance(cls(**params))


def check_sde_instance(sde: Any) -> Any:
    """Return ``sde`` if its declared methods are callable; :func:`get_sde` runs this on every SDE it builds.

    Raises:
        InvalidPluginError: an instance attribute hides one of the SDE's declared methods (a plugin storing its
            noise scale as ``self.sigma`` hides ``SDE.sigma(t)``); the message names them.
    """
    hidden = [
        name
        for name in ("sigma", "t_from_sigma", "prior_std", "default_time_input")
        if not callable(getattr(sde, name, None))
    ]
    if hidden:
        raise InvalidPluginError(
            "protocol-error",
            f"{type(sde).__qualname__} instances set the attribute(s) {', '.join(hidden)}, which hide the SDE "
            "method(s) of that name (sdekit.sde.SDE); rename the attribute(s)",
        )
    return sde


def load_scheduler(name: str, /, config: Any = None, **overrides: Any) -> SchedulerMixin:
    """Instantiate the sampler plugin ``name`` as a diffusers scheduler.

    With a ``config`` this is ``cls.from_config(config, **overrides)``, so
    ``pipe.scheduler = load_scheduler("pc", pipe.scheduler.config)`` reuses a pipeline's noise schedule; keys
    of ``config`` the class does not know are ignored, as diffusers does. Without one it is
    ``cls(**overrides)``.

    Args:
        name: the plugin's registered name (or ``"distribution:name"``).
        config: ``None``, a mapping (a dict or diffusers ``FrozenDict``), or an object with a ``.config``
            mapping (a scheduler, a model).
        **overrides: constructor arguments; they take precedence over ``config``.

    Raises:
        UnknownPluginError: no such sampler is registered.
        InvalidPluginError: it is registered but was skipped.
        ValueError: an override is not a parameter of the scheduler's ``__init__`` (nothing is silently
            ignored); the message lists the accepted ones.
        TypeError: ``config`` is neither a mapping nor has a ``.config`` mapping.
    """
    cls = get_sampler_class(name)
    if config is not None and not isinstance(config, Mapping):
        if not isinstance(getattr(config, "config", None), Mapping):
            raise TypeError(
                "config must be None, a mapping (dict / FrozenDict) or an object with a .config mapping "
                f"(e.g. pipe.scheduler); got {type(config).__name__}."
            )
        config = config.config
    accepted, _ = _accepted_parameters(inspect.signature(cls.__init__))
    accepted = [p for p in accepted if p != "self"]
    if config is not None:
        # from_config silently drops keys in ignore_for_config, so they are not accepted as overrides there.
        accepted = [p for p in accepted if p not in cls.ignore_for_config]
    _reject_unknown(overrides, accepted, f"load_scheduler({name!r})")
    if config is None:
        return cls(**overrides)
    return cls.from_config(dict(config), **overrides)

"""``sdekit plugins`` (the installed SDE and sampler plugins) and ``sdekit demo`` (every SDE on a known mixture)."""

from __future__ import annotations

import argparse
import warnings

from .. import registry

__all__ = [
    "DEMO_EXAMPLE",
    "DEMO_HELP",
    "PLUGINS_EXAMPLE",
    "PLUGINS_HELP",
    "configure_demo",
    "configure_plugins",
    "run_demo",
    "run_plugins",
]

PLUGINS_HELP = "list the installed SDE and sampler plugins and whether each one loads"
PLUGINS_EXAMPLE = "sdekit plugins --kind sampler"
DEMO_HELP = "list the plugins, then sample a known 2-d mixture with every built-in SDE through its exact score"
DEMO_EXAMPLE = "sdekit demo --samples 1000"


def configure_plugins(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit plugins``."""
    parser.add_argument("--kind", choices=sorted(registry.ENTRY_POINT_GROUPS), help="only list plugins of this kind")


def run_plugins(args: argparse.Namespace) -> int:
    """Print the plugin table: name, kind, distribution, version, status and, for a skipped plugin, why."""
    # The table reports every skipped plugin with its reason, so the registry's warnings would only repeat it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", registry.PluginWarning)
        plugins = registry.list_plugins(kind=args.kind)
    if not plugins:
        print(f"No {args.kind or 'sdekit'} plugins are installed.")
        return 0
    header = ("NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS", "REASON")
    rows = [(p.name, p.kind, p.distribution, p.version, p.status, p.reason or "") for p in plugins]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def configure_demo(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit demo``."""
    parser.add_argument("--samples", type=int, default=4000, help="samples per sampler (default 4000)")
    parser.add_argument("--sde-steps", type=int, default=500, help="reverse-SDE steps (default 500)")
    parser.add_argument("--ode-steps", type=int, default=100, help="probability-flow Heun steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run_demo(args: argparse.Namespace) -> int:
    """Print the plugin table, then the demo's quality table."""
    from .. import demo

    run_plugins(argparse.Namespace(kind=None))
    print()
    demo.print_demo(*demo.run_demo(args.samples, args.sde_steps, args.ode_steps, args.seed))
    return 0

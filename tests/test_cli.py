"""The ``sdekit`` command, in process and as the installed console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from sdekit.cli import COMMANDS, main

# The real test plugin distributions in tests/plugin_dist*, installed once per session (conftest.py).
pytestmark = pytest.mark.usefixtures("plugins_on_path")
TEST_DIST = "sdekit-testplugins"
EXTRA_DIST = "sdekit-extra-plugins"


def _table(output: str) -> dict[tuple[str, str, str], list[str]]:
    """``sdekit plugins`` output as (kind, name, distribution) -> [version, status, reason]."""
    lines = output.strip().splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS", "REASON"]
    rows = {}
    for line in lines[1:]:
        name, kind, distribution, version, status, *reason = line.split(None, 5)
        rows[kind, name, distribution] = [version, status, reason[0] if reason else ""]
    return rows


def _check_full_table(rows: dict[tuple[str, str, str], list[str]]) -> None:
    for name in ("ve", "vp", "subvp"):
        assert rows["sde", name, "sdekit"][1:] == ["ok", ""]
    assert rows["sde", "constant-ve", TEST_DIST] == ["0.3.1", "ok", ""]
    assert rows["sampler", "euler-flow", TEST_DIST] == ["0.3.1", "ok", ""]
    assert rows["sde", "twin", EXTRA_DIST] == ["1.2.0", "ok", ""]
    version, status, reason = rows["sde", "broken-import", TEST_DIST]
    assert status == "import-error" and "ModuleNotFoundError" in reason
    assert rows["sde", "Bad_Name", TEST_DIST][1] == "bad-name"
    assert rows["sde", "not-an-sde", TEST_DIST][1] == "protocol-error"
    assert rows["sde", "future-sde", TEST_DIST][1] == "incompatible"
    version, status, reason = rows["sde", "vp", TEST_DIST]
    assert status == "shadowed" and f"'{TEST_DIST}:vp'" in reason


def test_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plugins"]) == 0
    # Problems are reported in the table, not repeated as warnings.
    assert not caught
    _check_full_table(_table(capsys.readouterr().out))


def test_plugins_kind_filter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--kind", "sampler"]) == 0
    rows = _table(capsys.readouterr().out)
    builtins = {("sampler", name, "sdekit") for name in ("analytic-dpm", "ddim", "pc", "pf-ode")}
    test_plugins = {("sampler", "euler-flow", TEST_DIST), ("sampler", "not-a-scheduler", TEST_DIST)}
    # Only samplers: other installed distributions (e.g. the DPM-Solver plugin) may add rows of their own.
    assert all(kind == "sampler" for kind, _, _ in rows)
    assert {row for row in rows if row[2] in ("sdekit", TEST_DIST)} == builtins | test_plugins


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--kind", "sdes"]) == 2
    assert "invalid choice: 'sdes'" in capsys.readouterr().err
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for name, command in COMMANDS.items():
        assert name in help_text and command.help in help_text


def test_console_script(plugin_site: Path) -> None:  # noqa: F811
    script = shutil.which("sdekit", path=str(Path(sys.executable).parent))
    assert script, "the sdekit console script is missing: run `pip install --no-deps --no-build-isolation -e .`"
    pythonpath = os.pathsep.join(filter(None, [str(plugin_site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([script, "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PluginWarning" not in result.stderr
    _check_full_table(_table(result.stdout))


def test_demo_prints_plugins_and_a_quality_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--samples", "500", "--sde-steps", "100", "--ode-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "constant-ve" in out and "data-vs-data floor" in out
    table = out[out.index("data-vs-data floor") :].splitlines()[2:]
    rows = [line.split() for line in table]
    assert [row[0] for row in rows] == ["subvp", "subvp", "ve", "ve", "vp", "vp"]
    assert all(float(row[-1]) < 0.5 for row in rows)  # the data have total variance ~4.4; a broken sampler is far off

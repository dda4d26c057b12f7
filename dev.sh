#!/usr/bin/env bash
# Set up sdekit's environment and run a job in it.
#   ./dev.sh demo    the main job: train the embedded default briefly, sample it with every built-in sampler
#   ./dev.sh test    the test suite (what CI runs), the separately packaged plugins/sdekit-dpm-solver's included
# The environment is .venv (or $SDEKIT_VENV). Where it has no torch, the pinned CPU build is installed
# ($SDEKIT_TORCH, default torch==2.13.0); an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-}"
case "$job" in
  demo|test) shift ;;
  *) echo "usage: ./dev.sh demo|test [extra arguments]" >&2; exit 2 ;;
esac

venv="${SDEKIT_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install --quiet "${SDEKIT_TORCH:-torch==2.13.0}"
fi

# Reinstall only when the packaging changed since the last install. The plugin packaged on its own
# (plugins/sdekit-dpm-solver) is installed too, so that the test suite runs its tests with sdekit's.
stamp="$venv/.sdekit-installed"
plugin=plugins/sdekit-dpm-solver
want="$(cat pyproject.toml "$plugin/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install --quiet -e ".[test]"
  "$py" -m pip install --quiet -e "$plugin"
  echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=1
case "$job" in
  demo) exec "$py" training/demo.py "$@" ;;
  test) exec "$py" -m pytest -q -n "${SDEKIT_TEST_WORKERS:-auto}" "$@" ;;
esac

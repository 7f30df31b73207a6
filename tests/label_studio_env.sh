#!/usr/bin/env bash
# Creates .venv-label-studio in the repository root (once; a second run only checks it): the Label Studio
# server the `label_studio` tests start. Its own virtualenv, as its pins clash with dearli's. sentry-sdk 3
# refuses an option Label Studio 1.23 passes (`send_default_pii`), so it stays below 3.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-label-studio
PINS=(label-studio==1.23.2 'sentry-sdk<3')
if [ -x "$VENV/bin/label-studio" ] && "$VENV/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(m.version("label-studio") != "1.23.2" or int(m.version("sentry-sdk").split(".")[0]) >= 3)' 2>/dev/null; then
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}"

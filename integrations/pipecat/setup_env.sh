#!/usr/bin/env bash
# Build the integration's own virtual environment (default: integrations/pipecat/.venv): Pipecat,
# sonic's live runtime (environment.txt), then sonic and sonic_pipecat without dependencies.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/environment.txt"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e "$root" -e "$here"
"$venv/bin/python" -c "import sonic_pipecat, sonic.live.session, aiortc" 2>/dev/null
echo "$venv"

#!/usr/bin/env bash
# Installs anitalker-live into ./.venv on a Debian/Ubuntu machine.
#   bash install.sh          the program
#   bash install.sh dev      the program and what the tests need
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if command -v apt-get >/dev/null; then
    # espeak-ng speaks text (the TTS source and the test sentences)
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends espeak-ng
fi
python3 -m venv .venv
# torch first and exactly this version: it is the CPU build; an open range would pull GBs of CUDA wheels.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
echo "installed: .venv/bin/anitalker"

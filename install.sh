#!/usr/bin/env bash
# Installs anitalker-live into ./.venv on a Debian/Ubuntu machine.
#   bash install.sh          the program (microphone, virtual camera and WebRTC support included)
#   bash install.sh dev      the program and what the tests need (a JACK dummy sound server, Chromium, and
#                            livekit-agents and pipecat-ai, whose adapters are tested with the real packages)
#   bash install.sh livekit  (or pipecat) the program and that voice-agent framework
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if command -v apt-get >/dev/null; then
    # espeak-ng speaks text (the TTS source); PortAudio is the microphone/speaker library
    packages="espeak-ng libportaudio2"
    # the tests drive real PortAudio over a JACK dummy server and a real headless Chromium WebRTC peer
    [ "$extras" = dev ] && packages="$packages jackd2 chromium"
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages
fi
[ "$extras" = dev ] && extras="dev,livekit,pipecat"
python3 -m venv .venv
# torch first and exactly this version: it is the CPU build; an open range would pull GBs of CUDA wheels.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[mic,vcam,webrtc${extras:+,$extras}]"
echo "installed: .venv/bin/anitalker"

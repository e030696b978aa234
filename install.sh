#!/usr/bin/env bash
# Installs anitalker-live into ./.venv on a Debian/Ubuntu machine.
#   bash install.sh          the program (microphone, virtual camera and WebRTC support included)
#   bash install.sh dev      the program and what the tests need (a JACK dummy sound server, Chromium, and
#                            livekit-agents, pipecat-ai and openvino, whose adapters are tested with the real
#                            packages)
#   bash install.sh livekit  (or pipecat) the program and that voice-agent framework
#   bash install.sh openvino the program and OpenVINO, for the stage-2 denoiser on its CPU plugin
#   bash install.sh preview  also OpenCV's GUI build, for `--to preview` (a window; the default build is
#                            headless, so a server needs no X libraries); words combine: dev preview
set -euo pipefail
cd "$(dirname "$0")"
extras=""; preview=""; dev=""
for word in "$@"; do
    case "$word" in
        dev) dev=1; extras="$extras,dev,livekit,pipecat,openvino" ;;
        livekit|pipecat|openvino) extras="$extras,$word" ;;
        preview) preview=1 ;;
        *) echo "usage: bash install.sh [dev] [livekit] [pipecat] [openvino] [preview]" >&2; exit 2 ;;
    esac
done
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
if command -v apt-get >/dev/null; then
    # espeak-ng speaks text (the TTS source); PortAudio is the microphone/speaker library
    packages="espeak-ng libportaudio2"
    # the tests drive real PortAudio over a JACK dummy server and a real headless Chromium WebRTC peer
    [ -n "$dev" ] && packages="$packages jackd2 chromium"
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages
fi
python3 -m venv .venv
# torch first and exactly this version: it is the CPU build; an open range would pull GBs of CUDA wheels.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[mic,vcam,webrtc$extras]"
if [ -n "$preview" ]; then
    # opencv-python and opencv-python-headless install the same cv2 package: swap one for the other at the
    # same version (a later `pip install -e .` brings the headless build back; run this again after it)
    version="$(.venv/bin/python -c 'import cv2; print(cv2.__version__)')"
    .venv/bin/pip uninstall -q -y opencv-python-headless
    .venv/bin/pip install -q --disable-pip-version-check "opencv-python==${version}.*"
fi
echo "installed: .venv/bin/anitalker"

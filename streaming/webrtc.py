"""WebRTC out (and a browser's microphone in) with aiortc: a Sink that sends each released AvFrame to every
connected viewer as one video and one audio track.

Timing: the clock paces writes, so the tracks never sleep; they hand out what the sink queued. Video and
audio of a frame get timestamps from the same frame pts (video pts*3600 at 90 kHz, audio pts*640 at 16 kHz)
and are queued to a viewer together, and only once its connection is up, so both RTP streams start on the
same frame and the sender reports (RTCP SR) map them to the same wall time: the browser lip-syncs from those.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from avatar.timebase import FPS, SAMPLE_RATE
from models.errors import AnitalkerError

log = logging.getLogger(__name__)
VIDEO_CLOCK = 90000
QUEUE_FRAMES = 25          # per viewer and track: a stalled peer loses its oldest second, memory stays bounded


@dataclass(frozen=True)
class WebRTCOptions:
    codec: str | None = None            # "vp8" or "h264"; None: whatever the browser prefers
    bitrate: int | None = None          # video bits/s, start value and cap (process-wide: aiortc has no per-peer knob)
    ice_servers: tuple[str, ...] = ()   # "stun:host:port", "turn:USER:PASS@host:port[?transport=tcp]"
    port_range: tuple[int, int] | None = None   # UDP ports for ICE host candidates (firewalls)
    max_viewers: int = 8


def ice_servers(urls) -> list:
    """RTCIceServer objects; credentials ride in the URL (USER:PASS@). No default STUN: without network a
    STUN server that never answers only delays every negotiation. aioice uses the first STUN and first TURN."""
    from aiortc import RTCIceServer
    out = []
    for url in urls:
        scheme, _, rest = url.partition(":")
        if scheme not in ("stun", "stuns", "turn", "turns") or not rest:
            raise AnitalkerError(f"bad ICE server {url!r}; use stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
        creds, at, host = rest.rpartition("@")
        user, _, password = creds.partition(":") if at else (None, "", None)
        out.append(RTCIceServer(f"{scheme}:{host}", username=user, credential=password))
    return out


def use_port_range(loop, lo: int, hi: int) -> None:
    """aioice 0.13 binds host candidates to port 0 and has no port-range option, so the loop's UDP binds
    to port 0 are steered into [lo, hi] (aioice is the only thing here that binds such sockets)."""
    if not 0 < lo <= hi < 65536:
        raise AnitalkerError(f"bad UDP port range {lo}-{hi}")
    orig = getattr(loop, "_anitalker_orig_bind", loop.create_datagram_endpoint)

    async def bind(factory, local_addr=None, **kw):
        if local_addr is None or local_addr[1] != 0:
            return await orig(factory, local_addr=local_addr, **kw)
        ports = random.sample(range(lo, hi + 1), hi + 1 - lo)
        for port in ports:
            try:
                return await orig(factory, local_addr=(local_addr[0], port), **kw)
            except OSError:
                continue
        raise OSError(f"no free UDP port in {lo}-{hi}")

    loop._anitalker_orig_bind, loop.create_datagram_endpoint = orig, bind


def set_bitrate(bps: int) -> None:
    from aiortc.codecs import h264, vpx
    for codec in (vpx, h264):     # read by each encoder when it is created and when REMB moves the target
        codec.DEFAULT_BITRATE = codec.MAX_BITRATE = int(bps)
        codec.MIN_BITRATE = min(codec.MIN_BITRATE, int(bps))


def _track(kind: str):
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class QueueTrack(MediaStreamTrack):
        """Frames queued by the sink, handed to aiortc's sender as it asks for them (no pacing here)."""

        def __init__(self):
            super().__init__()
            self.kind = kind
            self.q = collections.deque(maxlen=QUEUE_FRAMES)
            self.ready = asyncio.Event()
            self.dropped = 0

        def put(self, frame) -> None:
            self.dropped += len(self.q) == self.q.maxlen
            self.q.append(frame)
            self.ready.set()

        async def recv(self):
            while not self.q:
                if self.readyState != "live":
                    raise MediaStreamError
                self.ready.clear()
                await self.ready.wait()
            return self.q.popleft()

        def stop(self) -> None:
            super().stop()
            self.ready.set()          # wake recv() so it ends

    return QueueTrack()


class Viewer:
    def __init__(self, pc):
        self.pc, self.video, self.audio, self.pump = pc, _track("video"), _track("audio"), None


class WebRTCSink:
    """Any number of viewers (up to options.max_viewers). connect(offer_sdp) -> answer; one call per viewer."""

    def __init__(self, options: WebRTCOptions = WebRTCOptions()):
        self.options = options
        self.viewers: dict = {}             # RTCPeerConnection -> Viewer
        self._ice = ice_servers(options.ice_servers)
        if options.codec not in (None, "vp8", "h264"):
            raise AnitalkerError(f"unknown WebRTC codec {options.codec!r}; use vp8 or h264")
        if options.bitrate:
            set_bitrate(options.bitrate)

    async def open(self, spec) -> None:
        pass

    async def write(self, frame) -> None:
        live = [v for v in self.viewers.values() if v.pc.connectionState == "connected"]
        if not live:
            return
        import av
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.image), format="rgb24")
        vf.pts, vf.time_base = frame.pts * (VIDEO_CLOCK // FPS), Fraction(1, VIDEO_CLOCK)
        pcm = (np.clip(frame.audio, -1, 1) * 32767).astype("<i2")[None]
        af = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, frame.pts * len(frame.audio), Fraction(1, SAMPLE_RATE)
        for v in live:                       # encoders only read the frames, so viewers share them
            v.video.put(vf)
            v.audio.put(af)

    async def connect(self, offer_sdp: str, on_audio=None):
        """Answer a browser's offer (video + audio m-lines). on_audio(pcm (N,) float32, rate), if given, gets
        the audio the peer sends (its microphone). Returns (pc, answer_sdp)."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
        if len(self.viewers) >= self.options.max_viewers:
            raise AnitalkerError(f"too many viewers (at most {self.options.max_viewers})")
        if self.options.port_range:
            use_port_range(asyncio.get_running_loop(), *self.options.port_range)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice))
        viewer = self.viewers[pc] = Viewer(pc)

        @pc.on("connectionstatechange")
        async def _state():
            if pc.connectionState in ("failed", "closed"):
                await self.disconnect(pc)

        @pc.on("track")
        def _track_in(track):
            if track.kind == "audio" and on_audio is not None:
                viewer.pump = asyncio.ensure_future(_pump(track, on_audio))

        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            for track in (viewer.video, viewer.audio):
                pc.addTrack(track)
            if self.options.codec:
                mime = "video/" + self.options.codec
                for t in pc.getTransceivers():
                    if t.kind == "video":
                        caps = RTCRtpSender.getCapabilities("video").codecs
                        t.setCodecPreferences([c for c in caps if c.mimeType.lower() in (mime, "video/rtx")])
            await pc.setLocalDescription(await pc.createAnswer())   # gathers all candidates (no trickle)
        except Exception as e:
            await self.disconnect(pc)
            raise AnitalkerError(f"WebRTC negotiation failed: {e}") from e
        return pc, pc.localDescription.sdp

    async def disconnect(self, pc) -> None:
        viewer = self.viewers.pop(pc, None)
        if viewer is None:
            return
        if viewer.pump:
            viewer.pump.cancel()
        viewer.video.stop()
        viewer.audio.stop()
        await pc.close()

    async def aclose(self) -> None:
        for pc in list(self.viewers):
            await self.disconnect(pc)


async def _pump(track, on_audio) -> None:
    from aiortc.mediastreams import MediaStreamError
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        x = frame.to_ndarray()                        # packed s16: (1, N * channels)
        x = x.reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
        try:
            on_audio(x.astype(np.float32), frame.sample_rate)
        except AnitalkerError as e:                   # the session's input is full: lose this 20 ms
            log.debug("microphone audio dropped: %s", e)

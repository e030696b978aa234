"""WebRTC out (and a browser's microphone and camera in) with aiortc: a Sink that sends each released AvFrame to every
connected viewer as one video and one audio track.

Timing: the clock paces writes, so the tracks never sleep; they hand out what the sink queued. Video and
audio of a frame get timestamps from the same frame pts (video pts*3600 at 90 kHz, audio pts*1920 at 48 kHz:
the frame's own 48 kHz sound, meta["audio48k"])
and are queued to a viewer together, and only once its connection is up, so both RTP streams start on the
same frame and the sender reports (RTCP SR) map them to the same wall time: the browser lip-syncs from those.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from avatar.timebase import FPS, OUT_RATE, OUT_SAMPLES_PER_FRAME
from models.errors import AnitalkerError

try:
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
except ImportError:      # this module is imported only when WebRTC is asked for: say what to install
    raise AnitalkerError("aiortc is not installed: pip install 'anitalker-live[webrtc]'") from None

log = logging.getLogger(__name__)
VIDEO_CLOCK = 90000
QUEUE_FRAMES = 25          # per viewer: a stalled peer loses its oldest second, memory stays bounded


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


class QueueTrack(MediaStreamTrack):
    """Frames queued by the sink, handed to aiortc's sender as it asks for them (no pacing here)."""

    def __init__(self, kind: str, maxlen: int):
        super().__init__()
        self.kind = kind
        self.q = collections.deque(maxlen=maxlen)
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


class Viewer:
    def __init__(self, pc):
        self.pc, self.pumps = pc, []
        self.video = QueueTrack("video", QUEUE_FRAMES)
        self.audio = QueueTrack("audio", 2 * QUEUE_FRAMES)        # 20 ms frames


class WebRTCSink:
    """Any number of viewers (up to options.max_viewers). connect(offer_sdp) -> answer; one call per viewer."""

    def __init__(self, options: WebRTCOptions = WebRTCOptions()):
        self.options = options
        self.viewers: dict = {}             # RTCPeerConnection -> Viewer
        self.ice = ice_servers(options.ice_servers)
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
        image = np.ascontiguousarray(frame.image)
        pcm = (np.clip(frame.meta["audio48k"], -1, 1) * 32767).astype("<i2")[None]
        for v in live:     # a frame each: PyAV frames keep conversion state, and encoders run on threads
            vf = av.VideoFrame.from_ndarray(image, format="rgb24")
            vf.pts, vf.time_base = frame.pts * (VIDEO_CLOCK // FPS), Fraction(1, VIDEO_CLOCK)
            v.video.put(vf)
            # aiortc stamps each audio frame's Opus packets with one timestamp: hand it 20 ms at a time
            for i in (0, OUT_RATE // 50):
                af = av.AudioFrame.from_ndarray(pcm[:, i:i + OUT_RATE // 50], format="s16", layout="mono")
                af.sample_rate, af.pts = OUT_RATE, frame.pts * OUT_SAMPLES_PER_FRAME + i
                af.time_base = Fraction(1, OUT_RATE)
                v.audio.put(af)

    async def connect(self, offer_sdp: str, on_audio=None, on_video=None):
        """Answer a browser's offer (video + audio m-lines). on_audio(pcm (N,) float32, rate), if given, gets
        the audio the peer sends (its microphone); on_video(rgb (H, W, 3) uint8, arrival time.monotonic()),
        if given, each frame of the video it sends (its camera). Returns (pc, answer_sdp)."""
        if len(self.viewers) >= self.options.max_viewers:
            raise AnitalkerError(f"too many viewers (at most {self.options.max_viewers})")
        if self.options.port_range:
            use_port_range(asyncio.get_running_loop(), *self.options.port_range)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice))
        viewer = self.viewers[pc] = Viewer(pc)

        @pc.on("connectionstatechange")
        async def _state():
            if pc.connectionState in ("failed", "closed"):
                await self.disconnect(pc)

        @pc.on("track")
        def _track_in(track):
            take = {"audio": _audio_in, "video": _video_in}[track.kind]
            if (on := on_audio if track.kind == "audio" else on_video) is not None:
                viewer.pumps.append(asyncio.ensure_future(_pump(track, take, on)))

        try:
            # transceivers made before the offer is applied take its m-lines, codec preferences included
            video = pc.addTransceiver(viewer.video, direction="sendonly" if on_video is None else "sendrecv")
            # recv only with a taker: aiortc queues what a peer sends until it is read, without bound
            pc.addTransceiver(viewer.audio, direction="sendonly" if on_audio is None else "sendrecv")
            if self.options.codec:
                mime = "video/" + self.options.codec
                caps = RTCRtpSender.getCapabilities("video").codecs
                video.setCodecPreferences([c for c in caps if c.mimeType.lower() in (mime, "video/rtx")])
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())   # gathers all candidates (no trickle)
        except Exception as e:
            await self.disconnect(pc)
            raise AnitalkerError(f"WebRTC negotiation failed: {e}") from e
        return pc, pc.localDescription.sdp

    async def disconnect(self, pc) -> None:
        viewer = self.viewers.pop(pc, None)
        if viewer is None:
            return
        for pump in viewer.pumps:         # the peer's camera and mic: nothing of them is kept
            pump.cancel()
        viewer.video.stop()
        viewer.audio.stop()
        await pc.close()

    async def aclose(self) -> None:
        for pc in list(self.viewers):
            await self.disconnect(pc)


async def _pump(track, take, on) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        try:
            on(*take(frame))
        except AnitalkerError as e:                   # the session's input is full: lose this piece
            log.debug("peer media dropped: %s", e)


def _audio_in(frame):
    x = frame.to_ndarray()                            # packed s16: (1, N * channels)
    x = x.reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
    return x.astype(np.float32), frame.sample_rate


def _video_in(frame):
    # the arrival time stands in for the capture time: the browser's clock is not ours
    return frame.to_ndarray(format="rgb24"), time.monotonic()

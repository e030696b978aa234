"""The avatar's server: one `websockets` server for the page (plain HTTP GET) and one WebSocket API.

One session, one avatar: every client drives the same Session and every viewer sees it. A reenacting
session (its animator has calibrate) is in reenact mode; given ``camera`` (a LatestFrame) it takes a
browser's camera as its driving frames (one camera at a time: the first that sends keeps it until it has
been quiet for a second). GET / serves the page (streaming/static, no build step). /ws speaks JSON text messages, each {"op": ...}, plus binary PCM:

    -> {"op": "offer", "sdp": S}                      <- {"op": "answer", "sdp": S}  (WebRTC video + audio;
                                                         a sendrecv audio m-line carries the browser's mic,
                                                         in reenact mode a sendrecv video m-line its camera)
    -> {"op": "audio", "rate": 48000, "format": "s16"|"f32", "live": false}
                                                      then binary messages: mono little-endian PCM.
                                                      live: true for audio captured in real time (a remote
                                                      mic): when the engine falls behind its oldest part is
                                                      dropped, so latency stays bounded; false (default)
                                                      plays every sample (files, TTS)
    -> {"op": "say", "text": T}                       (TTS, one sentence at a time)
    -> {"op": "interrupt"}
    -> {"op": "controls", "yaw": deg, "pitch": deg, "roll": deg, "location": x, "scale": s}
                                                      keys left out keep their value; null: predicted from
                                                      speech; degrees within [-90, 90], location and scale
                                                      within [0, 1]. Only the controls the model has
                                                      (config's "controls") are accepted
    -> {"op": "calibrate"}                            (reenact --mode relative: the next camera frame is the
                                                      neutral face; an error in absolute mode)
    -> {"op": "stats", ...}                           (the page's getStats figures, kept per client)
    <- {"op": "config", "ice_servers": [...], "mode": "audio"|"reenact", "camera": bool, "calibrate": bool,
        "controls": ["pose", "location", "scale"]}    once (camera: the server takes the browser's camera;
                                                      calibrate: reenactment in relative mode; controls: what
                                                      the loaded model takes, possibly none)
    <- {"op": "metrics", ...} every second
    <- {"op": "error", "error": why}                  for a bad message (to its sender), or an error the
                                                      engine survived (to everyone); the session goes on

Bounds: 1 MiB per message, max_clients connections; a client that leaves takes its peer connection along.
Binding an address other than loopback needs a token (?token= on /ws); browsers must come from the
page's own origin, so another web site cannot drive a local server.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from models.errors import AnitalkerError

from .sources import TTSSource, espeak_pcm

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_MESSAGE = 1 << 20
MAX_TEXT = 5000
CAMERA_HANDOVER_S = 1.0


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise AnitalkerError(f"{what} must be finite numbers, got {v!r}")
    return float(v)


def check_bind(host: str, token: str | None) -> str | None:
    """The token to require: --token, else $ANITALKER_TOKEN; refuse a non-loopback address without one."""
    token = token or os.environ.get("ANITALKER_TOKEN") or None
    if host not in LOOPBACK and not token:
        raise AnitalkerError(f"refusing to serve on {host} without a token: pass --token or set ANITALKER_TOKEN")
    return token


class Client:
    def __init__(self, ws):
        self.ws, self.pc, self.rate, self.format, self.live, self.stats = ws, None, None, None, False, {}


class AvatarServer:
    def __init__(self, session, sink, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 max_clients: int = 8, tts=espeak_pcm, voice: str | None = None, camera=None):
        self.session, self.sink, self.host, self.port, self.camera = session, sink, host, port, camera
        self._camera_owner = (None, 0.0)            # (client, time of its last frame)
        self.token = check_bind(host, token)
        self.max_clients, self.tts, self.voice = max_clients, tts, voice
        self.clients: set[Client] = set()
        self._speech: set[asyncio.Task] = set()
        self._speech_lock = asyncio.Lock()
        self._notes: set[asyncio.Task] = set()      # error messages on their way to clients
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    async def start(self) -> AvatarServer:
        from websockets.asyncio.server import serve
        self.session.on_error.append(self._engine_error)
        self._server = await serve(self._client, self.host, self.port, process_request=self._http,
                                   max_size=MAX_MESSAGE, max_queue=16)
        self.port = self._server.sockets[0].getsockname()[1]       # port 0: the one the OS chose
        return self

    def _engine_error(self, message: str) -> None:
        """An error the session survived: every client hears it once."""
        for client in list(self.clients):
            task = asyncio.ensure_future(self._send(client.ws, {"op": "error", "error": message}))
            self._notes.add(task)
            task.add_done_callback(self._notes.discard)

    @staticmethod
    async def _send(ws, msg: dict) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            await ws.send(json.dumps(msg))
        except ConnectionClosed:
            pass

    async def aclose(self) -> None:
        if self._engine_error in self.session.on_error:
            self.session.on_error.remove(self._engine_error)
        for task in list(self._speech):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.aclose()

    # ---- HTTP: the page, and the checks before a WebSocket is accepted ------------------------------
    def _http(self, connection, request):
        url = urlsplit(request.path)
        if url.path in PAGES:
            name, kind = PAGES[url.path]
            response = connection.respond(200, (STATIC / name).read_text())
            response.headers["Content-Type"] = kind + "; charset=utf-8"
            response.headers["Cache-Control"] = "no-store"
            return response
        if url.path != "/ws":
            return connection.respond(404, "not found\n")
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.headers.get("Host"):
            return connection.respond(403, "cross-origin WebSocket refused\n")
        given = parse_qs(url.query).get("token", [""])[0]
        if self.token and not hmac.compare_digest(given.encode(), self.token.encode()):
            return connection.respond(401, "bad or missing token\n")
        if len(self.clients) >= self.max_clients:
            return connection.respond(503, "too many clients\n")
        return None

    # ---- one WebSocket client -----------------------------------------------------------------------
    async def _client(self, ws) -> None:
        client = Client(ws)
        self.clients.add(client)
        ticker = asyncio.create_task(self._metrics(ws))
        try:
            ice = [{k: v for k, v in (("urls", s.urls), ("username", s.username), ("credential", s.credential))
                    if v} for s in self.sink.ice]
            mode = "reenact" if hasattr(self.session.animator, "calibrate") else "audio"
            await ws.send(json.dumps({"op": "config", "ice_servers": ice, "mode": mode,
                                      "camera": self.camera is not None, "calibrate": self._calibrates(),
                                      "controls": list(self.session.controls)}))
            async for message in self._messages(ws):
                try:
                    if isinstance(message, bytes):
                        self._pcm(client, message)
                    else:
                        await self._command(client, json.loads(message))
                except Exception as e:      # a bad message costs its sender an error reply, nothing more
                    log.debug("bad message", exc_info=True)
                    await ws.send(json.dumps({"op": "error", "error": str(e) or type(e).__name__}))
        finally:
            ticker.cancel()
            self.clients.discard(client)
            for stream in ((client, "mic"), (client, "pcm")):
                self.session.close_stream(stream)
            if client.pc is not None:
                await self.sink.disconnect(client.pc)

    @staticmethod
    async def _messages(ws):
        """The client's messages until it leaves; a connection that drops without a close frame is one
        line in the log, not a traceback."""
        from websockets.exceptions import ConnectionClosedError
        try:
            async for message in ws:
                yield message
        except ConnectionClosedError as e:
            log.info("client %s left without closing: %s", ws.remote_address, e)

    async def _command(self, client: Client, msg) -> None:
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "offer":
            if client.pc is not None:                   # a renegotiating page replaces its connection
                await self.sink.disconnect(client.pc)
                client.pc = None
            def mic(pcm, rate):              # its own resampler; live: latency beats completeness
                self._push(pcm, rate, live=True, stream=(client, "mic"))
            on_video = None if self.camera is None else (lambda rgb, t: self._camera(client, rgb, t))
            client.pc, answer = await self.sink.connect(str(msg["sdp"]), on_audio=mic, on_video=on_video)
            await client.ws.send(json.dumps({"op": "answer", "sdp": answer}))
        elif op == "audio":
            rate, fmt, live = msg.get("rate"), msg.get("format", "s16"), msg.get("live", False)
            if not isinstance(rate, int) or not 8000 <= rate <= 192000 or fmt not in ("s16", "f32") \
                    or not isinstance(live, bool):
                raise AnitalkerError('audio needs "rate" (int, 8000-192000), "format" ("s16" or "f32") and '
                                     'optionally "live" (true or false)')
            client.rate, client.format, client.live = rate, fmt, live
        elif op == "say":
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
                raise AnitalkerError(f'say needs "text": 1 to {MAX_TEXT} characters')
            task = asyncio.create_task(self._say(text, client.ws))
            self._speech.add(task)
            task.add_done_callback(self._speech.discard)
        elif op == "interrupt":
            for task in list(self._speech):
                task.cancel()
            self.session.interrupt()
        elif op == "controls":
            self._controls(msg)
        elif op == "calibrate":
            if not hasattr(self.session.animator, "calibrate"):
                raise AnitalkerError("calibrate needs reenactment (anitalker reenact); this avatar is driven by audio")
            if not self._calibrates():
                raise AnitalkerError("calibrate works in relative mode (anitalker reenact --mode relative); "
                                     "absolute mode uses the driving face as it is")
            self.session.animator.calibrate()           # thread-safe: taken up by the engine's next frame
        elif op == "stats":
            client.stats = {k: v for k, v in msg.items() if k != "op"}
        else:
            raise AnitalkerError(f"unknown op {op!r}; use offer, audio, say, interrupt, controls, calibrate or stats")

    def _calibrates(self) -> bool:
        """Whether calibrate does something: a reenactment in relative mode (absolute mode ignores it)."""
        animator = self.session.animator
        return hasattr(animator, "calibrate") and getattr(getattr(animator, "config", None), "mode", None) != "absolute"

    def _camera(self, client: Client, rgb, t: float) -> None:
        """One camera drives at a time: frames from two browsers interleaved would make the face jump
        between people. The driving one keeps it until it has sent nothing for CAMERA_HANDOVER_S."""
        owner, last = self._camera_owner
        if owner is not client and owner in self.clients and t - last < CAMERA_HANDOVER_S:
            return
        self._camera_owner = (client, t)
        self.camera.put(rgb, t)

    def _pcm(self, client: Client, data: bytes) -> None:
        if client.rate is None:
            raise AnitalkerError('send {"op": "audio", "rate": R, "format": "s16"|"f32"} before binary PCM')
        dtype = np.dtype("<i2" if client.format == "s16" else "<f4")
        if len(data) % dtype.itemsize:
            raise AnitalkerError(f"binary PCM length {len(data)} is not a multiple of {dtype.itemsize} bytes")
        x = np.frombuffer(data, dtype)
        x = x / np.float32(32768) if client.format == "s16" else np.nan_to_num(np.clip(x, -1, 1))
        self._push(x, client.rate, live=client.live, stream=(client, "pcm"))

    def _push(self, pcm, rate: int, **kw) -> None:
        self.session.push(pcm, rate, **kw)  # raises when the input queue is full: the sender hears why

    async def _say(self, text: str, ws) -> None:
        async with self._speech_lock:       # texts are spoken in the order they came
            try:
                async for chunk in TTSSource(text, voice=self.voice, engine=self.tts):
                    self._push(chunk.samples, 16000)
            except AnitalkerError as e:
                await ws.send(json.dumps({"op": "error", "error": str(e)}))

    def _controls(self, msg: dict) -> None:
        """Validated here, so a control the model lacks or a bad value is this client's error reply and
        never reaches the engine."""
        from dataclasses import replace

        from avatar.pipeline import Controls
        unknown = set(msg) - {"op", "yaw", "pitch", "roll", "location", "scale"}
        if unknown:
            raise AnitalkerError(f"controls takes yaw, pitch, roll, location and scale, not {', '.join(sorted(unknown))}")
        changes = {}
        axes = [msg.get(k) for k in ("yaw", "pitch", "roll")]
        if any(k in msg for k in ("yaw", "pitch", "roll")):
            if all(a is None for a in axes):
                changes["pose"] = None
            else:
                deg = np.array([0.0 if a is None else _number(a, "yaw, pitch and roll") for a in axes])
                if np.abs(deg).max() > 90:
                    raise AnitalkerError(f"yaw, pitch and roll are degrees within [-90, 90], got {deg.tolist()}")
                changes["pose"] = (deg / 90).astype(np.float32)   # normalised as the model was trained
        for k in ("location", "scale"):
            if k in msg:
                changes[k] = None if msg[k] is None else _number(msg[k], k)
        current = getattr(self.session.animator, "controls", None) or Controls()
        self.session.set_controls(replace(current, **changes))   # checks the model has them; next hop

    async def _metrics(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed
        while True:
            await asyncio.sleep(1)
            m = self.session.summary()
            m.update(op="metrics", viewers=len(self.sink.viewers), clients=len(self.clients))
            try:
                await ws.send(json.dumps(m, default=float))
            except ConnectionClosed:
                return

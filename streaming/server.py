"""The avatar's server: one `websockets` server for the page (plain HTTP GET) and one WebSocket API.

Each client gets its avatar from ``avatars``: an AvatarPool gives every client a session of its own (its
portrait, audio, controls, interrupts and metrics; `live --serve`), a SharedAvatar gives all of them one
(reenactment, and --serve with outputs that record one avatar). A reenacting session (its animator has
calibrate) is in reenact mode; given ``camera`` (a LatestFrame) it takes a browser's camera as its driving
frames (one camera at a time: the first that sends keeps it until it has been quiet for a second). GET /
serves the page (streaming/static, no build step). /ws speaks JSON text messages, each {"op": ...}, plus
binary PCM:

    -> {"op": "offer", "sdp": S}                      <- {"op": "answer", "sdp": S}  (WebRTC video + audio;
                                                         a sendrecv audio m-line carries the browser's mic,
                                                         in reenact mode a sendrecv video m-line its camera)
    -> {"op": "audio", "rate": 48000, "format": "s16"|"f32", "live": false}
                                                      then binary messages: mono little-endian PCM.
                                                      live: true for audio captured in real time (a remote
                                                      mic): when the engine falls behind its oldest part is
                                                      dropped, so latency stays bounded; false (default)
                                                      plays every sample (files, TTS), at most MAX_QUEUED_S
                                                      ahead of what is shown: more is an error reply
    -> {"op": "say", "text": T}                       (TTS, one sentence at a time; at most MAX_TEXTS
                                                      waiting, MAX_TEXT characters each)
    -> {"op": "portrait", "image": B64}               a JPEG/PNG/WebP photo (base64, up to 2048 px a side):
                                                      <- {"op": "portrait", "width": W, "height": H} once the
                                                      client's avatar wears it; its video starts anew, so
                                                      the page sends a new offer. Own-session servers only
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
        "controls": ["pose", "location", "scale"], "portrait": bool, "own": bool}
                                                      once (camera: the server takes the browser's camera;
                                                      calibrate: reenactment in relative mode; controls: what
                                                      the loaded model takes, possibly none; portrait: the
                                                      page may send one; own: the avatar is this client's)
    <- {"op": "metrics", ...} every second            (the session's summary, viewers, clients, sessions)
    <- {"op": "idle", "reason": why}                  before the server closes a client that sent nothing
                                                      and watched nothing for idle_timeout seconds
    <- {"op": "error", "error": why}                  for a bad message (to its sender), or an error the
                                                      engine survived (to the clients of that avatar); the
                                                      session goes on

Bounds: 1 MiB per message, at most max_clients connections (a pool: max_sessions), a client's queued
audio and texts as above; a client that leaves takes its peer connection, its queued speech and (a pool)
its session along. Only GET (else 405) with one Host header (else 400). Binding an address other than
loopback needs a token (?token= on /ws); without one only loopback Host names with this port are served
(127.0.0.1, localhost, [::1]: a DNS-rebinding page names its own host), and a browser's Origin must be
the Host it asks, so another web site cannot drive a local server.
"""
from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from models.errors import AnitalkerError

from .avatars import Full, SharedAvatar, decode_portrait
from .sources import TTSSource, espeak_pcm

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_MESSAGE = 1 << 20
MAX_QUEUE = 4              # messages websockets buffers per client: 4 MiB at most, not 16
MAX_TEXT = 5000
MAX_TEXTS = 8              # say texts waiting or being spoken, per client
MAX_QUEUED_S = 60.0        # non-live audio a client may have queued ahead of what is shown
IDLE_TIMEOUT_S = 300.0
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
    def __init__(self, ws, avatar=None):
        self.ws, self.avatar, self.pc, self.rate, self.format, self.live, self.stats = ws, avatar, None, None, None, False, {}
        self.speech: set[asyncio.Task] = set()      # its say texts, waiting or being spoken
        self.queued_until = 0.0                     # when the non-live audio it pushed will have played
        self.last_input = time.monotonic()

    @property
    def queued_s(self) -> float:
        return max(0.0, self.queued_until - time.monotonic())

    def queue(self, seconds: float) -> None:
        self.queued_until = max(self.queued_until, time.monotonic()) + seconds


class AvatarServer:
    """AvatarServer(session, sink): every client shares that session (run by the caller);
    AvatarServer(avatars=AvatarPool(...)): a session per client. idle_timeout: seconds a client may go
    without input and without a connected viewer before it is released (None: never)."""

    def __init__(self, session=None, sink=None, *, avatars=None, host: str = "127.0.0.1", port: int = 8080,
                 token: str | None = None, max_clients: int = 8, tts=espeak_pcm, voice: str | None = None,
                 camera=None, idle_timeout: float | None = IDLE_TIMEOUT_S):
        self.avatars = avatars or SharedAvatar(session, sink, max_clients)
        self.session, self.sink, self.host, self.port, self.camera = session, sink, host, port, camera
        self._camera_owner = (None, 0.0)            # (client, time of its last frame)
        self.token = check_bind(host, token)
        self.tts, self.voice, self.idle_timeout = tts, voice, idle_timeout
        self.clients: set[Client] = set()
        self._hooks = {}                            # avatar -> its session's on_error callback
        self._notes: set[asyncio.Task] = set()      # error messages on their way to clients
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    async def start(self) -> AvatarServer:
        from websockets.asyncio.server import serve
        self._server = await serve(self._client, self.host, self.port, process_request=self._http,
                                   max_size=MAX_MESSAGE, max_queue=MAX_QUEUE)
        self.port = self._server.sockets[0].getsockname()[1]       # port 0: the one the OS chose
        return self

    def _attach(self, avatar) -> None:
        """Errors its session survives reach the clients of that avatar, once each."""
        if avatar not in self._hooks:
            self._hooks[avatar] = lambda message: self._engine_error(avatar, message)
            avatar.session.on_error.append(self._hooks[avatar])

    def _detach(self, avatar) -> None:
        hook = self._hooks.pop(avatar, None)
        if hook is not None and hook in avatar.session.on_error:
            avatar.session.on_error.remove(hook)

    def _engine_error(self, avatar, message: str) -> None:
        for client in [c for c in self.clients if c.avatar is avatar]:
            task = asyncio.ensure_future(self._send(client.ws, {"op": "error", "error": message}))
            self._notes.add(task)
            task.add_done_callback(self._notes.discard)

    @staticmethod
    async def _send(ws, msg: dict) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            await ws.send(json.dumps(msg, default=float))
        except ConnectionClosed:
            pass

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()                    # its clients leave: their speech and sessions end
            await self._server.wait_closed()
        for avatar in list(self._hooks):
            self._detach(avatar)
        await self.avatars.aclose()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.aclose()

    # ---- HTTP: the page, and the checks before a WebSocket is accepted ------------------------------
    def _respond(self, connection, status: int, body: str, kind: str = "text/plain"):
        response = connection.respond(status, body)
        del response.headers["Content-Type"]        # respond() set text/plain: one Content-Type, ours
        response.headers["Content-Type"] = kind + "; charset=utf-8"
        response.headers["Cache-Control"] = "no-store"
        if status == 405:
            response.headers["Allow"] = "GET"
        return response

    def _host_refused(self, host: str) -> str | None:
        """Without a token the server is for this machine: a Host naming anything but loopback (a DNS
        rebinding page asks with its own name) is refused."""
        if self.token:
            return None
        names = {f"{n}:{self.port}" for n in ("127.0.0.1", "localhost", "[::1]")}
        if self.port == 80:
            names |= {"127.0.0.1", "localhost", "[::1]"}
        return None if host.lower() in names else f"Host {host!r} is not this server's name; use {self.url}\n"

    def _http(self, connection, request):
        if request.method != "GET":
            return self._respond(connection, 405, f"{request.method} is not served here; only GET\n")
        hosts = request.headers.get_all("Host")
        if len(hosts) != 1:
            return self._respond(connection, 400, "a request needs exactly one Host header\n")
        if why := self._host_refused(hosts[0]):
            return self._respond(connection, 403, why)
        url = urlsplit(request.path)
        full = self.avatars.full(len(self.clients))
        if url.path == "/" and full:
            return self._respond(connection, 503, FULL_PAGE.format(html.escape(full)), "text/html")
        if url.path in PAGES:
            name, kind = PAGES[url.path]
            return self._respond(connection, 200, (STATIC / name).read_text(), kind)
        if url.path != "/ws":
            return self._respond(connection, 404, "not found\n")
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc.lower() != hosts[0].lower():
            return self._respond(connection, 403, "cross-origin WebSocket refused\n")
        given = parse_qs(url.query).get("token", [""])[0]
        if self.token and not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._respond(connection, 401, "bad or missing token\n")
        if full:
            return self._respond(connection, 503, full + "\n")
        return None

    # ---- one WebSocket client -----------------------------------------------------------------------
    async def _client(self, ws) -> None:
        try:
            avatar = await self.avatars.open()
        except Full as e:                   # another client took the last place since the handshake
            await ws.close(1013, str(e)[:120])
            return
        except Exception as e:              # noqa: BLE001 -- the engine could not be made: this client hears why
            log.warning("could not open an avatar: %s", e)
            await self._send(ws, {"op": "error", "error": f"could not start an avatar: {e}"})
            await ws.close(1011, "could not start an avatar")
            return
        client = Client(ws, avatar)
        self.clients.add(client)
        self._attach(avatar)
        ticker = asyncio.create_task(self._tick(client))
        try:
            await self._send(ws, self._config(client))
            async for message in self._messages(ws):
                client.last_input = time.monotonic()
                try:
                    if isinstance(message, bytes):
                        self._pcm(client, message)
                    else:
                        await self._command(client, json.loads(message))
                except Exception as e:      # a bad message costs its sender an error reply, nothing more
                    log.debug("bad message", exc_info=True)
                    await self._send(ws, {"op": "error", "error": str(e) or type(e).__name__})
        finally:
            ticker.cancel()
            self.clients.discard(client)
            await self._leave(client)

    async def _leave(self, client: Client) -> None:
        """What the client started ends with it: its texts, its resampler state, its peer connection and
        (its own) session with whatever speech it had queued."""
        for task in list(client.speech):
            task.cancel()
        for stream in ((client, "mic"), (client, "pcm")):
            client.avatar.session.close_stream(stream)
        if client.pc is not None:
            await client.avatar.sink.disconnect(client.pc)
            client.pc = None
        if self.avatars.own:
            self._detach(client.avatar)
            await self.avatars.close(client.avatar)

    def _config(self, client: Client) -> dict:
        ice = [{k: v for k, v in (("urls", s.urls), ("username", s.username), ("credential", s.credential))
                if v} for s in client.avatar.sink.ice]
        session = client.avatar.session
        mode = "reenact" if hasattr(session.animator, "calibrate") else "audio"
        return {"op": "config", "ice_servers": ice, "mode": mode, "camera": self.camera is not None,
                "calibrate": self._calibrates(session), "controls": list(session.controls),
                "portrait": self.avatars.portraits, "own": self.avatars.own}

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
        session = client.avatar.session
        if op == "offer":
            if client.pc is not None:                   # a renegotiating page replaces its connection
                await client.avatar.sink.disconnect(client.pc)
                client.pc = None
            def mic(pcm, rate):              # its own resampler; live: latency beats completeness
                self._push(client, pcm, rate, live=True, stream=(client, "mic"))
            on_video = None if self.camera is None else (lambda rgb, t: self._camera(client, rgb, t))
            client.pc, answer = await client.avatar.sink.connect(str(msg["sdp"]), on_audio=mic, on_video=on_video)
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
            if len(client.speech) >= MAX_TEXTS:
                raise AnitalkerError(f"{MAX_TEXTS} texts are waiting to be spoken already; send more when "
                                     "they are done, or interrupt")
            task = asyncio.create_task(self._say(client, text))
            client.speech.add(task)
            task.add_done_callback(client.speech.discard)
        elif op == "portrait":
            await self._portrait(client, msg.get("image"))
        elif op == "interrupt":
            for other in [c for c in self.clients if c.avatar is client.avatar]:
                for task in list(other.speech):     # the session drops all queued speech: so do its texts
                    task.cancel()
                other.queued_until = 0.0
            session.interrupt()
        elif op == "controls":
            self._controls(session, msg)
        elif op == "calibrate":
            if not hasattr(session.animator, "calibrate"):
                raise AnitalkerError("calibrate needs reenactment (anitalker reenact); this avatar is driven by audio")
            if not self._calibrates(session):
                raise AnitalkerError("calibrate works in relative mode (anitalker reenact --mode relative); "
                                     "absolute mode uses the driving face as it is")
            session.animator.calibrate()           # thread-safe: taken up by the engine's next frame
        elif op == "stats":
            client.stats = {k: v for k, v in msg.items() if k != "op"}
        else:
            raise AnitalkerError(f"unknown op {op!r}; use offer, audio, say, portrait, interrupt, controls, "
                                 "calibrate or stats")

    async def _portrait(self, client: Client, image) -> None:
        """The client's avatar anew with this photo. A photo that cannot be used leaves the old avatar
        as it was; a good one ends the old session (its speech too) and the page connects again."""
        if not self.avatars.portraits:
            raise AnitalkerError("this server's avatar takes no portrait from its clients")
        rgb = decode_portrait(image)
        new = await self.avatars.replace(client.avatar, rgb)
        old, client.avatar = client.avatar, new
        for task in list(client.speech):
            task.cancel()
        client.queued_until, client.pc = 0.0, None      # the old sink took its peer connection along
        self._detach(old)
        self._attach(new)
        h, w = rgb.shape[:2]
        await client.ws.send(json.dumps({"op": "portrait", "width": w, "height": h}))

    @staticmethod
    def _calibrates(session) -> bool:
        """Whether calibrate does something: a reenactment in relative mode (absolute mode ignores it)."""
        animator = session.animator
        return hasattr(animator, "calibrate") and getattr(getattr(animator, "config", None), "mode", None) != "absolute"

    def _camera(self, client: Client, rgb, t: float) -> None:
        """One camera drives at a time: frames from two browsers interleaved would make the face jump
        between people. The driving one keeps it until it has sent nothing for CAMERA_HANDOVER_S."""
        owner, last = self._camera_owner
        if owner is not client and owner in self.clients and t - last < CAMERA_HANDOVER_S:
            return
        self._camera_owner = (client, t)
        client.last_input = time.monotonic()
        self.camera.put(rgb, t)

    def _pcm(self, client: Client, data: bytes) -> None:
        if client.rate is None:
            raise AnitalkerError('send {"op": "audio", "rate": R, "format": "s16"|"f32"} before binary PCM')
        dtype = np.dtype("<i2" if client.format == "s16" else "<f4")
        if len(data) % dtype.itemsize:
            raise AnitalkerError(f"binary PCM length {len(data)} is not a multiple of {dtype.itemsize} bytes")
        seconds = len(data) / dtype.itemsize / client.rate
        if not client.live and client.queued_s + seconds > MAX_QUEUED_S:   # checked before it is decoded
            raise AnitalkerError(f"{client.queued_s:.0f} s of audio are queued already (at most {MAX_QUEUED_S:.0f}); "
                                 "send audio no faster than it plays, or mark it live")
        x = np.frombuffer(data, dtype)
        x = x / np.float32(32768) if client.format == "s16" else np.nan_to_num(np.clip(x, -1, 1))
        self._push(client, x, client.rate, live=client.live, stream=(client, "pcm"))
        if not client.live:
            client.queue(seconds)

    def _push(self, client: Client, pcm, rate: int, **kw) -> None:
        client.avatar.session.push(pcm, rate, **kw)  # raises when the input queue is full: the sender hears why

    async def _say(self, client: Client, text: str) -> None:
        async with client.avatar.speaking:       # texts are spoken in the order they came
            try:
                async for chunk in TTSSource(text, voice=self.voice, engine=self.tts):
                    while client.queued_s > MAX_QUEUED_S:     # back-pressure: speech waits, memory stays bounded
                        await asyncio.sleep(0.5)
                    self._push(client, chunk.samples, 16000, hi=chunk.hi)    # the voice's own 48 kHz
                    client.queue(len(chunk.samples) / 16000)
            except AnitalkerError as e:
                await self._send(client.ws, {"op": "error", "error": str(e)})

    def _controls(self, session, msg: dict) -> None:
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
        current = getattr(session.animator, "controls", None) or Controls()
        session.set_controls(replace(current, **changes))   # checks the model has them; next hop

    def _idle(self, client: Client) -> bool:
        """No input, nothing queued to play, and no viewer connected, for idle_timeout seconds."""
        watching = client.pc is not None and client.pc.connectionState == "connected"
        return (self.idle_timeout is not None and not watching and client.queued_s == 0
                and time.monotonic() - client.last_input > self.idle_timeout)

    async def _tick(self, client: Client) -> None:
        """Once a second: the client's metrics; a client gone idle is released; a session that failed
        says why and ends its client."""
        ws = client.ws
        while True:
            await asyncio.sleep(1)
            task = client.avatar.task
            if task is not None and task.done():
                error = task.exception() if not task.cancelled() else None
                await self._send(ws, {"op": "error", "error": f"the avatar stopped: {error or 'ended'}"})
                await ws.close(1011, "the avatar stopped")
                return
            if self._idle(client):
                why = (f"nothing was sent or watched for {self.idle_timeout:g} s, so this avatar was released; "
                       "reload the page to start again")
                await self._send(ws, {"op": "idle", "reason": why})
                await ws.close(1000, "idle")
                return
            m = client.avatar.session.summary()
            m.update(getattr(client.avatar.session.animator, "stats", {}) or {})
            m.update(op="metrics", viewers=len(client.avatar.sink.viewers), clients=len(self.clients),
                     sessions=self.avatars.count, capacity=self.avatars.capacity)
            await self._send(ws, m)


FULL_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>anitalker live: full</title></head>
<body style="font: 16px system-ui, sans-serif; margin: 2em auto; max-width: 40em">
<h1>Talk to an avatar</h1>
<p id="status">{}</p>
</body></html>
"""

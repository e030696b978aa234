"""Where the server's clients get their avatar: a session of their own (AvatarPool), or one shared by all
(SharedAvatar: reenactment, and `live --serve` with outputs that record one avatar).

AvatarPool: each client gets its own Session and its own WebRTC sink, over one set of loaded models
(``make_animator(portrait_rgb or None) -> Animator``; None is the bundled portrait). A shared EngineWorker,
given as ``engine``, batches the sessions' work; without one each session's worker thread runs its own
animator over the shared models. At most ``max_sessions`` are open: the server refuses the next client
(HTTP 503) rather than slowing everyone down. A portrait change opens the client's avatar anew (a new
session and sink: its time base starts again, so the page negotiates a new WebRTC connection).

Portraits come from the page as base64 JPEG, PNG or WebP (the page downscales to 512 px); decode_portrait
checks the size before decoding, so a hostile image costs its sender an error reply and nothing more.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging

import numpy as np

from models.errors import AnitalkerError

log = logging.getLogger(__name__)
PORTRAIT_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_PORTRAIT_SIDE = 2048        # the page sends 512; a larger one only costs decoding time


def decode_portrait(data: str) -> np.ndarray:
    """Base64 JPEG / PNG / WebP -> uint8 (H, W, 3) RGB, upright; AnitalkerError with the reason if not."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from avatar.portrait import MIN_SIDE, to_rgb
    if not isinstance(data, str) or not data:
        raise AnitalkerError('portrait needs "image": a base64 JPEG or PNG')
    try:
        raw = base64.b64decode(data.split(",", 1)[-1], validate=True)     # a data: URL's prefix is skipped
    except (binascii.Error, ValueError):
        raise AnitalkerError("portrait image is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in PORTRAIT_FORMATS:
                raise AnitalkerError(f"portrait must be JPEG, PNG or WebP, not {img.format}")
            w, h = img.size                         # from the header: checked before any pixel is decoded
            if max(w, h) > MAX_PORTRAIT_SIDE or min(w, h) < MIN_SIDE:
                raise AnitalkerError(f"portrait is {w}x{h} pixels; send {MIN_SIDE} to "
                                     f"{MAX_PORTRAIT_SIDE} px on each side (the page sends 512)")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise AnitalkerError("portrait is not an image; send a JPEG or PNG photo") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise AnitalkerError(f"portrait cannot be decoded ({e}); send a JPEG or PNG photo") from None


class Avatar:
    """What a client drives and watches: a session, the WebRTC sink its viewers connect to, and the task
    running the session (None when someone else runs it)."""

    def __init__(self, session, sink, task=None):
        self.session, self.sink, self.task = session, sink, task
        self.speaking = asyncio.Lock()          # its say texts are spoken one after another


class Full(AnitalkerError):
    pass


class SharedAvatar:
    """Every client drives and sees one session, run by the caller."""
    portraits = False
    own = False                                 # the clients share it
    count = 1                                   # sessions open

    def __init__(self, session, sink, max_clients: int = 8):
        self.avatar, self.capacity = Avatar(session, sink), max_clients
        self.open_count = 0

    def full(self, clients: int) -> str | None:
        return f"this avatar has {self.capacity} clients already" if clients >= self.capacity else None

    async def open(self) -> Avatar:
        return self.avatar

    async def replace(self, avatar: Avatar, portrait) -> Avatar:
        raise AnitalkerError("this server's avatar is shared by every client: its portrait is fixed")

    async def close(self, avatar: Avatar) -> None:
        pass

    async def aclose(self) -> None:
        pass


class AvatarPool:
    """A session per client over one engine. make_animator(portrait rgb or None) builds a client's
    animator (it runs on a thread: encoding a portrait takes a moment). portraits=False: the animator
    ignores portraits (the test pattern), so the page offers no chooser."""
    own = True

    def __init__(self, make_animator, *, max_sessions: int = 4, webrtc=None, engine=None, lead_frames=None,
                 portraits: bool = True, time_source=None):
        if max_sessions < 1:
            raise AnitalkerError(f"--max-sessions must be at least 1, got {max_sessions}")
        self.make_animator, self.capacity, self.engine = make_animator, max_sessions, engine
        self.webrtc, self.lead_frames, self.portraits, self.time_source = webrtc, lead_frames, portraits, time_source
        self.avatars: set[Avatar] = set()
        self.opening = 0                        # sessions being built (their animator on a thread)
        self.served = 0

    @property
    def count(self) -> int:
        return len(self.avatars)

    def full(self, clients: int) -> str | None:
        if max(clients, len(self.avatars) + self.opening) >= self.capacity:
            return (f"The server is full: it runs {self.capacity} avatar{'s' * (self.capacity != 1)} at "
                    "once (--max-sessions); try again when someone leaves")
        return None

    async def open(self, portrait=None) -> Avatar:
        if len(self.avatars) + self.opening >= self.capacity:
            raise Full(self.full(0))
        self.opening += 1
        try:
            animator = await self._build(portrait)
        finally:
            self.opening -= 1
        return self._start(animator)

    async def replace(self, avatar: Avatar, portrait: np.ndarray) -> Avatar:
        """The client's avatar with a new portrait. The animator is built first: a portrait the engine
        cannot use (no face found) leaves the old avatar running and raises."""
        if not self.portraits:
            raise AnitalkerError("the test pattern has no portrait to change")
        animator = await self._build(portrait)
        await self.close(avatar)
        return self._start(animator)

    async def _build(self, portrait):
        """The client's animator, made on the shared engine's thread when there is one: the models' work
        stays on the thread that owns them, and no other thread keeps an OpenMP pool that would throttle
        the engine's (avatar/openmp.py)."""
        if self.engine is not None:
            return await asyncio.wrap_future(self.engine.call(self.make_animator, portrait))
        return await asyncio.to_thread(self.make_animator, portrait)

    def _start(self, animator) -> Avatar:
        from .session import Session
        from .webrtc import WebRTCOptions, WebRTCSink
        sink = WebRTCSink(self.webrtc or WebRTCOptions())
        shared = {"engine": self.engine} if self.engine is not None else {}
        session = Session(animator, [sink], lead_frames=self.lead_frames, time_source=self.time_source, **shared)
        avatar = Avatar(session, sink, asyncio.create_task(session.run(stop_at_end=False)))
        self.avatars.add(avatar)
        self.served += 1
        return avatar

    async def close(self, avatar: Avatar) -> None:
        """End the avatar's session (its queued speech goes with it) and its viewers' connections."""
        if avatar not in self.avatars:
            return
        self.avatars.discard(avatar)
        await asyncio.sleep(0)          # one closed as soon as it opened: run() begins, so stop() ends it
        avatar.session.interrupt()      # its queued speech goes now: stop() alone would play it out first
        avatar.session.stop()
        try:
            await avatar.task
        except Exception as e:                      # noqa: BLE001 -- the client was told when it failed
            log.info("a session ended with an error: %s", e)
        await avatar.sink.aclose()

    async def aclose(self) -> None:
        for avatar in list(self.avatars):
            await self.close(avatar)

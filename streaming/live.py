"""``anitalker live`` and ``anitalker devices``: one input, one or more outputs, metrics while it runs.

The engine comes from ``animator_factory(args) -> Animator`` so the command line stays independent of how
the models are loaded. ``--serve`` gives each client a session of its own (streaming/avatars.py): then
``pool_factory(args) -> make_animator(portrait rgb or None)`` loads the models once for all of them;
with outputs beside webrtc (-o, --to vcam, ...) the clients share one avatar, the one those outputs get.
``--test-pattern`` uses the model-free SyncAnimator (a flash and a click once a
second, the frame number in bars) to check devices, latency and A/V sync (the page's ?avsync=1 measures it).
"""
from __future__ import annotations

import asyncio
import glob
import json
import platform
import shutil
import signal
import sys

from models.errors import AnitalkerError, Interrupted

from . import sinks as S
from .session import JITTER_FRAMES, Session
from .sources import FileSource, MicSource, TTSSource

OUTPUTS = "vcam, webrtc, speaker, preview, file:PATH.mp4, null"


def add_live_parser(sub, animator_factory=None, pool_factory=None):
    """Add ``live`` and ``devices`` to an argparse subparsers object; returns (live, devices) parsers
    so the caller can add its model options to ``live``."""
    p = sub.add_parser("live", help="a talking avatar from a microphone, text or a file, in real time",
                       description="Drive a portrait in real time and send it to a virtual webcam, a "
                       "window, a file or a speaker.")
    p.add_argument("--portrait", metavar="IMAGE", help="portrait photo (default: the bundled one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mic", nargs="?", const="", metavar="DEVICE", help="microphone (default device, or "
                     "a name or number from `anitalker devices`)")
    src.add_argument("--tts", metavar="TEXT", help="speak this text with espeak-ng")
    src.add_argument("--audio", metavar="FILE", help="play an audio file in real time")
    src.add_argument("--serve", action="store_true", help="a web page and a WebSocket API drive the avatar "
                     "(text, the browser's microphone, PCM from other programs); implies --to webrtc")
    add_output_args(p)
    p.add_argument("--voice", metavar="V", help="espeak-ng voice for --tts (e.g. en-us, de)")
    p.add_argument("--lead-frames", type=int, help=f"frames fed ahead of the clock (default: the engine's "
                   f"latency + {JITTER_FRAMES})")
    p.add_argument("--test-pattern", action="store_true", help="no models: a flash and a click once a second "
                   "and the frame number (checks devices, timing and A/V sync; with --serve open the page with "
                   "?avsync=1 to measure it)")
    p.add_argument("--max-sessions", type=int, default=4, metavar="N", help="with --serve: avatars at once, "
                   "one per client (default %(default)s); the next client is refused with a reason")
    p.set_defaults(func=lambda args: cmd_live(args, animator_factory, pool_factory=pool_factory))
    d = sub.add_parser("devices", help="list microphones, speakers, cameras and virtual cameras, with what is missing")
    d.set_defaults(func=cmd_devices)
    return p, d


def add_output_args(p) -> None:
    """-o, --to and what the outputs need (server, WebRTC, devices, metrics): shared by live and reenact."""
    p.add_argument("-o", "--output", metavar="FILE", help="write the avatar to this video file (.mp4, .mov, "
                   ".mkv, .m4v); the same as --to file:FILE, and with --to one output more")
    p.add_argument("--to", metavar="OUT[,OUT]", help=f"outputs: {OUTPUTS} (default: webrtc with --serve, "
                   "the -o file if given, else vcam)")
    w = p.add_argument_group("server and WebRTC (--serve, --to webrtc)")
    w.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s; any other "
                   "needs --token)")
    w.add_argument("--port", type=int, default=8080, help="HTTP/WebSocket port (default %(default)s)")
    w.add_argument("--token", help="secret the page and API must present (default $ANITALKER_TOKEN)")
    w.add_argument("--codec", choices=("vp8", "h264"), help="video codec (default: the browser's choice)")
    w.add_argument("--bitrate", type=int, metavar="BPS", help="video bitrate cap, bits/s")
    w.add_argument("--ice-server", action="append", default=[], metavar="URL", help="stun:HOST:PORT or "
                   "turn:USER:PASS@HOST:PORT, repeatable (default: none, host candidates only)")
    w.add_argument("--idle-timeout", type=float, default=300.0, metavar="S", help="release a client that "
                   "sent nothing and watched nothing for S seconds (default %(default)g; 0: never)")
    w.add_argument("--udp-ports", metavar="LO-HI", help="UDP port range for WebRTC media (firewalls)")
    p.add_argument("--speaker", metavar="DEVICE", help="output device for `--to speaker` (default device)")
    p.add_argument("--vcam-backend", help="pyvirtualcam backend (v4l2loopback, obs, unitycapture)")
    p.add_argument("--vcam-device", help="e.g. /dev/video10")
    p.add_argument("--metrics-every", type=float, default=5.0, metavar="S", help="print metrics every S "
                   "seconds (0: only at exit)")
    p.add_argument("--metrics-json", metavar="FILE", help="write the final metrics here")


def make_sinks(spec: str, args) -> list:
    sinks, speaker = [], None
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, arg = item.partition(":")
        if name == "vcam":
            if args.vcam_backend is None and (problem := S.vcam_problem()):
                raise AnitalkerError(problem)
            sinks.append(S.VirtualCamSink(args.vcam_backend, args.vcam_device))
        elif name == "speaker":
            speaker = S.SpeakerSink(_device(args.speaker))
        elif name == "file" and arg:
            sinks.append(S.FileSink(arg))
        elif name == "preview":
            sinks.append(S.PreviewSink())
        elif name == "null":
            sinks.append(S.NullSink())
        elif name == "webrtc":
            from .webrtc import WebRTCOptions, WebRTCSink
            ports = None
            if args.udp_ports:
                try:
                    ports = tuple(int(v) for v in args.udp_ports.split("-"))
                    assert len(ports) == 2
                except (ValueError, AssertionError):
                    raise AnitalkerError(f"--udp-ports takes LO-HI, got {args.udp_ports!r}") from None
            sinks.append(WebRTCSink(WebRTCOptions(codec=args.codec, bitrate=args.bitrate, port_range=ports,
                                                  ice_servers=tuple(args.ice_server))))
        else:
            raise AnitalkerError(f"unknown output {item!r}; use {OUTPUTS}")
    if speaker is not None:             # opened first, so the camera can wait as long as the voice does
        for s in sinks:
            if isinstance(s, S.VirtualCamSink):
                s.sync_with = speaker
        sinks.insert(0, speaker)
    return sinks


def _device(text):
    return int(text) if text and text.isdigit() else (text or None)


def make_source(args):
    if args.serve:
        return None                     # the server's clients push audio
    if args.audio:
        return FileSource(args.audio)
    if args.tts:
        return TTSSource(args.tts, voice=args.voice)
    return MicSource(_device(args.mic))


def output_spec(args) -> str:
    """--to plus -o as one list of outputs (default: webrtc with --serve, the -o file, else vcam)."""
    outs = [o.strip() for o in (args.to or "").split(",") if o.strip()]
    if getattr(args, "output", None):
        outs.append(f"file:{args.output}")
    return ",".join(outs) or ("webrtc" if args.serve else "vcam")


def prepare_outputs(args) -> list:
    """The sinks of --to and -o, checked (names, folders, devices) before the (slow) model load."""
    args.to = output_spec(args)
    if args.idle_timeout < 0:
        raise AnitalkerError(f"--idle-timeout takes seconds (0: never), got {args.idle_timeout:g}")
    if args.serve and "webrtc" not in args.to.split(","):
        args.to += ",webrtc"
    if "webrtc" in args.to.split(","):
        from .server import check_bind
        args.token = check_bind(args.host, args.token)
    return make_sinks(args.to, args)


def _test_pattern(args):
    from .testing import SyncAnimator
    animator = SyncAnimator(size=256)
    if getattr(args, "watermark", None) is not None:
        from avatar.watermark import Finish, FinishedAnimator, Watermark
        animator = FinishedAnimator(animator, Finish(watermark=Watermark(args.watermark)))
    return animator


def cmd_live(args, animator_factory=None, time_source=None, pool_factory=None) -> int:
    sinks = prepare_outputs(args)
    source = make_source(args)
    if args.serve and [type(s).__name__ for s in sinks] == ["WebRTCSink"]:    # nothing records one avatar
        from .avatars import AvatarPool
        if args.max_sessions < 1:
            raise AnitalkerError(f"--max-sessions must be at least 1, got {args.max_sessions}")
        if args.test_pattern:
            make, portraits = (lambda portrait: _test_pattern(args)), False
        elif pool_factory is None:
            raise AnitalkerError("this build has no streaming engine yet; use --test-pattern")
        else:
            make, portraits = pool_factory(args), True
        run_pool(AvatarPool(make, max_sessions=args.max_sessions, webrtc=sinks[0].options,
                            lead_frames=args.lead_frames, portraits=portraits, time_source=time_source), args)
        return 0
    if args.test_pattern:
        animator = _test_pattern(args)
    elif animator_factory is None:
        raise AnitalkerError("this build has no streaming engine yet; use --test-pattern")
    else:
        animator = animator_factory(args)
    run_session(Session(animator, sinks, time_source=time_source, lead_frames=args.lead_frames), source, args)
    return 0


def run_session(session: Session, source, args, camera=None) -> dict:
    """Say the configured latency, run until the source ends, SIGINT or SIGTERM, print (and save) the
    metrics. camera: where the page's browser camera goes (reenact --serve).

    Files: a session that fails discards its file (an existing one stays as it was). An interrupt is how a
    session with an endless input (a microphone, a camera, the server's clients) ends, so its file is kept;
    one that cuts a file, TTS or video input short discards it. Either way the interrupt is raised after
    the metrics, so the command exits 130 / 143."""
    engine = int(getattr(session.animator, "latency_frames", 0))
    print(f"configured latency {session.lead * 40} ms = engine lookahead+hop {engine * 40} ms + jitter "
          f"{(session.lead - engine) * 40} ms, plus compute; outputs: {args.to}", file=sys.stderr)
    endless = source is None or getattr(source, "live", False)
    stopped: dict = {}                    # {"signum": n} once a signal has stopped the session
    files = [s for s in session.clock.sinks if isinstance(s, S.FileSink)]
    for sink in files:
        sink.keep = lambda: session.error is None and (endless or not stopped)
    summary = asyncio.run(_run(session, source, args, camera, stopped))
    summary.update(getattr(session.animator, "stats", {}))
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(summary, f, indent=1, default=float)
    if stopped:
        paths = ", ".join(s.path for s in files)
        raise Interrupted(stopped["signum"], (f"kept {paths}" if endless else f"nothing was written to {paths}")
                          if files else "")
    return summary


def run_pool(pool, args) -> None:
    """`live --serve`: a session per client until SIGINT or SIGTERM, then how many were served; raises
    Interrupted (exit 130 / 143), as run_session does for a session that only an interrupt ends."""
    print(f"a session per client, up to {pool.capacity} at once; outputs: webrtc", file=sys.stderr)
    stopped: dict = {}
    asyncio.run(_signals(_serve_pool(pool, args), stopped, lambda task: task.cancel()))
    summary = {"sessions_served": pool.served}
    print("metrics: " + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(summary, f, indent=1)
    raise Interrupted(stopped.get("signum", signal.SIGINT))


async def _serve_pool(pool, args) -> None:
    from .server import AvatarServer
    server = await AvatarServer(avatars=pool, host=args.host, port=args.port, token=args.token,
                                voice=getattr(args, "voice", None), idle_timeout=args.idle_timeout or None).start()
    print(f"open {server.url}", file=sys.stderr)
    try:
        while True:
            await asyncio.sleep(args.metrics_every if args.metrics_every > 0 else 3600)
            for i, avatar in enumerate(list(pool.avatars)):
                print(f"session {i + 1}/{pool.count}: {avatar.session.line()}", file=sys.stderr)
    finally:
        await server.aclose()


async def _run(session: Session, source, args, camera=None, stopped=None) -> dict:
    stopped = {} if stopped is None else stopped
    return await _signals(_serve(session, source, args, camera), stopped, lambda task: session.stop())


async def _signals(work, stopped: dict, stop):
    """Run the coroutine `work` as a task; SIGINT and SIGTERM are noted in `stopped` and call stop(task):
    the work ends cleanly (a session stops at its next slot, so files close and metrics print; the pool's
    server is cancelled and closes every client's session)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)

    def on_signal(signum):
        stopped.setdefault("signum", signum)
        stop(task)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in list(handlers):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):     # not the main thread, or no signals
            del handlers[sig]
    try:
        return await task
    except asyncio.CancelledError:
        if not stopped:
            raise
    finally:
        for sig, handler in handlers.items():    # asyncio would leave the default (kill) action behind
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


async def _serve(session: Session, source, args, camera=None) -> dict:
    async def report():
        while args.metrics_every > 0:
            await asyncio.sleep(args.metrics_every)
            print(session.line(), file=sys.stderr)

    reporter = asyncio.create_task(report())
    server = None
    webrtc = [s for s in session.clock.sinks if type(s).__name__ == "WebRTCSink"]
    if webrtc:                            # the page is how viewers (and --serve's clients) connect
        from .server import AvatarServer
        server = await AvatarServer(session, webrtc[0], host=args.host, port=args.port, token=args.token,
                                    voice=getattr(args, "voice", None), camera=camera,
                                    idle_timeout=args.idle_timeout or None).start()
        print(f"open {server.url}", file=sys.stderr)
    try:
        summary = await session.run(source)
    finally:
        reporter.cancel()
        if server is not None:
            await server.aclose()
    return summary


def cmd_devices(args) -> int:
    lines = []
    try:
        sd = S.import_sounddevice()
        devs = sd.query_devices()
        for kind, key in (("microphones", "max_input_channels"), ("speakers", "max_output_channels")):
            lines.append(f"{kind}:")
            found = [f"  {i}: {d['name']} ({d[key]} ch, {int(d['default_samplerate'])} Hz)"
                     for i, d in enumerate(devs) if d[key] > 0]
            lines += found or ["  none found"]
    except AnitalkerError as e:
        lines.append(f"microphones, speakers: {e}")
    try:
        import pyvirtualcam
        from pyvirtualcam.camera import BACKENDS
        problem = S.vcam_problem()
        lines.append(f"virtual camera: pyvirtualcam {pyvirtualcam.__version__}, backends "
                     f"{', '.join(BACKENDS) or 'none'}; " + (problem or "ready"))
    except ImportError:
        lines.append("virtual camera: " + S.vcam_problem())
    if platform.system() == "Linux":   # OpenCV opens /dev/videoN as --webcam N (virtual cameras are listed too)
        cams = sorted(glob.glob("/dev/video*"), key=lambda d: int(d[10:]) if d[10:].isdigit() else 0)
        lines.append("cameras (--webcam N): " + (", ".join(cams) or "none found at /dev/video*"))
    else:
        lines.append("cameras: --webcam 0 is the first, 1 the next, ...")
    lines.append("preview: " + (S.preview_problem() or "ready (OpenCV with a GUI)"))
    tts = shutil.which("espeak-ng")
    lines.append("tts: " + (f"espeak-ng at {tts}" if tts else "espeak-ng missing (apt install espeak-ng)"))
    print("\n".join(lines))
    return 0

"""``anitalker reenact``: a face on camera drives the portrait frame by frame (stage-1 motion encoder ->
renderer; no audio model).

Driving sources: a local webcam (OpenCV, read on its own thread; the newest frame wins), a video file (its
own audio plays along), or the browser's camera over WebRTC (``--serve``: the page sends it and gets the
avatar back on the same connection). The session is paced by audio as always: the microphone with
``--mic`` (it leaves with the frame rendered when it arrived, so both carry the same delay), the clip's
audio for ``--video``, otherwise silence. ``--video`` with only ``file:`` outputs runs offline, faster
than real time.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time

from models.errors import AnitalkerError, Interrupted

from .live import _device, add_output_args, output_spec, prepare_outputs, run_session
from .session import Session
from .sinks import PreviewSink

# Reenactment has no lookahead. Two frames in flight (the one shown at this slot and the one being made
# for the next) keep the engine busy without a gap, and each renders the newest camera frame when its
# render starts, so latency is about one render time plus the wait for the slot. The lead never grows
# beyond that: an engine slower than the clock repeats slots (and skips camera frames) instead of queueing.
LEAD_FRAMES, MAX_LEAD_FRAMES = 2, 2


def add_reenact_parser(sub):
    """Add ``reenact`` to an argparse subparsers object; returns its parser for the model options."""
    p = sub.add_parser("reenact", help="a webcam, a video or the browser's camera drives the portrait",
                       description="Face reenactment: the face on a camera or in a video drives the portrait "
                       "in real time (or offline: --video with only file: outputs).")
    p.add_argument("--portrait", metavar="IMAGE", help="portrait photo (default: the bundled one)")
    p.add_argument("--webcam", metavar="N", help="camera number (`anitalker devices`), a stream URL or a "
                   "video file played like a camera")
    p.add_argument("--video", metavar="FILE", help="a video file; its audio plays along")
    p.add_argument("--serve", action="store_true", help="the page sends the browser's camera and gets the "
                   "avatar back over WebRTC; implies --to webrtc")
    p.add_argument("--mic", nargs="?", const="", metavar="DEVICE", help="pass a microphone through, delayed "
                   "like the video (default device, or a name or number from `anitalker devices`)")
    p.add_argument("--mode", choices=("absolute", "relative"), default="absolute",
                   help="absolute (default, as in the paper): the driving face's own motion; relative: the "
                   "change from a calibration frame (taken at start, again with the page's button, `c` in "
                   "the preview or the API's calibrate), for faces that differ a lot from the portrait")
    p.add_argument("--smoothing", type=float, default=0.0, metavar="S", help="0 (default, none) to 1 "
                   "(heavy): steadies a jittery camera at the cost of lag")
    p.add_argument("--no-track", action="store_true", help="use whole driving frames (already cropped like "
                   "the training data) instead of tracking and cropping the face")
    add_output_args(p)
    p.set_defaults(func=cmd_reenact)
    return p


class WebcamCapture:
    """Frames from cv2.VideoCapture (camera number, URL or file) read on a thread into a LatestFrame, so a
    slow engine always gets the newest frame; the ones it never took are counted there as stale. A file
    is paced at its own frame rate, so it behaves like a camera. Opening happens at construction, so a
    missing camera is reported before the models load."""

    def __init__(self, source, slot=None):
        import cv2

        from avatar.reenact import LatestFrame

        self.source, self.slot = source, slot if slot is not None else LatestFrame()
        self.frames, self.ended = 0, False
        if isinstance(source, str) and "://" not in source and not os.path.exists(source):
            raise AnitalkerError(f"--webcam {source}: no such file; give a camera number (`anitalker devices` "
                                 "lists the cameras), a stream URL or an existing video file")
        level = cv2.utils.logging.getLogLevel()     # a missing camera is our one error line, not its warnings
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        try:
            self._cap = cv2.VideoCapture(source)
        finally:
            cv2.utils.logging.setLogLevel(level)
        if not self._cap.isOpened():
            raise AnitalkerError(f"cannot open camera {source}; `anitalker devices` lists the cameras")
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self._period = 1 / (fps if 1 <= fps <= 240 else 25) if isinstance(source, str) and os.path.isfile(source) \
            else 0.0                      # a camera or stream is paced by itself
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="webcam", daemon=True)

    def start(self) -> WebcamCapture:
        self._thread.start()
        return self

    def _read(self) -> None:
        due = time.monotonic()
        try:
            while not self._stop.is_set():
                ok, bgr = self._cap.read()
                if not ok:                # the file ended or the camera went away: the engine holds, then eases
                    self.ended = True
                    return
                self.slot.put(bgr[:, :, ::-1].copy(), time.monotonic())
                self.frames += 1
                if self._period:
                    due += self._period
                    self._stop.wait(max(0.0, due - time.monotonic()))
        finally:
            self._cap.release()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading and release the camera (the reading thread releases it when it ends). A camera
        stuck inside read() is left to its daemon thread after ``timeout``, so Ctrl-C never hangs."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:           # never started: nothing else holds the camera
            self._cap.release()


def clip_audio(path):
    """The clip's audio as a session source, cut or padded with silence to the clip's video length (as
    the offline path writes it), so the avatar plays the whole clip and no longer; silence for a clip
    without sound."""
    import av
    import numpy as np

    from avatar.media import video_seconds
    from avatar.timebase import AudioChunk

    from .sources import FileSource
    with av.open(path) as box:
        sound = FileSource(path) if box.streams.audio else None
    total = max(640, round(video_seconds(path) * 16000))

    class ClipAudio:
        async def __aiter__(self):
            done = 0
            if sound is not None:
                async for chunk in sound:
                    x = chunk.samples[:total - done]
                    if len(x):
                        yield AudioChunk(x, done, hi=None if chunk.hi is None else chunk.hi[:3 * len(x)])
                        done += len(x)
                    if done >= total:
                        return
            while done < total:                     # the video goes on after its sound (or has none)
                n = min(640, total - done)
                yield AudioChunk(np.zeros(n, np.float32), done)
                done += n
    return ClipAudio()


def cmd_reenact(args, time_source=None) -> int:
    from avatar.media import check_output, check_video, container_format

    if sum((args.webcam is not None, args.video is not None, args.serve)) != 1:
        raise AnitalkerError("give one driving source: --webcam N, --video FILE or --serve")
    if args.video is not None and args.mic is not None:
        raise AnitalkerError("--mic goes with --webcam or --serve; a --video plays its own audio")
    if not 0.0 <= args.smoothing <= 1.0:
        raise AnitalkerError(f"--smoothing must be between 0 and 1, got {args.smoothing}")
    outs = output_spec(args).split(",")
    offline = args.video is not None and all(o.startswith("file:") and len(o) > 5 for o in outs)
    # the outputs and the video first, before anything slow (the models, even torch itself) loads
    if offline:
        paths = [o[5:] for o in outs]
        for path in paths:
            check_output(path)
        if len({container_format(p) for p in paths}) > 1:
            raise AnitalkerError(f"the outputs of one offline reenactment share one container: {', '.join(paths)}")
    else:
        sinks = prepare_outputs(args)
    if args.video is not None:
        check_video(args.video)

    from avatar.reenact import ReenactConfig
    config = ReenactConfig(mode=args.mode, crop=not args.no_track, smoothing=args.smoothing)
    if offline:
        return _offline(args, config, paths)
    capture = WebcamCapture(_device(args.webcam)) if args.webcam is not None else None
    try:                                    # the camera is released on every way out, errors included
        return _live(args, config, sinks, capture, time_source)
    finally:
        if capture is not None:
            capture.stop()


def _live(args, config, sinks, capture, time_source) -> int:
    from avatar.reenact import LatestFrame

    camera = None
    if capture is not None:
        driver = capture.slot
    elif args.video is not None:
        from avatar.media import read_video_frames
        from avatar.reenact import TimedFrames
        driver = TimedFrames(read_video_frames(args.video))
    else:
        driver = camera = LatestFrame()
    if args.video is not None:
        source = clip_audio(args.video)
    elif args.mic is not None:
        from .sources import MicSource
        source = MicSource(_device(args.mic))
    else:
        source = None                       # silence paces the session until Ctrl-C
    animator = make_reenactor(args, driver, config)
    for s in sinks:
        if isinstance(s, PreviewSink) and config.mode == "relative":     # its hotkey (absolute: nothing to do)
            s.on_key = lambda key: key == "c" and animator.calibrate()
    session = Session(animator, sinks, time_source=time_source, lead_frames=LEAD_FRAMES,
                      max_lead_frames=MAX_LEAD_FRAMES)
    if capture is not None:
        capture.start()
    run_session(session, source, args, camera=camera)
    return 0


def make_reenactor(args, driver, config):
    """The Reenactor for args' portrait; its frames leave pasted back and marked as the options ask."""
    from avatar.pipeline import encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from avatar.reenact import Reenactor
    from avatar.watermark import FinishedAnimator, make_finish

    from .cli import speed_from_args
    original = load_image(args.portrait or asset_path("portrait.jpg"))
    portrait = prepare_portrait(original, crop=not args.no_crop)
    models = load_models(args.checkpoints, device=args.device, speed=speed_from_args(args), stage1_only=True)
    animator = Reenactor(models, encode_portrait(models, to_tensor(portrait.image)), driver, config)
    finish = make_finish(original, portrait.box, paste_back=args.paste_back, watermark=args.watermark)
    return FinishedAnimator(animator, finish) if finish else animator


def _offline(args, config, paths) -> int:
    from avatar.offline import reenact_file
    from avatar.pipeline import load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait

    from .cli import speed_from_args
    portrait = args.portrait or asset_path("portrait.jpg")
    prepare_portrait(load_image(portrait), crop=not args.no_crop)     # its face, before the model load
    models = load_models(args.checkpoints, device=args.device, speed=speed_from_args(args), stage1_only=True)
    print(f"reenacting {portrait} with {args.video} -> {', '.join(paths)} ({args.mode}, {models.device})",
          file=sys.stderr)
    try:
        timings = reenact_file(models, portrait, args.video, paths[0], config=config, crop=not args.no_crop,
                               paste_back=args.paste_back, watermark=args.watermark)
    except (KeyboardInterrupt, Interrupted) as e:
        raise Interrupted(getattr(e, "signum", 2), f"nothing was written to {', '.join(paths)}") from None
    for path in paths[1:]:                  # copied under a temporary name, so no half-copied file is left
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.part")
        try:
            shutil.copyfile(paths[0], tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    print(f"wrote {', '.join(paths)}\n{timings.table()}", file=sys.stderr)
    return 0

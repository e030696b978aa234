"""The finishing touches on every output picture: paste-back into the original photo and the visible
``--watermark`` (the paper's ethics section asks that generated faces be marked; off unless asked, since a
virtual camera in a call is the user's own choice of face).

``Finish`` is one picture -> picture step for the offline writers; ``FinishedAnimator`` applies it to the
frames of any Animator, so every live sink (file, virtual camera, WebRTC, preview) gets the same picture.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from models.errors import AnitalkerError


class Watermark:
    """White text on a darkened band in the bottom-left corner, sized to the picture (about 1/22 of its
    height). The mask is drawn once per picture size; marking a frame is one blend of a small region."""

    def __init__(self, text: str):
        self.text = " ".join(str(text).split())
        if not self.text:
            raise AnitalkerError("--watermark needs a text to draw, e.g. --watermark 'AI-generated'")
        self._masks: dict = {}

    def _mask(self, height: int, width: int):
        key = (height, width)
        if key not in self._masks:
            from PIL import Image, ImageDraw, ImageFont

            size = max(9, round(height / 22))
            font = ImageFont.load_default(size=size)
            pad = max(2, size // 3)
            left, top, right, bottom = font.getbbox(self.text)
            w, h = min(width, right - left + 2 * pad), min(height, bottom - top + 2 * pad)
            text = Image.new("L", (w, h))
            ImageDraw.Draw(text).text((pad - left, pad - top), self.text, fill=255, font=font)
            alpha = np.asarray(text, np.float32)[..., None] / 255.0
            y0, x0 = height - h - pad, pad
            self._masks[key] = (max(0, y0), max(0, x0), alpha[: height - max(0, y0), : width - x0])
        return self._masks[key]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> a marked copy."""
        out = np.array(image, dtype=np.uint8, copy=True)
        y0, x0, alpha = self._mask(*out.shape[:2])
        h, w = alpha.shape[:2]
        region = out[y0:y0 + h, x0:x0 + w].astype(np.float32)
        region *= 0.45                                  # the band: the text reads on any background
        region += (255.0 - region) * alpha
        out[y0:y0 + h, x0:x0 + w] = np.clip(region + 0.5, 0, 255).astype(np.uint8)
        return out


class Finish:
    """paste (a PasteBack or None), then the watermark (a Watermark or None): the picture every output shows."""

    def __init__(self, paste=None, watermark: Watermark | None = None):
        self.paste, self.watermark = paste, watermark

    def __bool__(self) -> bool:
        return self.paste is not None or self.watermark is not None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.paste is not None:
            image = self.paste(image)
        if self.watermark is not None:
            image = self.watermark(image)
        return image


def make_finish(original=None, box=None, *, paste_back: bool = False, watermark: str | None = None) -> Finish:
    """The Finish for a prepared portrait (original image and face box) and the user's options."""
    from .portrait import PasteBack

    paste = PasteBack(original, box) if paste_back and box is not None else None
    return Finish(paste, Watermark(watermark) if watermark is not None else None)


class FinishedAnimator:
    """An Animator whose frames leave finished (pasted back, marked); everything else is the wrapped one's.
    A held frame (image None: the shell shows the last finished picture) passes as it is."""

    def __init__(self, animator, finish: Finish):
        self.animator, self.finish = animator, finish

    def __getattr__(self, name):                       # latency_frames, stats, timings, calibrate, ...
        return getattr(self.animator, name)

    def _one(self, frame):
        return frame if frame.image is None else dataclasses.replace(frame, image=self.finish(frame.image))

    def push(self, chunk):
        return list(self.push_iter(chunk))

    def flush(self):
        return list(self.flush_iter())

    def push_iter(self, chunk):
        inner = self.animator
        return map(self._one, inner.push_iter(chunk) if hasattr(inner, "push_iter") else inner.push(chunk))

    def flush_iter(self):
        inner = self.animator
        return map(self._one, inner.flush_iter() if hasattr(inner, "flush_iter") else inner.flush())

    def reset(self, last=None) -> None:
        self.animator.reset(last)

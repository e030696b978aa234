"""Portrait preparation: load any photo, find and crop the face like the training data, convert
to and from the network's tensors, and paste rendered faces back into the photo.

The model was trained on square crops of side 1.6 x the face box around the face centre
(liutaocode/talking_face_preprocessing), while the official demo only squash-resizes the whole
photo; a photo framed differently from the training crops animates badly, hence detect + crop +
paste back (crop=False keeps the official behaviour).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import AnitalkerError

MIN_SIDE = 64                    # smaller photos carry too little detail to animate
BACKGROUND = (128, 128, 128)     # transparent pixels become neutral grey, not black
DETECT_SIDE = 400                # detector input (longest side): ~30 ms on 2 cores; Haar needs no more
# crop_box's 1.6 is the training rule for FaceBoxesV2 boxes (hairline to chin). A Haar box is
# tighter (mid-forehead to lower lip): on the astronaut 96 px against ~120 px hairline-to-chin,
# so prepare_portrait widens by this estimate to frame the head as the training crops do.
HAAR_TO_FACEBOXES = 1.2
CROP_SCALE = 1.6 * HAAR_TO_FACEBOXES
NO_FACE = ("no face found in the portrait; use a photo with one clearly visible frontal face, "
           "or pass --no-crop to use the whole image as it is")

Box = tuple[int, int, int, int]


def asset_path(name: str) -> Path:
    """Path of a bundled default (portrait.jpg, sentence.wav, sentence.txt)."""
    path = Path(__file__).parent / "assets" / name
    if not path.is_file():
        raise AnitalkerError(f"bundled asset {name!r} is missing from {path.parent}; reinstall anitalker-live")
    return path


# ---------------------------------------------------------------------------------------------
# Loading

def load_image(path: str | os.PathLike) -> np.ndarray:
    """Any image Pillow reads -> uint8 (H, W, 3) RGB, upright as its EXIF orientation says."""
    try:
        with Image.open(path) as img:
            img.load()                            # decode now so truncated files fail here
            img = ImageOps.exif_transpose(img)    # phone photos are stored sideways + a tag
            rgb = to_rgb(img)
    except FileNotFoundError:
        raise AnitalkerError(f"portrait {path} not found; check the path") from None
    except UnidentifiedImageError:
        raise AnitalkerError(f"{path} is not an image Pillow can read; use a JPEG or PNG photo") from None
    except Image.DecompressionBombError:
        raise AnitalkerError(f"{path} is too large to decode safely; downscale it first") from None
    except (OSError, ValueError, SyntaxError) as exc:   # truncated data, odd modes, bad EXIF
        raise AnitalkerError(f"cannot read portrait {path} ({exc}); re-save it as JPEG or PNG") from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise AnitalkerError(f"portrait {path} is only {w}x{h} pixels; use a photo at least "
                             f"{MIN_SIDE} px on each side (256 or more is best)")
    return rgb


def to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "P" or mode == "PA":
        # A palette may carry transparency; expand it so the alpha branch below sees it.
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "La", "RGBa"):
        # Composite rather than drop alpha: hidden pixels of cut-outs are often garbage.
        back = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(back, img.convert("RGBA")).convert("RGB"))
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    return np.asarray(img.convert("RGB"))     # L, 1, CMYK (incl. Adobe-inverted), YCbCr, ...


def _high_depth_to_rgb(img: Image.Image) -> np.ndarray:
    # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, so scale by hand.
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:  # "I" and "F" do not record the bit depth: infer it from the values
        peak = float(a.max()) if a.size else 0.0
        full = 1.0 if img.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    grey = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


# ---------------------------------------------------------------------------------------------
# Detection and crop

@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise AnitalkerError("OpenCV's face cascade could not be loaded; reinstall opencv-python-headless<5")
    return cascade


def detect_face(rgb: np.ndarray) -> Box | None:
    """(x, y, w, h) of the largest confidently detected frontal face, or None."""
    h, w = rgb.shape[:2]
    s = min(1.0, DETECT_SIDE / max(h, w))
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if s < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    # A portrait's face is not tiny: ignoring faces under 8 % of the short side saves time and
    # background false positives. 24 px is the cascade's native window.
    min_face = max(24, round(0.08 * min(grey.shape)))
    faces, hits = _cascade().detectMultiScale2(grey, scaleFactor=1.1, minNeighbors=4, minSize=(min_face, min_face))
    if len(faces) == 0:
        return None
    hits = np.asarray(hits).ravel()
    # Real faces collect tens of overlapping hits, textures a handful; on the astronaut a weak
    # (4-hit) false positive on the shuttle is *larger* than the face (40 hits), so filter first.
    strong = [f for f, n in zip(faces, hits) if n >= 0.25 * hits.max()]
    x, y, fw, fh = max(strong, key=lambda f: f[2] * f[3])
    return (round(x / s), round(y / s), round(fw / s), round(fh / s))


def crop_box(face: Box, image_shape: tuple[int, ...], scale: float = 1.6) -> Box:
    """Square (x0, y0, x1, y1) of side max(w, h) * scale around the face centre, as in training;
    shifted to lie inside the image, shrunk only when the image is smaller than the square."""
    x, y, w, h = face
    img_h, img_w = image_shape[:2]
    side = min(round(max(w, h) * scale), img_h, img_w)
    x0 = min(max(round(x + w / 2 - side / 2), 0), img_w - side)
    y0 = min(max(round(y + h / 2 - side / 2), 0), img_h - side)
    return (x0, y0, x0 + side, y0 + side)


@dataclass(frozen=True, eq=False)     # eq=False: numpy fields make == ambiguous
class Portrait:
    image: np.ndarray                 # (size, size, 3) uint8 RGB, the network's view
    box: Box | None                   # crop square (x0, y0, x1, y1) in source pixels; None = whole image
    source_shape: tuple[int, int]     # (H, W) of the photo the box refers to


def prepare_portrait(rgb: np.ndarray, crop: bool = True, size: int = 256, scale: float = CROP_SCALE) -> Portrait:
    """crop=True: detect, crop like the training data (side = scale x the Haar box), resize.
    crop=False: the official demo's squash-resize of the whole photo (aspect ratio not kept)."""
    box = None
    src = Image.fromarray(np.ascontiguousarray(rgb))
    if crop:
        face = detect_face(rgb)
        if face is None:
            raise AnitalkerError(NO_FACE)
        box = crop_box(face, rgb.shape, scale)
        src = src.crop(box)
    image = np.asarray(src.resize((size, size), Image.Resampling.BICUBIC))
    return Portrait(image=image, box=box, source_shape=tuple(rgb.shape[:2]))


# ---------------------------------------------------------------------------------------------
# Tensor conventions (bit-exact with the official demo)

def to_tensor(img_u8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1]. The /255 happens in float64 and the
    cast to float32 before -0.5 and *2, exactly as the official code (last-bit parity)."""
    x = np.ascontiguousarray(img_u8.transpose(2, 0, 1)) / 255.0
    t = torch.from_numpy(x.astype(np.float32))
    return ((t - 0.5) * 2.0).unsqueeze(0)


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float -> (B, H, W, 3) uint8: clamp, (x+1)/2, *255 and truncate, as the
    official ToPILImage conversion (truncation, not rounding)."""
    return uint8_images(torch.as_tensor(frames)).cpu().numpy()


def uint8_images(frames: torch.Tensor) -> torch.Tensor:
    """to_uint8 where the frames are: a GPU converts them and only the bytes are copied back."""
    t = frames.detach().to(torch.float32)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    u8 = ((t.clamp(-1.0, 1.0) + 1.0) / 2.0).mul(255.0).to(torch.uint8)   # float -> uint8 truncates
    return u8.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Paste back

def _ramp(n: int, width: float, start: bool, end: bool) -> np.ndarray:
    """1-D weight rising from ~0 at a feathered edge to 1 over `width` px (raised cosine:
    no kink at either end, so no visible seam line)."""
    pos = np.arange(n) + 0.5
    weight = np.ones(n)
    if width > 0:
        for on, dist in ((start, pos), (end, n - pos)):
            if on:
                weight = np.minimum(weight, 0.5 - 0.5 * np.cos(np.pi * np.clip(dist / width, 0, 1)))
    return weight


class PasteBack:
    """Blends rendered faces into one photo; the mask and photo terms are computed once so each
    frame costs a resize, one multiply-add in uint16 and a copy."""

    def __init__(self, original: np.ndarray, box: Box, feather: float = 0.1):
        if original.dtype != np.uint8 or original.ndim != 3 or original.shape[2] != 3:
            raise ValueError("original must be a uint8 (H, W, 3) image")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= original.shape[1] and 0 <= y0 < y1 <= original.shape[0]):
            raise ValueError(f"box {box} is not inside an image of shape {original.shape}")
        if not 0.0 <= feather <= 0.5:
            raise ValueError("feather must be in [0, 0.5]")
        self.box = box
        self._base = np.ascontiguousarray(original)
        bw, bh = x1 - x0, y1 - y0
        # Sides on the image border have no seam to hide: keep the rendered face up to the edge.
        width = feather * min(bw, bh)
        rx = _ramp(bw, width, x0 > 0, x1 < original.shape[1])
        ry = _ramp(bh, width, y0 > 0, y1 < original.shape[0])
        # Weights in 0..256 so the blend is (face*w + orig*(256-w) + 128) >> 8 in uint16.
        self._w = np.rint(np.outer(ry, rx) * 256).astype(np.uint16)[..., None]
        self._bg = (original[y0:y1, x0:x1].astype(np.uint16) * (256 - self._w) + 128).astype(np.uint16)

    def __call__(self, face_u8: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        bw, bh = x1 - x0, y1 - y0
        up = bw > face_u8.shape[1]
        face = cv2.resize(face_u8, (bw, bh), interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)
        out = self._base.copy()        # a fresh frame each call: callers may queue frames
        out[y0:y1, x0:x1] = ((face.astype(np.uint16) * self._w + self._bg) >> 8).astype(np.uint8)
        return out


def paste_back(original: np.ndarray, face_u8: np.ndarray, box: Box, feather: float = 0.1) -> np.ndarray:
    """One-off form of PasteBack; in a frame loop build PasteBack once instead."""
    return PasteBack(original, box, feather)(face_u8)

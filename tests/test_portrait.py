"""avatar/portrait.py: loading every image mode, face crop, tensor conventions, paste back."""

import wave

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from avatar.portrait import (
    PasteBack, Portrait, asset_path, crop_box, detect_face, load_image, paste_back,
    prepare_portrait, to_tensor, to_uint8,
)
from models.errors import AnitalkerError

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


def colour_blocks(h=96, w=128):
    """Four flat colour quadrants: survive JPEG well and show orientation."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (220, 30, 30)
    img[: h // 2, w // 2 :] = (30, 200, 40)
    img[h // 2 :, : w // 2] = (40, 40, 210)
    img[h // 2 :, w // 2 :] = (240, 240, 240)
    return img


# --------------------------------------------------------------------------- loading

def test_rgb_and_grey(tmp_path):
    rgb = colour_blocks()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    out = load_image(str(tmp_path / "l.png"))
    assert out.shape == (96, 128, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(rgb[..., :1], 3, axis=2))


def test_alpha_composited_on_grey(tmp_path):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 40:, 3] = 255                              # left half fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(out[0, 0], (128, 128, 128))
    np.testing.assert_array_equal(out[0, 60], (200, 0, 0))
    la = np.stack([np.full((80, 80), 10, np.uint8), rgba[..., 3]], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], (128, 128, 128))
    np.testing.assert_array_equal(out[0, 60], (10, 10, 10))


def test_16_bit_is_scaled_not_clipped(tmp_path):
    g16 = np.zeros((70, 70), np.uint16)
    g16[:, 10:] = 32896                                # 128 * 257
    g16[:, 20:] = 65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 15].tolist() == [128] * 3 and out[0, 30].tolist() == [255] * 3
    c48 = np.zeros((70, 70, 3), np.uint16)
    c48[..., 0] = 65535                                # red, in RGB order
    c48[..., 2] = 32896
    cv2.imwrite(str(tmp_path / "c48.png"), c48[..., ::-1])   # cv2 writes BGR
    out = load_image(tmp_path / "c48.png")
    assert abs(int(out[0, 0, 0]) - 255) <= 1 and out[0, 0, 1] == 0 and abs(int(out[0, 0, 2]) - 128) <= 1


def test_palette_and_cmyk(tmp_path):
    rgb = colour_blocks()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), rgb)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(tmp_path / "pt.png", transparency=int(np.asarray(pal)[0, 0]))
    assert load_image(tmp_path / "pt.png")[0, 0].tolist() == [128, 128, 128]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert np.abs(out[8:40, 8:56].astype(int) - rgb[8:40, 8:56]).max() < 12


def test_exif_orientation(tmp_path):
    rgb = colour_blocks(80, 120)                       # stored landscape, red at top left
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 degrees clockwise to display"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (120, 80, 3)
    assert out[5, -5, 0] > 180 and out[5, -5, 1] < 80  # red moved to the top right


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "tiny", "directory"])
def test_load_errors_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.jpg"
    if case == "text":
        path.write_text("not an image")
    elif case == "truncated":
        Image.fromarray(colour_blocks()).save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "tiny":
        Image.fromarray(colour_blocks(32, 48)).save(path)
    elif case == "directory":
        path.mkdir()
    with pytest.raises(AnitalkerError, match=path.name):
        load_image(path)


# --------------------------------------------------------------------------- detection and crop

def test_astronaut_face_and_crop(astronaut):
    face = detect_face(astronaut)
    assert face is not None
    x, y, w, h = face
    assert 170 <= x + w / 2 <= 250 and 85 <= y + h / 2 <= 140 and 80 <= w <= 120   # the face, not the shuttle
    x0, y0, x1, y1 = crop_box(face, astronaut.shape)
    assert x1 - x0 == y1 - y0 == round(1.6 * max(w, h))
    assert 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
    assert abs((x0 + x1) / 2 - (x + w / 2)) <= 1 and abs((y0 + y1) / 2 - (y + h / 2)) <= 1


def test_crop_box_shifts_inside_and_shrinks():
    assert crop_box((0, 10, 100, 100), (480, 640)) == (0, 0, 160, 160)
    assert crop_box((590, 430, 50, 60), (480, 640)) == (544, 384, 640, 480)
    assert crop_box((10, 10, 80, 80), (100, 150, 3)) == (0, 0, 100, 100)   # image smaller than 128


def test_face_at_the_edge_gets_an_inside_box(astronaut):
    corner = np.ascontiguousarray(astronaut[45:, 160:])  # face now ~15 px from the top left
    p = prepare_portrait(corner)
    x0, y0, x1, y1 = p.box
    assert x0 == 0 and y0 == 0 and x1 - x0 == y1 - y0 and x1 <= corner.shape[1]
    assert p.image.shape == (256, 256, 3) and p.source_shape == corner.shape[:2]


def test_prepare_portrait_crops_the_head(astronaut):
    p = prepare_portrait(astronaut)
    assert isinstance(p, Portrait) and p.image.shape == (256, 256, 3) and p.image.dtype == np.uint8
    x0, y0, x1, y1 = p.box
    assert x1 - x0 == y1 - y0 and 150 <= x1 - x0 <= 230 and x0 < 175 and y0 < 65
    expected = Image.fromarray(astronaut).crop(p.box).resize((256, 256), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(p.image, np.asarray(expected))


def test_no_face_hint_and_no_crop():
    ramp = np.repeat(np.linspace(0, 255, 300, dtype=np.uint8)[None, :, None], 200, 0).repeat(3, 2)
    with pytest.raises(AnitalkerError, match="--no-crop"):
        prepare_portrait(ramp)
    p = prepare_portrait(ramp, crop=False)
    assert p.box is None and p.source_shape == (200, 300)
    squashed = Image.fromarray(ramp).resize((256, 256), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(p.image, np.asarray(squashed))


# --------------------------------------------------------------------------- tensor conventions

def test_to_tensor_exact_order():
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (1, 3, 256, 256) and t.dtype == torch.float32
    hand = (np.float32(np.float64(img[10, 20, 1]) / 255.0) - np.float32(0.5)) * np.float32(2.0)
    assert t[0, 1, 10, 20].item() == hand
    assert t.min() >= -1 and t.max() <= 1 and to_tensor(np.full((4, 4, 3), 255, np.uint8)).max() == 1.0


def test_to_uint8_clamps_and_truncates():
    vals = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0])
    frames = vals.view(1, 1, 1, 8).expand(2, 3, 1, 8)
    out = to_uint8(frames)
    assert out.shape == (2, 1, 8, 3) and out.dtype == np.uint8
    # (0.999+1)/2*255 = 254.87 -> 254; 0 -> 127.5 -> 127; 0.5 -> 191.25 -> 191
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    np.testing.assert_array_equal(to_uint8(frames.numpy()), out)


# --------------------------------------------------------------------------- paste back

def test_paste_back_keeps_outside_and_is_smooth():
    original = np.full((300, 400, 3), 30, np.uint8)
    original[::7] = 90                                 # texture, to see that it stays untouched
    face = np.full((256, 256, 3), 230, np.uint8)
    box = (100, 50, 300, 250)
    out = paste_back(original, face, box)
    inside = np.zeros(original.shape[:2], bool)
    inside[50:250, 100:300] = True
    np.testing.assert_array_equal(out[~inside], original[~inside])
    assert (out[130:170, 180:220] == 230).all()        # the centre is the rendered face
    row = out[149, :, 0].astype(int)                   # a row of flat original (30) crossing the box
    assert abs(row[100] - 30) <= 2 and abs(row[299] - 30) <= 2     # no hard step at the box edge
    assert np.abs(np.diff(row)).max() <= 25            # a 200-level change spread over ~20 px


def test_paste_back_border_sides_are_not_feathered():
    original = np.zeros((200, 200, 3), np.uint8)
    pb = PasteBack(original, (0, 0, 100, 100))
    out = pb(np.full((256, 256, 3), 200, np.uint8))
    assert out[0, 0, 0] == 200 and out[50, 0, 0] == 200 and out[99, 50, 0] < 10
    again = pb(np.full((256, 256, 3), 200, np.uint8))
    assert again is not out and np.array_equal(again, out)


# --------------------------------------------------------------------------- bundled assets

def test_bundled_assets():
    rgb = load_image(asset_path("portrait.jpg"))
    assert rgb.shape == (512, 512, 3) and detect_face(rgb) is not None
    assert asset_path("portrait.jpg").stat().st_size < 100_000
    with wave.open(str(asset_path("sentence.wav"))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert 3.0 <= w.getnframes() / 16000 <= 4.5
    assert asset_path("sentence.txt").read_text().strip()
    with pytest.raises(AnitalkerError, match="reinstall"):
        asset_path("nope.bin")

"""Draw the bundled example images: jaxbooth/examples/{instance,class}/*.png.

The instance set is one distinctive subject (a red-and-yellow toy robot) on varied
backgrounds, positions and scales, as a DreamBooth subject set should be; the class set is
five generic toys for prior preservation. Drawn with numpy/PIL only and fully deterministic
(no randomness, fixed sizes), so re-running reproduces the same files byte for byte.

    python scripts/make_example_images.py [--out jaxbooth/examples]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw large, then downsample: smooth edges without antialiasing support in ImageDraw
RED, YELLOW, DARK = (214, 40, 40), (250, 204, 21), (45, 45, 52)


def _gradient(w: int, h: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> Image.Image:
    """Vertical two-colour gradient, the cheapest background that still looks like a scene."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float64)[:, None, None]
    rgb = (1 - t) * np.array(top, np.float64) + t * np.array(bottom, np.float64)
    return Image.fromarray(np.broadcast_to(rgb, (h, w, 3)).round().astype(np.uint8), "RGB")


def _floor(img: Image.Image, horizon: float, color: tuple[int, int, int]) -> None:
    d = ImageDraw.Draw(img)
    d.rectangle((0, int(img.height * horizon), img.width, img.height), fill=color)


def _checker(img: Image.Image, horizon: float, cell: int, a: tuple, b: tuple) -> None:
    d = ImageDraw.Draw(img)
    y0 = int(img.height * horizon)
    for j, y in enumerate(range(y0, img.height, cell)):
        for i, x in enumerate(range(0, img.width, cell)):
            d.rectangle((x, y, x + cell, y + cell), fill=a if (i + j) % 2 else b)


def _stripes(img: Image.Image, horizon: float, step: int, color: tuple) -> None:
    d = ImageDraw.Draw(img)
    y0 = int(img.height * horizon)
    for y in range(y0, img.height, step):
        d.line((0, y, img.width, y), fill=color, width=max(1, step // 6))


def _shadow(d: ImageDraw.ImageDraw, cx: float, y: float, s: float) -> None:
    d.ellipse((cx - 34 * s, y - 6 * s, cx + 34 * s, y + 6 * s), fill=(0, 0, 0, 70))


def draw_robot(img: Image.Image, cx: float, ground: float, s: float, wave: bool = False) -> None:
    """The subject: red body, yellow head and arms, antenna, big eyes, yellow chest badge."""
    d = ImageDraw.Draw(img, "RGBA")
    _shadow(d, cx, ground, s)
    for dx in (-14, 6):  # legs and feet
        d.rectangle((cx + dx * s, ground - 22 * s, cx + (dx + 8) * s, ground - 4 * s), fill=DARK)
        d.rounded_rectangle((cx + (dx - 3) * s, ground - 6 * s, cx + (dx + 11) * s, ground), 2 * s, fill=RED)
    body = (cx - 22 * s, ground - 62 * s, cx + 22 * s, ground - 20 * s)
    d.rounded_rectangle(body, 6 * s, fill=RED, outline=DARK, width=max(1, int(2 * s)))
    d.ellipse((cx - 8 * s, ground - 50 * s, cx + 8 * s, ground - 34 * s), fill=YELLOW, outline=DARK)
    left_arm = (cx - 32 * s, ground - 58 * s, cx - 23 * s, ground - 30 * s)
    right_arm = (
        (cx + 23 * s, ground - 74 * s, cx + 32 * s, ground - 48 * s)
        if wave
        else (cx + 23 * s, ground - 58 * s, cx + 32 * s, ground - 30 * s)
    )
    for arm in (left_arm, right_arm):
        d.rounded_rectangle(arm, 3 * s, fill=YELLOW, outline=DARK)
    d.rectangle((cx - 6 * s, ground - 68 * s, cx + 6 * s, ground - 62 * s), fill=DARK)  # neck
    head = (cx - 20 * s, ground - 98 * s, cx + 20 * s, ground - 66 * s)
    d.rounded_rectangle(head, 7 * s, fill=YELLOW, outline=DARK, width=max(1, int(2 * s)))
    for ex in (-9, 9):
        d.ellipse(
            (cx + (ex - 6) * s, ground - 90 * s, cx + (ex + 6) * s, ground - 78 * s), fill=(250, 250, 250)
        )
        d.ellipse((cx + (ex - 3) * s, ground - 87 * s, cx + (ex + 3) * s, ground - 81 * s), fill=DARK)
    d.rectangle((cx - 8 * s, ground - 73 * s, cx + 8 * s, ground - 71 * s), fill=RED)  # mouth
    d.line((cx, ground - 98 * s, cx, ground - 110 * s), fill=DARK, width=max(1, int(2 * s)))
    d.ellipse((cx - 4 * s, ground - 116 * s, cx + 4 * s, ground - 108 * s), fill=RED)


def draw_teddy(img: Image.Image, cx: float, ground: float, s: float) -> None:
    d = ImageDraw.Draw(img, "RGBA")
    fur, muzzle = (150, 100, 60), (220, 190, 150)
    _shadow(d, cx, ground, s)
    d.ellipse((cx - 24 * s, ground - 56 * s, cx + 24 * s, ground), fill=fur)
    for ex in (-26, 14):
        d.ellipse((cx + ex * s, ground - 16 * s, cx + (ex + 14) * s, ground), fill=fur)
    d.ellipse((cx - 18 * s, ground - 92 * s, cx + 18 * s, ground - 56 * s), fill=fur)
    for ex in (-20, 8):
        d.ellipse((cx + ex * s, ground - 98 * s, cx + (ex + 12) * s, ground - 86 * s), fill=fur)
    d.ellipse((cx - 8 * s, ground - 72 * s, cx + 8 * s, ground - 60 * s), fill=muzzle)
    for ex in (-9, 5):
        d.ellipse((cx + ex * s, ground - 82 * s, cx + (ex + 4) * s, ground - 78 * s), fill=DARK)


def draw_duck(img: Image.Image, cx: float, ground: float, s: float) -> None:
    d = ImageDraw.Draw(img, "RGBA")
    _shadow(d, cx, ground, s)
    d.ellipse((cx - 30 * s, ground - 36 * s, cx + 26 * s, ground), fill=(255, 220, 40))
    d.ellipse((cx - 4 * s, ground - 66 * s, cx + 24 * s, ground - 30 * s), fill=(255, 220, 40))
    d.polygon(
        [(cx + 22 * s, ground - 52 * s), (cx + 38 * s, ground - 47 * s), (cx + 22 * s, ground - 42 * s)],
        fill=(245, 130, 30),
    )
    d.ellipse((cx + 10 * s, ground - 58 * s, cx + 15 * s, ground - 53 * s), fill=DARK)


def draw_car(img: Image.Image, cx: float, ground: float, s: float) -> None:
    d = ImageDraw.Draw(img, "RGBA")
    _shadow(d, cx, ground, s * 1.2)
    d.rounded_rectangle(
        (cx - 40 * s, ground - 30 * s, cx + 40 * s, ground - 10 * s), 5 * s, fill=(40, 90, 200)
    )
    d.rounded_rectangle(
        (cx - 22 * s, ground - 46 * s, cx + 18 * s, ground - 28 * s), 6 * s, fill=(40, 90, 200)
    )
    d.rectangle((cx - 16 * s, ground - 42 * s, cx + 12 * s, ground - 31 * s), fill=(180, 220, 250))
    for wx in (-24, 24):
        d.ellipse((cx + (wx - 10) * s, ground - 20 * s, cx + (wx + 10) * s, ground), fill=DARK)
        d.ellipse(
            (cx + (wx - 4) * s, ground - 14 * s, cx + (wx + 4) * s, ground - 6 * s), fill=(200, 200, 200)
        )


def draw_blocks(img: Image.Image, cx: float, ground: float, s: float) -> None:
    d = ImageDraw.Draw(img, "RGBA")
    _shadow(d, cx, ground, s)
    colors = [(60, 160, 80), (70, 110, 220), (240, 150, 30), (150, 70, 190)]
    boxes = [(-30, 0), (0, 0), (-15, 1), (-2, 2)]
    for (x, level), color in zip(boxes, colors, strict=True):
        y1 = ground - level * 28 * s
        d.rectangle((cx + x * s, y1 - 28 * s, cx + (x + 28) * s, y1), fill=color, outline=DARK)


def draw_ball(img: Image.Image, cx: float, ground: float, s: float) -> None:
    d = ImageDraw.Draw(img, "RGBA")
    _shadow(d, cx, ground, s)
    box = (cx - 30 * s, ground - 60 * s, cx + 30 * s, ground)
    d.ellipse(box, fill=(250, 250, 250), outline=DARK)
    d.chord(box, 200, 340, fill=(30, 120, 220))
    d.chord(box, 20, 160, fill=(230, 60, 60))


Background = Callable[[int, int], Image.Image]


def _bg_sky(w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (120, 180, 240), (210, 230, 250))
    _floor(img, 0.72, (110, 170, 80))
    return img


def _bg_table(w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (235, 225, 210), (200, 190, 175))
    _floor(img, 0.65, (160, 110, 70))
    _stripes(img, 0.65, 8 * SUPERSAMPLE, (135, 90, 55))
    return img


def _bg_checker(w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (90, 95, 110), (150, 155, 170))
    _checker(img, 0.7, 12 * SUPERSAMPLE, (230, 230, 230), (120, 120, 125))
    return img


def _bg_pink(w: int, h: int) -> Image.Image:
    return _gradient(w, h, (250, 200, 215), (240, 170, 190))


def _bg_teal(w: int, h: int) -> Image.Image:
    img = _gradient(w, h, (40, 130, 140), (20, 80, 90))
    _floor(img, 0.8, (230, 220, 180))
    return img


# (file stem, (width, height), background, centre x frac, ground y frac, scale, arm raised)
INSTANCE = [
    ("robot_00", (128, 128), _bg_sky, 0.50, 0.92, 0.95, False),
    ("robot_01", (160, 120), _bg_table, 0.33, 0.93, 0.80, True),
    ("robot_02", (112, 144), _bg_checker, 0.55, 0.95, 1.00, False),
    ("robot_03", (144, 112), _bg_pink, 0.68, 0.90, 0.72, True),
    ("robot_04", (96, 128), _bg_teal, 0.45, 0.97, 0.70, False),
]
# (file stem, (width, height), background, toy, centre x frac, ground y frac, scale)
CLASS = [
    ("toy_00", (128, 128), _bg_table, draw_teddy, 0.50, 0.92, 1.10),
    ("toy_01", (144, 112), _bg_sky, draw_car, 0.50, 0.90, 1.20),
    ("toy_02", (112, 144), _bg_pink, draw_duck, 0.45, 0.80, 1.30),
    ("toy_03", (160, 120), _bg_checker, draw_blocks, 0.45, 0.92, 1.00),
    ("toy_04", (128, 96), _bg_teal, draw_ball, 0.60, 0.92, 1.10),
]


def _render(size: tuple[int, int], background: Background, draw: Callable[..., None], *args) -> Image.Image:
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    img = background(w, h)
    cx, ground, scale = args[0] * w, args[1] * h, args[2] * SUPERSAMPLE * min(size) / 128
    draw(img, cx, ground, scale, *args[3:])
    return img.resize(size, Image.LANCZOS)


def make_example_images(out: Path) -> list[Path]:
    """Write all example PNGs under `out/instance` and `out/class`; returns their paths."""
    written = []
    for stem, size, bg, x, y, s, wave in INSTANCE:
        written.append(_save(_render(size, bg, draw_robot, x, y, s, wave), out / "instance" / f"{stem}.png"))
    for stem, size, bg, draw, x, y, s in CLASS:
        written.append(_save(_render(size, bg, draw, x, y, s), out / "class" / f"{stem}.png"))
    return written


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG", optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "jaxbooth" / "examples"
    parser.add_argument("--out", type=Path, default=default, help="folder that gets instance/ and class/")
    paths = make_example_images(parser.parse_args().out)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images, {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

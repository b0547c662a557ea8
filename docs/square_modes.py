"""Draw docs/square_modes.png: how a box becomes a square example in each square mode.

The photo is drawn here (a tall bottle on a tiled floor, 640x480), so the figure ships no
TACO pixels. Every output panel is what raywaste.images.read_examples returns for it.

Usage: python docs/square_modes.py [OUTPUT_PNG]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from raywaste.images import SQUARE_MODES, ImageSettings, read_examples  # noqa: E402

PHOTO_SIZE = (640, 480)
# The bottle's box (x, y, width, height), as annotations.json would give it.
BOX = (270.0, 150.0, 100.0, 300.0)
PADDINGS = (0.0, 0.25)
OUTPUT_SIZE = 96


def draw_photo() -> Image.Image:
    photo = Image.new("RGB", PHOTO_SIZE, (205, 200, 185))
    draw = ImageDraw.Draw(photo)
    for x in range(0, PHOTO_SIZE[0], 40):
        for y in range(0, PHOTO_SIZE[1], 40):
            if (x // 40 + y // 40) % 2:
                draw.rectangle((x, y, x + 39, y + 39), fill=(175, 170, 150))
    x, y, width, height = BOX
    draw.rounded_rectangle((x, y + 90, x + width, y + height), radius=18, fill=(40, 140, 90))
    draw.polygon([(x, y + 100), (x + 35, y + 40), (x + 65, y + 40), (x + width, y + 100)], fill=(40, 140, 90))
    draw.rectangle((x + 35, y, x + 65, y + 42), fill=(40, 140, 90))
    draw.rectangle((x + 32, y, x + 68, y + 14), fill=(220, 60, 40))
    draw.rectangle((x + 8, y + 160, x + width - 8, y + 230), fill=(245, 240, 220))
    return photo


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("square_modes.png")
    folder = Path(tempfile.mkdtemp())
    draw_photo().save(folder / "photo.png")

    figure, axes = plt.subplots(len(PADDINGS), 1 + len(SQUARE_MODES), figsize=(12, 5.4))
    for row, padding in enumerate(PADDINGS):
        photo_axis = axes[row][0]
        photo_axis.imshow(Image.open(folder / "photo.png"))
        x, y, width, height = BOX
        photo_axis.add_patch(Rectangle((x, y), width, height, fill=False, edgecolor="red", linewidth=1.5))
        if padding:
            margin_x, margin_y = padding * width, padding * height
            photo_axis.add_patch(Rectangle((x - margin_x, y - margin_y), width + 2 * margin_x, height + 2 * margin_y,
                                           fill=False, edgecolor="red", linestyle="--", linewidth=1.2))
        photo_axis.set_title(f"photo and box\npadding {padding}", fontsize=10)
        for column, mode in enumerate(SQUARE_MODES, start=1):
            settings = ImageSettings(size=OUTPUT_SIZE, square=mode, padding=padding)
            (example,), _ = read_examples(folder, "photo.png", PHOTO_SIZE, [BOX], settings)
            axes[row][column].imshow(example)
            axes[row][column].set_title(f"--square {mode}", fontsize=10)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"One 100x300 box as a {OUTPUT_SIZE}x{OUTPUT_SIZE} example; dashed: the box with --padding 0.25", fontsize=11)
    figure.tight_layout()
    figure.savefig(target, dpi=80)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()

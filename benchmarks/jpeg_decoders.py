"""Compare JPEG decoders on real TACO photos: CPU time per photo and equality of the pixels.

Each decoder decodes every photo at the DCT scales 1/1, 1/2, 1/4 and 1/8 (Pillow's draft
mode offers only these), in RGB and in grayscale. The pixels are compared with Pillow's,
and the CPU time of the decode alone is summed (process time, so other processes on the
machine disturb it less than wall time). Decoders that are not installed are left out:

    simplejpeg    pip install simplejpeg
    turbojpeg     pip install "PyTurboJPEG<2" plus the libturbojpeg shared library
                  (Debian: apt-get install libturbojpeg0; PyTurboJPEG 2 needs libjpeg-turbo 3)

Usage: python benchmarks/jpeg_decoders.py TACO_DIR [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

import machine

FACTORS = (1, 2, 4, 8)
Decoder = Callable[[bytes, int, bool], "np.ndarray | Image.Image"]


def decode_pillow(data: bytes, factor: int, gray: bool) -> Image.Image:
    # The pipeline crops Pillow images directly, so converting the whole photo to NumPy
    # (a copy that costs about as much as the decode at 1/1) is left out of the time.
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    image.draft("L" if gray else "RGB", (width // factor, height // factor))
    image.load()
    return image


def simplejpeg_decoder() -> Decoder | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes, factor: int, gray: bool) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(
            data, "GRAY" if gray else "RGB", min_width=math.ceil(width / factor),
            min_height=math.ceil(height / factor), min_factor=factor,
        )

    return decode


def turbojpeg_decoder() -> Decoder | None:
    try:
        import turbojpeg

        codec = turbojpeg.TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        return None

    def decode(data: bytes, factor: int, gray: bool) -> np.ndarray:
        pixel_format = turbojpeg.TJPF_GRAY if gray else turbojpeg.TJPF_RGB
        return codec.decode(data, pixel_format=pixel_format, scaling_factor=(1, factor))

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("taco_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="Decode every photo this many times per decoder and scale.")
    args = parser.parse_args()

    photos = [path.read_bytes() for path in sorted(args.taco_dir.glob("batch_*/*")) if path.suffix.lower() in (".jpg", ".jpeg")]
    decoders: dict[str, Decoder] = {"pillow": decode_pillow}
    for name, factory in (("simplejpeg", simplejpeg_decoder), ("turbojpeg", turbojpeg_decoder)):
        decoder = factory()
        if decoder is None:
            print(f"{name}: not installed, left out")
        else:
            decoders[name] = decoder

    print(f"# {machine.command_line()}")
    print(f"# {len(photos)} photos, {machine.describe()}")
    print("| mode | scale | " + " | ".join(f"{name} ms/photo" for name in decoders) + " | pixels equal to Pillow's |")
    print("|---|---|" + "---|" * len(decoders) + "---|")
    for gray in (False, True):
        for factor in FACTORS:
            equal = []
            # Interleave the decoders photo by photo so that a change in machine load hits all of them.
            totals = dict.fromkeys(decoders, 0.0)
            for data in photos:
                reference = np.asarray(decode_pillow(data, factor, gray))
                for name, decoder in decoders.items():
                    started = time.process_time()
                    for _ in range(args.repeat):
                        pixels = decoder(data, factor, gray)
                    totals[name] += time.process_time() - started
                    if name != "pillow":
                        equal.append(np.array_equal(np.squeeze(np.asarray(pixels)), np.squeeze(reference)))
            cpu_ms = {name: 1000 * total / (len(photos) * args.repeat) for name, total in totals.items()}
            print(
                f"| {'gray' if gray else 'RGB'} | 1/{factor} | "
                + " | ".join(f"{cpu_ms[name]:.1f}" for name in decoders)
                + f" | {sum(equal)} of {len(equal)} |"
            )
    print(f"# load average at the end: {machine.load_average():.1f}")


if __name__ == "__main__":
    main()

"""Time preprocessing four ways on the real TACO sample, repeated to 1,000+ decode jobs.

    (a) course loop    one process: full decode, convert to RGB, crop, resize (Pillow defaults)
    (b) read_examples  one process: raywaste.images.read_examples per photo
    (c) pool           (b) in a multiprocessing pool with one worker per CPU
    (d) Ray Data       raywaste.preprocess: the whole stage, Parquet included, on a local Ray
                       that has already run one small dataset (so worker start-up is excluded)

The photos are not copied: a synthetic annotations.json lists every photo ``--repeat``
times under new image and annotation ids, all pointing to the same files. Each variant
reports photos (decode jobs) and examples per second, the CPU seconds of its own
process, and the peak memory of all processes involved (the benchmark process and its
children: pool workers, or Ray's GCS, raylet and workers). The RSS sum is sampled every
0.2 s and counts pages shared between processes (Ray's object store, libraries) once per
process. PSS counts them once, but reading it makes the kernel walk every mapping, which
costs about 10 ms of CPU per Ray process, so it is sampled only every 2 s.

Usage: python benchmarks/preprocess_speed.py TACO_DIR [--repeat 10] [--task binary:Bottle]
           [--size 128] [--variants a,b,c,d] [--memory-scale 4] [--num-cpus N]

Needs psutil (pip install -e ".[bench]"). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

import machine
from raywaste.annotations import load_annotations
from raywaste.images import ImageSettings, jpeg_decoder_name, read_examples
from raywaste.tasks import build_examples

SAMPLE_INTERVAL_S = 0.2
PSS_INTERVAL_S = 2.0


@dataclass
class Job:
    """One photo and the boxes of its examples (None: the whole photo)."""

    file_name: str
    size: tuple[int, int]
    boxes: list


@dataclass
class Measurement:
    variant: str
    photos: int
    examples: int
    seconds: float
    cpu_seconds: float
    peak_pss_mib: float
    peak_rss_mib: float
    load: float


class PeakMemory:
    """Sample the memory of this process and all its descendants in a background thread."""

    def __init__(self) -> None:
        self.peak_pss = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        last_pss = time.monotonic()
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            with_pss = time.monotonic() - last_pss >= PSS_INTERVAL_S
            self.sample(with_pss)
            if with_pss:
                last_pss = time.monotonic()

    def sample(self, with_pss: bool = True) -> None:
        me = psutil.Process()
        pss = rss = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                info = process.memory_full_info() if with_pss else process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)


def repeated_annotations(taco_dir: Path, repeat: int, target: Path) -> Path:
    """Write annotations.json listing every photo ``repeat`` times under new ids."""
    data = json.loads((taco_dir / "annotations.json").read_text())
    id_step = max(image["id"] for image in data["images"]) + 1
    annotation_step = max(a["id"] for a in data["annotations"]) + 1
    images, annotations = [], []
    for copy in range(repeat):
        images += [{**image, "id": image["id"] + copy * id_step} for image in data["images"]]
        annotations += [{**a, "id": a["id"] + copy * annotation_step, "image_id": a["image_id"] + copy * id_step}
                        for a in data["annotations"]]
    target.write_text(json.dumps({**data, "images": images, "annotations": annotations, "scene_annotations": []}))
    return target


def decode_jobs(annotations: Path, task: str) -> list[Job]:
    taco = load_annotations(annotations)
    examples = build_examples(taco, task, 0).examples
    boxes: dict[int, list] = {}
    for example in examples:
        boxes.setdefault(example.image_id, []).append(tuple(example.bbox) if example.bbox else None)
    return [Job(taco.images[i].file_name, (taco.images[i].width, taco.images[i].height), boxes[i]) for i in sorted(boxes)]


def course_loop(root: Path, job: Job, size: int) -> list[np.ndarray]:
    """Decode in full, convert, then crop and resize each example, as a course notebook does."""
    with Image.open(root / job.file_name) as image:
        rgb = image.convert("RGB")
    arrays = []
    for box in job.boxes:
        region = rgb if box is None else rgb.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
        arrays.append(np.asarray(region.resize((size, size))))
    return arrays


_POOL_ARGS: tuple = ()


def _pool_init(root: str, settings: ImageSettings) -> None:
    global _POOL_ARGS
    _POOL_ARGS = (Path(root), settings)


def _pool_read(job: Job) -> list:
    root, settings = _POOL_ARGS
    arrays, _ = read_examples(root, job.file_name, job.size, job.boxes, settings)
    return arrays


def consume(results) -> None:
    for _ in results:
        pass


def measure(variant: str, jobs: list[Job], run) -> Measurement:
    """Time ``run()`` and print its table row at once, so a long benchmark shows its progress."""
    load = machine.load_average()
    cpu_started = time.process_time()
    started = time.perf_counter()
    with PeakMemory() as memory:
        run()
    seconds = time.perf_counter() - started
    m = Measurement(variant, len(jobs), sum(len(job.boxes) for job in jobs), seconds, time.process_time() - cpu_started,
                    memory.peak_pss / 2**20, memory.peak_rss / 2**20, load)
    print(f"| {m.variant} | {m.photos} | {m.examples} | {m.seconds:.1f} | {m.photos / m.seconds:.1f} | {m.examples / m.seconds:.1f} "
          f"| {m.cpu_seconds:.1f} | {m.peak_pss_mib:.0f} | {m.peak_rss_mib:.0f} | {m.load:.1f} |", flush=True)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("taco_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=10, help="List every photo this many times (102 photos x 10 = 1,020 jobs).")
    parser.add_argument("--task", default="binary:Bottle", help="binary:Bottle: one whole photo per job; supercategory: its crops.")
    parser.add_argument("--size", type=int, default=128, help="Output side in pixels.")
    parser.add_argument("--variants", default="a,b,c,d", help="Which of a, b, c, d to run, in this order.")
    parser.add_argument("--memory-scale", type=int, default=4, help="Also run (d) on this many times the data (0: skip).")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Pool workers and Ray CPUs.")
    parser.add_argument("--photos-per-task", type=int, default=None, help="Photos per Ray task (default: raywaste's choice).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="raywaste-bench-"))
    root = args.taco_dir.resolve()
    annotations = repeated_annotations(root, args.repeat, work / "annotations.json")
    jobs = decode_jobs(annotations, args.task)
    settings = ImageSettings(size=args.size)
    variants = args.variants.split(",")

    print(f"# {machine.command_line()}")
    print(f"# {machine.describe()}; JPEG decoder {jpeg_decoder_name()}; task {args.task}, {args.size} px")
    print("| variant | photos | examples | seconds | photos/s | examples/s | CPU s (own process) | peak PSS MiB | peak RSS sum MiB | load at start |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)

    # Each variant drops its arrays as it goes, as a pipeline that writes them out would, so
    # that peak memory shows the working set rather than all results.
    if "a" in variants:
        measure("(a) course loop", jobs, lambda: consume(course_loop(root, job, args.size) for job in jobs))
    if "b" in variants:
        measure("(b) read_examples", jobs, lambda: consume(read_examples(root, j.file_name, j.size, j.boxes, settings) for j in jobs))
    if "c" in variants:
        # Like Ray's in (d), the workers' start-up is left out: one job per worker warms them.
        with multiprocessing.Pool(args.num_cpus, _pool_init, (str(root), settings)) as pool:
            pool.map(_pool_read, jobs[: args.num_cpus], chunksize=1)
            measure(f"(c) pool, {args.num_cpus} workers", jobs, lambda: consume(pool.imap_unordered(_pool_read, jobs, chunksize=4)))
    if "d" in variants:
        import ray

        import raywaste
        from raywaste.preprocessing import RunOptions

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
        options = RunOptions(photos_per_task=args.photos_per_task, overwrite=True, max_error_fraction=0.0)
        warm_up = repeated_annotations(root, 1, work / "warm-up.json")
        raywaste.preprocess(root, work / "warm-up", annotations=warm_up, task=args.task, size=args.size, options=options)
        scales = [1] + ([args.memory_scale] if args.memory_scale > 1 else [])
        for scale in scales:
            scaled = annotations if scale == 1 else repeated_annotations(root, args.repeat * scale, work / f"x{scale}.json")
            scaled_jobs = jobs if scale == 1 else decode_jobs(scaled, args.task)
            out = work / f"ray-x{scale}"
            measure(f"(d) Ray Data, {args.num_cpus} CPUs, {scale}x data", scaled_jobs,
                    lambda: raywaste.preprocess(root, out, annotations=scaled, task=args.task, size=args.size, options=options))
        ray.shutdown()

    print(f"# load average at the end: {machine.load_average():.1f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

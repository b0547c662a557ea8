"""The ``raywaste`` command line: one subcommand per pipeline stage.

Imports of Ray and TensorFlow happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from raywaste import __version__
from raywaste.download import DEFAULT_ANNOTATIONS_URL, SIZES, DownloadSettings

# Defaults of the download command's options, from the one place that defines them.
_DOWNLOAD_DEFAULTS = DownloadSettings()


def _configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("raywaste").setLevel(min(level, logging.INFO))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raywaste")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Turn the TACO litter dataset into a tuned waste classifier with Ray."""
    _configure_logging(verbose)


@main.command()
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--annotations",
    "annotations_source",
    default=DEFAULT_ANNOTATIONS_URL,
    show_default=True,
    metavar="URL|PATH",
    help="TACO annotations.json to read, as a URL or a local path.",
)
@click.option(
    "--size",
    type=click.Choice(SIZES),
    default="original",
    show_default=True,
    help="Photo size: the original (flickr_url) or 640 pixels on the long side (flickr_640_url).",
)
@click.option("--batches", metavar="N[,N...]", help="Download only these TACO batches, e.g. 1,2,3. [default: all]")
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    help="Download at most this many photos: the first ones in annotations.json order, after --batches.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 32),
    default=_DOWNLOAD_DEFAULTS.workers,
    show_default=True,
    help="Parallel requests.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DOWNLOAD_DEFAULTS.timeout_s,
    show_default=True,
    help="Seconds to connect, and seconds without data before a request is retried.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=_DOWNLOAD_DEFAULTS.max_attempts,
    show_default=True,
    help="Tries per photo, the first included, before it is reported as missing.",
)
@click.option(
    "--jpeg-quality",
    type=click.IntRange(1, 95),
    default=_DOWNLOAD_DEFAULTS.jpeg_quality,
    show_default=True,
    help="JPEG quality (Pillow's 1-95 scale) for PNG originals converted to JPEG.",
)
def download(
    dest: Path,
    annotations_source: str,
    size: str,
    batches: str | None,
    max_images: int | None,
    workers: int,
    timeout_s: float,
    max_attempts: int,
    jpeg_quality: int,
) -> None:
    """Download TACO's photos into DEST/batch_N/ with DEST/annotations.json listing them.

    A re-run skips photos that are already complete. Failures are listed in
    DEST/download-report.json, and the exit status is 1 when any photo is missing.
    """
    from raywaste import download as taco_download

    settings = taco_download.DownloadSettings(
        workers=workers, timeout_s=timeout_s, max_attempts=max_attempts, jpeg_quality=jpeg_quality
    )
    try:
        batch_numbers = taco_download.parse_batches(batches) if batches else None
        plan = taco_download.plan_download(
            dest,
            annotations_source,
            size,  # type: ignore[arg-type]  # click.Choice restricts it to the Size values
            batch_numbers,
            max_images,
            settings,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error

    rate = taco_download.ProgressRate()
    with click.progressbar(
        length=len(plan.photos), label="photos", file=sys.stderr, item_show_func=lambda text: text
    ) as bar:
        report = taco_download.run_download(plan, settings, on_result=lambda result: bar.update(1, rate.add(result)))

    click.echo(taco_download.format_summary(report, dest))
    if report.missing:
        sys.exit(1)

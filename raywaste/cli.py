"""The ``raywaste`` command line: one subcommand per pipeline stage, and ``run`` for all three.

Ray and TensorFlow load inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from raywaste import __version__
from raywaste.baselines import DenseBaselineSettings
from raywaste.download import DEFAULT_ANNOTATIONS_URL, SIZES, DownloadSettings
from raywaste.export import DEFAULT_BATCH_ROWS, DTYPES
from raywaste.images import COLOR_MODES, SQUARE_MODES, ImageSettings
from raywaste.inspection import DEFAULT_SAMPLES
from raywaste.preprocessing import PreprocessSettings, RunOptions
from raywaste.splits import SplitError, SplitFractions
from raywaste.tasks import DEFAULT_TASK
from raywaste.tune_settings import DEFAULT_GRACE_PERIOD, METRIC_CHOICES, SCHEDULERS, SEARCHERS, TuneSettings

# Option defaults come from the settings classes that define them.
_IMAGE = ImageSettings()
_PREPROCESS = PreprocessSettings()
# Exit status of a command whose tuning run was interrupted (128 + SIGINT, as shells report Ctrl-C).
INTERRUPTED_EXIT_STATUS = 130
_OPTIONS = RunOptions()
_TUNE = TuneSettings()
_DOWNLOAD_DEFAULTS = DownloadSettings()


def _configure_logging(verbose: int) -> None:
    # raywaste's own steps are logged by default; -v adds its debug output, -vv other libraries' info.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if verbose > 1 else logging.WARNING)
    logging.getLogger("raywaste").setLevel(logging.DEBUG if verbose > 0 else logging.INFO)


def _options(*decorators: Callable) -> Callable:
    """Apply a group of click options in the order they are listed in ``--help``."""

    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def _parse_fractions(context, parameter, value: str) -> SplitFractions:
    try:
        return SplitFractions.parse(value)
    except SplitError as error:
        raise click.BadParameter(str(error)) from None


_address_option = click.option(
    "--address", envvar="RAY_ADDRESS", default=None, metavar="HOST:PORT",
    help="Ray cluster to join (default: $RAY_ADDRESS; without either, a local Ray starts in-process).",
)
_num_cpus_option = click.option(
    "--num-cpus", type=click.IntRange(min=1), default=None,
    help="CPUs for a local Ray (default: all of this machine). Ignored with --address.",
)
_overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing results in OUT instead of stopping.")

_preprocess_options = _options(
    click.option("--annotations", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="annotations.json to use (default: TACO_DIR/annotations.json)."),
    click.option("--task", default=DEFAULT_TASK, show_default=True,
                 help="binary:<supercategory>, supercategory, category, or map:<csv> (a TACO class map)."),
    click.option("--image-size", type=click.IntRange(8, 4096), default=_IMAGE.size, show_default=True,
                 help="Side of the square output images, in pixels."),
    click.option("--color-mode", type=click.Choice(COLOR_MODES), default=_IMAGE.color_mode, show_default=True,
                 help="Channels stored per example: rgb (3) or grayscale (1)."),
    click.option("--square", type=click.Choice(SQUARE_MODES), default=_IMAGE.square, show_default=True,
                 help="How a box becomes square: stretch it, pad it, fill with the photo around it (context), or crop it."),
    click.option("--padding", type=click.FloatRange(0, 2), default=_IMAGE.padding, show_default=True,
                 help="Margin around each box, as a fraction of its width and height."),
    click.option("--min-box-size", type=click.FloatRange(min=0), default=_IMAGE.min_box_size, show_default=True,
                 help="Skip boxes whose shorter side is below this many annotated pixels."),
    click.option("--split", "fractions", default="0.8,0.1,0.1", show_default=True, callback=_parse_fractions,
                 help="Train, validation and test fractions of the images."),
    click.option("--min-class-examples", type=click.IntRange(min=0), default=_PREPROCESS.min_class_examples, show_default=True,
                 help="Crop tasks: merge classes with fewer examples into 'Other' (0: never)."),
    click.option("--max-error-fraction", type=click.FloatRange(0, 1), default=_OPTIONS.max_error_fraction, show_default=True,
                 help="Fail when more than this fraction of examples cannot be read."),
    click.option("--photos-per-task", type=click.IntRange(min=1), default=None,
                 help="Photos decoded by one Ray task. [default: about 4 tasks per CPU, at most 32 photos each]"),
    click.option("--dataset-name", default=_OPTIONS.dataset_name, show_default=True,
                 help="Folder under OUT for the dataset: data, or data-<suffix> (e.g. data-64-grayscale) to keep "
                      "datasets of several image sizes or color modes side by side for tuning."),
)

_tune_options = _options(
    click.option("--space", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Search space file, YAML or JSON (see docs/search-space.md). [default: the built-in space]"),
    click.option("--num-samples", type=click.IntRange(min=1), default=_TUNE.num_samples, show_default=True,
                 help="Number of trials; with --search grid, how many times the grid runs."),
    click.option("--scheduler", type=click.Choice(SCHEDULERS), default=_TUNE.scheduler, show_default=True,
                 help="asha and hyperband stop weak trials early, pbt copies and mutates good ones, fifo runs all to the end."),
    click.option("--search", type=click.Choice(SEARCHERS), default=_TUNE.search, show_default=True,
                 help="How trial configs are drawn: random samples, a grid of every choice, or Optuna's TPE (pip install 'raywaste[optuna]')."),
    click.option("--metric", type=click.Choice(METRIC_CHOICES), default=_TUNE.metric, show_default=True,
                 help="Validation metric that ranks trials. auto: average precision for binary tasks, macro F1 otherwise; "
                      "f1: F1 of the positive class (binary tasks)."),
    click.option("--max-epochs", type=click.IntRange(min=1), default=None,
                 help="Epochs of a trial that is not stopped early. [default: the search space's, 15]"),
    click.option("--grace-period", type=click.IntRange(min=1), default=None,
                 help=f"ASHA: epochs every trial runs before it may be stopped. [default: {DEFAULT_GRACE_PERIOD}, "
                      "or --max-epochs when that is fewer]"),
    click.option("--reduction-factor", type=click.IntRange(min=2), default=_TUNE.reduction_factor, show_default=True,
                 help="ASHA and HyperBand: about 1 in this many trials continues at each rung."),
    click.option("--perturbation-interval", type=click.IntRange(min=1), default=_TUNE.perturbation_interval, show_default=True,
                 help="PBT: epochs between two exploit-and-explore steps."),
    click.option("--checkpoint-every", type=click.IntRange(min=1), default=_TUNE.checkpoint_every, show_default=True,
                 help="Epochs between two checkpoints of a trial; the last epoch always gets one."),
    click.option("--keep-checkpoints", type=click.IntRange(min=1), default=None,
                 help="Checkpoints kept per trial, the best by the metric (Ray also keeps the latest). [default: 2, or 3 with pbt]"),
    click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=_TUNE.cpus_per_trial, show_default=True,
                 help="CPUs each trial reserves (fractions allowed); TensorFlow uses this many threads."),
    click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=_TUNE.gpus_per_trial, show_default=True,
                 help="GPUs each trial reserves; 0.5 lets two trials share one GPU."),
    click.option("--max-concurrent-trials", type=click.IntRange(min=0), default=_TUNE.max_concurrent_trials, show_default=True,
                 help="Trials running at once (0: as many as the resources allow)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Examples per gradient step. [default: the search space's, 32]"),
    click.option("--class-weight", type=click.Choice(["balanced", "none"]), default=None,
                 help="Weight the loss so every class counts the same, or not at all. [default: the search space's, balanced]"),
)
_TUNE_SETTING_NAMES = ("num_samples", "scheduler", "search", "metric", "max_epochs", "grace_period", "reduction_factor",
                       "perturbation_interval", "checkpoint_every", "keep_checkpoints", "cpus_per_trial", "gpus_per_trial",
                       "max_concurrent_trials", "batch_size", "class_weight")


def _handle_errors(function: Callable) -> Callable:
    """Turn the pipeline's expected errors into a one-line message and exit status 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from raywaste.annotations import AnnotationsError
        from raywaste.dataset import DatasetError
        from raywaste.evaluation import EvaluationError
        from raywaste.prediction import PredictionError
        from raywaste.preprocessing import PreprocessError
        from raywaste.runtime import RayAddressError
        from raywaste.search_space import SearchSpaceError
        from raywaste.tasks import TaskError
        from raywaste.tune_settings import TuningError

        expected = (AnnotationsError, DatasetError, EvaluationError, PredictionError, PreprocessError, RayAddressError,
                    SearchSpaceError, TaskError, TuningError, SplitError)
        from raywaste.tuning import TuningInterrupted

        try:
            return function(*args, **kwargs)
        except TuningInterrupted as error:
            # 130, as for a shell command stopped by Ctrl-C, so that job scripts can tell it apart.
            click.echo(f"Error: {error}", err=True)
            sys.exit(INTERRUPTED_EXIT_STATUS)
        except expected as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def _preprocess_inputs(params: dict, seed: int, overwrite: bool) -> tuple[PreprocessSettings, RunOptions, Path | None]:
    """Build the preprocessing settings and run options from the parsed CLI options."""
    try:
        image = ImageSettings(size=params["image_size"], color_mode=params["color_mode"], square=params["square"],
                              padding=params["padding"], min_box_size=params["min_box_size"])
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    settings = PreprocessSettings(task=params["task"], image=image, fractions=params["fractions"], seed=seed,
                                  min_class_examples=params["min_class_examples"])
    try:
        options = RunOptions(photos_per_task=params["photos_per_task"], max_error_fraction=params["max_error_fraction"],
                             overwrite=overwrite, dataset_name=params["dataset_name"])
    except ValueError as error:
        hint = "'--dataset-name'" if "dataset name" in str(error) else None
        raise click.BadParameter(str(error), param_hint=hint) from None
    return settings, options, params["annotations"]


def _tune_settings(params: dict, seed: int) -> TuneSettings:
    """Build the tuning settings from the parsed CLI options."""
    try:
        return TuneSettings(seed=seed, **{name: params[name] for name in _TUNE_SETTING_NAMES})
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _check_tune_inputs(out: Path, settings: TuneSettings, space: Path | None, overwrite: bool, command: str) -> None:
    """Check the search space, the settings and OUT/tune before Ray starts, so that mistakes show at once."""
    from raywaste.search_space import default_search_space, load_search_space
    from raywaste.tune_settings import check_combination
    from raywaste.tuning import TUNE_DIR, check_new_experiment

    check_combination(settings, settings.apply_to(load_search_space(space) if space else default_search_space()))
    experiment_dir = out.resolve() / TUNE_DIR
    if command == "run" and experiment_dir.exists() and not overwrite:
        # run has no --resume, so its advice names the commands that continue there.
        raise click.ClickException(
            f"{experiment_dir} already exists; continue that tuning run with 'raywaste tune --resume {out}' and then "
            f"'raywaste evaluate {out}', or pass --overwrite to run everything again (the dataset is rebuilt too)")
    check_new_experiment(out, overwrite)


def _reject_options_with_resume(context: click.Context, names: tuple[str, ...]) -> None:
    """Stop when --resume comes with tuning options, which the interrupted run has already fixed."""
    given = [name for name in names if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"--resume continues the run with its own settings (OUT/tune/tuning.json); leave out {flags}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="raywaste")
@click.option("-v", "--verbose", count=True,
              help="-v: raywaste's debug output; -vv: also other libraries' info messages. [default: each stage's steps]")
def main(verbose: int) -> None:
    """Turn the TACO litter dataset into a tuned waste classifier with Ray."""
    _configure_logging(verbose)


@main.command()
@click.argument("taco_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@_preprocess_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split assignment.")
@_overwrite_option
@_address_option
@_num_cpus_option
@_handle_errors
def preprocess(taco_dir, out, seed, overwrite, address, num_cpus, **params):
    """Decode TACO photos in TACO_DIR into Parquet splits under OUT/data."""
    from raywaste.preprocessing import check_inputs
    from raywaste.preprocessing import preprocess as run_preprocess
    from raywaste.runtime import ray_session

    settings, options, annotations = _preprocess_inputs(params, seed, overwrite)
    inputs = check_inputs(taco_dir, settings, annotations)
    with ray_session(address, num_cpus):
        result = run_preprocess(taco_dir, out, settings, annotations=annotations, options=options, inputs=inputs)
    reused = " (up to date: reused; --overwrite rebuilds it)" if result.reused else ""
    click.echo(f"dataset in {result.data_dir}{reused}: " + ", ".join(f"{split} {count}" for split, count in result.info.counts.items()))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_tune_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search and of weight initialization.")
@click.option("--resume", is_flag=True, help="Continue the interrupted tuning run in OUT/tune with its own settings.")
@_overwrite_option
@_address_option
@_num_cpus_option
@_handle_errors
@click.pass_context
def tune(context, out, seed, resume, overwrite, address, num_cpus, space, **params):
    """Tune trials on the datasets in OUT with Ray Tune; save OUT/best_model.keras.

    Writes OUT/tune/results.csv, best_config.json, plots and TensorBoard files. After an
    interruption, 'raywaste tune --resume OUT' continues where the run stopped.
    """
    from raywaste.runtime import ray_session
    from raywaste.tuning import resume as resume_tune
    from raywaste.tuning import tune as run_tune

    if resume:
        from raywaste.tuning import check_resumable

        _reject_options_with_resume(context, ("space", "seed", "overwrite", *_TUNE_SETTING_NAMES))
        check_resumable(out)
        with ray_session(address, num_cpus):
            resume_tune(out)
        return
    settings = _tune_settings(params, seed)
    _check_tune_inputs(out, settings, space, overwrite, "tune")
    with ray_session(address, num_cpus):
        run_tune(out, settings, search_space=space, overwrite=overwrite)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Model to evaluate (default: OUT/best_model.keras).")
@click.option("--baseline-epochs", type=click.IntRange(min=0), default=DenseBaselineSettings().epochs, show_default=True,
              help="Training epochs of the dense-network baseline (0: leave it out).")
@_handle_errors
def evaluate(out, model, baseline_epochs):
    """Score the best model on the test split beside baselines; write OUT/metrics.json and figures."""
    from raywaste.evaluation import EvaluationSettings
    from raywaste.evaluation import evaluate as run_evaluate

    run_evaluate(out, model_path=model, settings=EvaluationSettings(dense_baseline=DenseBaselineSettings(epochs=baseline_epochs)))


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_handle_errors
def report(out):
    """Write OUT/report.html: dataset, splits, tuning and test evaluation on one page."""
    from raywaste.reporting import build_report

    click.echo(f"report written to {build_report(out)}")


@main.command()
@click.argument("annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write bar charts and a grid of sample photos as PNG files into this folder.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder that the file names in ANNOTATIONS are relative to (default: the folder of ANNOTATIONS).")
@click.option("--samples", type=click.IntRange(min=0), default=DEFAULT_SAMPLES, show_default=True,
              help="Photos in the sample grid (0: no grid).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
@_handle_errors
def inspect(annotations, plots_dir, images_dir, samples, as_json):
    """Summarize a COCO annotations file: counts, box sizes, scene tags and validation findings.

    Unlike the other commands, inspect reports every problem of an invalid file instead
    of stopping at it, and exits with status 1 when the file would not pass preprocessing.
    """
    import json

    from raywaste.inspection import count_photos, format_summary, inspect_annotations, write_plots

    taco, summary = inspect_annotations(annotations)
    photos_root = (images_dir or annotations.parent).resolve()
    photos = count_photos(taco, photos_root)
    if photos["found"] or images_dir is not None:
        summary.photos = photos
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary))

    if plots_dir is not None:
        written = write_plots(taco, summary, plots_dir, photos_root if photos["found"] else None, samples)
        if not photos["found"] and samples:
            click.echo(f"no photos found under {photos_root}, so no sample grid; pass --images DIR", err=True)
        click.echo(f"{len(written)} plot(s) written to {plots_dir}: {', '.join(path.name for path in written)}", err=as_json)
    if summary.findings.errors:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="COCO annotations that list the photos and their boxes; crop tasks classify every box.")
@click.option("--whole-image", is_flag=True, help="Crop tasks: classify each whole photo as one box instead of its annotated boxes.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes to show per photo or box.")
@click.option("--threshold", default=None,
              help="Binary tasks: label a photo positive from this probability on; 'chosen' takes the threshold that "
                   "'raywaste evaluate' chose on the val split (from metrics.json beside the model). [default: 0.5]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with all predictions and errors.")
@_handle_errors
def predict(model, images, annotations, whole_image, top_k, threshold, as_json):
    """Classify photos (files or folders) with MODEL, a .keras file or an OUT folder.

    The photos are preprocessed with the settings saved beside the model. A photo that
    cannot be read is reported and the others are still classified; the exit status is
    1 when any failed.
    """
    import json

    from raywaste.prediction import format_predictions
    from raywaste.prediction import predict as run_predict

    result = run_predict(model, list(images), annotations=annotations, whole_image=whole_image, top_k=top_k,
                         threshold=threshold)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        if result.predictions:
            click.echo(format_predictions(result))
        for error in result.errors:
            click.echo(f"error: {error.describe()}", err=True)
    if result.errors:
        sys.exit(1)


@main.command()
@click.argument("taco_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@_preprocess_options
@_tune_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits, the search and the weights.")
@_overwrite_option
@_address_option
@_num_cpus_option
@_handle_errors
def run(taco_dir, out, seed, overwrite, address, num_cpus, space, **params):
    """Preprocess TACO_DIR, tune, evaluate on the test split and write OUT/report.html."""
    from raywaste.evaluation import evaluate as run_evaluate
    from raywaste.preprocessing import check_inputs
    from raywaste.preprocessing import preprocess as run_preprocess
    from raywaste.reporting import build_report
    from raywaste.runtime import ray_session
    from raywaste.tuning import tune as run_tune

    settings, options, annotations = _preprocess_inputs(params, seed, overwrite)
    tune_settings = _tune_settings(params, seed)
    _check_tune_inputs(out, tune_settings, space, overwrite, "run")
    inputs = check_inputs(taco_dir, settings, annotations)
    with ray_session(address, num_cpus):
        run_preprocess(taco_dir, out, settings, annotations=annotations, options=options, inputs=inputs)
        run_tune(out, tune_settings, search_space=space, overwrite=overwrite)
    run_evaluate(out)
    click.echo(f"report written to {build_report(out)}")


@main.command("export-npy")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the .npy files. [default: OUT/npy, or OUT/npy-<suffix> for --dataset-name data-<suffix>]")
@click.option("--dtype", type=click.Choice(DTYPES), default=DTYPES[0], show_default=True,
              help="uint8 keeps the stored pixels; float32 divides them by 255, to [0, 1].")
@click.option("--batch-rows", type=click.IntRange(min=1), default=DEFAULT_BATCH_ROWS, show_default=True,
              help="Rows read from Parquet at a time; memory use grows with this, not with the dataset.")
@click.option("--dataset-name", default="data", show_default=True, help="Dataset folder under OUT to export.")
@_handle_errors
def export_npy(out, dest, dtype, batch_rows, dataset_name):
    """Write a dataset's splits as NumPy arrays: SPLIT_images.npy, SPLIT_labels.npy, class_names.json."""
    from raywaste.export import export_npy as run_export

    result = run_export(out, dest, dtype=dtype, batch_rows=batch_rows, dataset_name=dataset_name)
    click.echo(f"arrays in {result.dest}: " + ", ".join(f"{split} {count}" for split, count in result.counts.items()))


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


if __name__ == "__main__":
    sys.exit(main())

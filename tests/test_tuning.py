"""Tuning on the real TACO sample with a real Ray: schedulers, results, checkpoints, resources, resume."""

import csv
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import raywaste
from raywaste.dataset import DatasetError
from raywaste.preprocessing import RunOptions
from raywaste.tune_results import trial_status
from raywaste.tuning import TuningError

pytestmark = pytest.mark.slow

# Small trials: one or two conv blocks of 4 filters on 16x16 images.
TINY_MODEL = {"filters": 4, "dense_units": 8, "batch_norm": False, "activation": "relu", "dropout": 0.0}


def write_space(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def linked_out(source: Path, destination: Path) -> Path:
    """Make a fresh OUT whose dataset folders link to those of ``source``, for a run of its own."""
    destination.mkdir(parents=True)
    for folder in source.glob("data*"):
        (destination / folder.name).mkdir()
        for item in folder.iterdir():
            (destination / folder.name / item.name).symlink_to(item)
    return destination


def trial_dirs(out: Path) -> list[Path]:
    return sorted(path for path in (out / "tune").glob("trial_*") if path.is_dir())


@pytest.fixture(scope="module")
def binary_out(ray_local, taco_sample, tmp_path_factory):
    """OUT with two real datasets of the binary Bottle task: data (16 px RGB) and data-16-grayscale."""
    out = tmp_path_factory.mktemp("tuning")
    raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=16)
    options = RunOptions(dataset_name="data-16-grayscale")
    raywaste.preprocess(taco_sample, out, task="binary:Bottle", size=16, color_mode="grayscale", options=options)
    return out


@pytest.fixture(scope="module")
def asha_run(binary_out, tmp_path_factory):
    """Four ASHA trials over both datasets, with their printed output."""
    import contextlib
    import io

    space = write_space(tmp_path_factory.mktemp("space") / "space.json", {
        "model": {**TINY_MODEL, "conv_blocks": {"choice": [1, 2]}},
        "optimization": {"learning_rate": {"loguniform": [1e-3, 3e-2]}, "max_epochs": 3, "batch_size": 16},
        "data": {"color_mode": {"grid": ["rgb", "grayscale"]}, "flip": "horizontal", "rotation": {"uniform": [0.0, 0.1]}},
    })
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = raywaste.tune(binary_out, search_space=space, num_samples=2, grace_period=1, reduction_factor=2,
                               keep_checkpoints=1, seed=3)
    return binary_out, result, printed.getvalue()


def test_results_table_has_one_row_per_trial(asha_run):
    out, result, _ = asha_run
    rows = read_csv(out / "tune" / "results.csv")
    assert len(rows) == 4
    assert len({row["trial_id"] for row in rows}) == 4
    assert sorted(row["config/color_mode"] for row in rows) == ["grayscale", "grayscale", "rgb", "rgb"]
    for row in rows:
        assert row["status"] == "ok"
        epochs = int(row["epochs"])
        assert 1 <= epochs <= 3
        assert row["stopped_early"] == str(epochs < 3)
        assert 0.0 <= float(row["best_val_average_precision"]) <= 1.0
        assert float(row["best_val_average_precision"]) >= float(row["last_val_average_precision"])
        assert float(row["time_s"]) > 0
        assert row["config/max_epochs"] == "3"
    best_values = [float(row["best_val_average_precision"]) for row in rows]
    assert best_values == sorted(best_values, reverse=True)
    assert result.trials[0]["trial_id"] == rows[0]["trial_id"]


def test_metric_and_mode_stored(asha_run):
    out, result, _ = asha_run
    assert (result.metric, result.mode) == ("val_average_precision", "max")
    run = json.loads((out / "tune" / "tuning.json").read_text())
    assert (run["metric"], run["mode"]) == ("val_average_precision", "max")
    assert run["datasets"] == {"16-rgb": "data", "16-grayscale": "data-16-grayscale"}
    model_info = json.loads((out / "best_model.json").read_text())
    assert (model_info["metric"], model_info["mode"]) == ("val_average_precision", "max")


def test_best_model_matches_best_config(asha_run):
    import keras

    out, result, _ = asha_run
    model_info = json.loads((out / "best_model.json").read_text())
    best_config = json.loads((out / "tune" / "best_config.json").read_text())
    assert model_info["config"] == best_config == result.best_config
    assert model_info["task"] == "binary:Bottle"
    assert model_info["class_names"] == ["no Bottle", "Bottle"]
    assert model_info["image_size"] == 16
    assert model_info["color_mode"] == best_config["color_mode"]
    assert model_info["data_dir"] == {"rgb": "data", "grayscale": "data-16-grayscale"}[best_config["color_mode"]]
    assert model_info["best_metric"] == pytest.approx(result.best_metric)
    assert 1 <= model_info["epoch"] <= 3
    best_row = next(row for row in result.trials if row["trial_id"] == model_info["trial_id"])
    assert best_row["best_val_average_precision"] >= model_info["best_metric"]

    model = keras.models.load_model(out / "best_model.keras")
    channels = 3 if best_config["color_mode"] == "rgb" else 1
    assert tuple(model.input_shape[1:]) == (16, 16, channels)
    assert "RandomFlip" in [layer.__class__.__name__ for layer in model.layers]

    evaluated = raywaste.evaluate(out)
    assert evaluated.report["num_examples"] == 10


def test_trials_keep_their_best_checkpoints(asha_run):
    out, _, _ = asha_run
    for trial in trial_dirs(out):
        checkpoints = sorted(trial.glob("checkpoint_*"))
        # keep_checkpoints=1: the best one, plus the latest when that is another.
        assert 1 <= len(checkpoints) <= 2, trial
        for checkpoint in checkpoints:
            assert (checkpoint / "model.keras").is_file()
            state = json.loads((checkpoint / "state.json").read_text())
            assert 1 <= state["epoch"] <= 3


def test_tensorflow_threads_follow_trial_cpus(asha_run):
    out, _, _ = asha_run
    for trial in trial_dirs(out):
        rows = read_csv(trial / "progress.csv")
        assert rows
        assert {row["cpu_threads"] for row in rows} == {"1"}, trial


def test_tensorboard_files_per_trial(asha_run):
    import tensorflow as tf

    out, _, printed = asha_run
    for trial in trial_dirs(out):
        events = sorted((trial / "tensorboard").glob("events.out.tfevents.*"))
        assert events, f"no event file in {trial}"
        steps = {
            event.step
            for path in events
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value
            if value.tag == "val_average_precision"
        }
        epochs = int(read_csv(trial / "progress.csv")[-1]["epoch"])
        assert steps == set(range(1, epochs + 1)), trial
        # Ray Tune's own TensorBoard logger is off: its files would duplicate the trial's.
        assert not list(trial.glob("events.out.tfevents.*")), trial
    assert f"tensorboard --logdir {out / 'tune'}" in printed
    assert "To visualize your results with TensorBoard" not in printed


def test_plots_are_drawn(asha_run):
    import matplotlib.image

    out, result, _ = asha_run
    assert [path.name for path in result.plots] == ["metric_by_epoch.png", "hyperparameters.png"]
    for path in result.plots:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300
        assert image.shape[1] > 500
        assert image[..., :3].std() > 0.05, f"{path} looks blank"


def test_pbt_restores_continue_epoch_and_optimizer(binary_out, tmp_path):
    """Two PBT trials of 2 CPUs take turns on the 2-CPU Ray, so PBT pauses and restores them at every perturbation."""
    space = write_space(tmp_path / "space.json", {
        "model": {**TINY_MODEL, "conv_blocks": 1},
        "optimization": {"learning_rate": {"loguniform": [1e-3, 3e-2]}, "max_epochs": 2, "batch_size": 16},
        "data": {"flip": "none"},
    })
    out = linked_out(binary_out, tmp_path / "out")
    raywaste.tune(out, search_space=space, scheduler="pbt", num_samples=2, perturbation_interval=1, keep_checkpoints=3,
                  cpus_per_trial=2)
    steps_per_epoch = 6  # 82 training photos in batches of 16
    restored = 0
    for trial in trial_dirs(out):
        rows = read_csv(trial / "progress.csv")
        assert {int(row["epoch"]) for row in rows} == {1, 2}, trial
        assert {row["cpu_threads"] for row in rows} == {"2"}, trial
        for row in rows:
            assert row["epoch"] == row["training_iteration"], trial
            assert int(row["optimizer_iterations"]) == int(row["epoch"]) * steps_per_epoch, trial
            assert int(row["resumed_from_epoch"]) < int(row["epoch"]), trial
        restored += sum(1 for row in rows if int(row["resumed_from_epoch"]) > 0)
    assert restored > 0


def test_request_no_node_can_hold_fails_at_once(binary_out, tmp_path):
    out = linked_out(binary_out, tmp_path / "out")
    with pytest.raises(TuningError) as raised:
        raywaste.tune(out, cpus_per_trial=3)
    assert "each trial requests 3 CPUs and 0 GPUs, but the largest Ray node has 2 CPUs and 0 GPUs" in str(raised.value)
    with pytest.raises(TuningError, match="requests 1 CPUs and 0.5 GPUs, but the largest Ray node has 2 CPUs and 0 GPUs"):
        raywaste.tune(out, gpus_per_trial=0.5)
    assert not (out / "tune").exists()


def test_existing_run_needs_resume_or_overwrite(asha_run):
    out, _, _ = asha_run
    with pytest.raises(TuningError, match="pass --resume to continue that run, or --overwrite"):
        raywaste.tune(out, max_epochs=2, grace_period=1)


def test_missing_dataset_is_named(binary_out):
    space = {"data": {"image_size": 64}}
    with pytest.raises(DatasetError) as raised:
        raywaste.tune(binary_out, search_space=space, overwrite=True)
    message = str(raised.value)
    assert "no preprocessed dataset with image size 64 and color mode rgb" in message
    assert "data (16 px, rgb), data-16-grayscale (16 px, grayscale)" in message
    assert "--image-size 64 --color-mode rgb --dataset-name data-64-rgb" in message


def test_val_without_positives_rejected(ray_local, taco_sample, tmp_path):
    # With 1% of the sample's 102 photos in val, its only val photo shows no bottle.
    raywaste.preprocess(taco_sample, tmp_path, task="binary:Bottle", size=16, fractions="0.98,0.01,0.01")
    with pytest.raises(TuningError, match="the val split.s. have no 'Bottle' example"):
        raywaste.tune(tmp_path, num_samples=1, max_epochs=1)
    assert not (tmp_path / "tune").exists()


def test_too_many_blocks_for_images(binary_out):
    with pytest.raises(TuningError, match="model.conv_blocks up to 5 shrinks the 16x16 images below one pixel"):
        raywaste.tune(binary_out, search_space={"model": {"conv_blocks": {"choice": [1, 5]}}}, overwrite=True)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna is not installed (pip install 'raywaste[optuna]')")
def test_optuna_search(binary_out, tmp_path):
    space = write_space(tmp_path / "space.json", {
        "model": {**TINY_MODEL, "conv_blocks": {"choice": [1, 2]}},
        "optimization": {"learning_rate": {"loguniform": [1e-3, 3e-2]}, "max_epochs": 1},
        "data": {"flip": "none"},
    })
    out = linked_out(binary_out, tmp_path / "out")
    result = raywaste.tune(out, search_space=space, search="optuna", scheduler="fifo", num_samples=2,
                           max_concurrent_trials=2, metric="f1")
    assert result.metric == "val_f1"
    assert len(result.trials) == 2
    assert glob.glob(str(out / "tune" / "searcher-state-*.pkl"))
    assert all(0.0 <= row["best_val_f1"] <= 1.0 for row in result.trials)


# Resume after SIGKILL. The driver runs in a subprocess with its own local Ray in its own
# temporary folder. Every process of that Ray inherits MARKER_VARIABLE, so the test finds
# and ends those processes, and only them.

MARKER_VARIABLE = "RAYWASTE_TEST_RAY_SESSION"


def processes_with_marker(marker: str) -> list[int]:
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def end_marked_processes(marker: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = processes_with_marker(marker)
        if not remaining:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the test's Ray still alive after {timeout_s} s: {remaining}")
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the driver exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def driver_environment() -> tuple[str, str, dict[str, str]]:
    """Return a marker, a temporary folder for Ray and the environment of a driver that starts a Ray of its own."""
    marker = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({MARKER_VARIABLE: marker, "RAY_TMPDIR": ray_tmp})
    return marker, ray_tmp, env


def trial_states(out: Path) -> dict[str, tuple[str, int]]:
    """Return each trial's status and last reported epoch from Ray Tune's saved experiment state."""
    files = sorted((out / "tune").glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except json.JSONDecodeError:  # read while Ray rewrites it
        return {}
    states = {}
    for trial_state, runtime in state["trial_data"]:
        trial = json.loads(trial_state)
        runtime = json.loads(runtime) if isinstance(runtime, str) else runtime
        states[trial["trial_id"]] = (trial["status"], int((runtime.get("last_result") or {}).get("epoch", 0)))
    return states


@pytest.mark.parametrize(
    "has_error, done, saved_status, expected",
    [
        (False, True, "TERMINATED", "ok"),
        (False, True, "RUNNING", "ok"),  # finished after the last saved state
        (False, False, "TERMINATED", "ok"),  # finished before an interruption, then resumed
        (False, False, "RUNNING", "interrupted"),
        (False, False, "PAUSED", "interrupted"),
        (False, False, "PENDING", "interrupted"),
        (False, False, None, "interrupted"),
        (True, False, "ERROR", "error"),
        (True, True, "TERMINATED", "error"),
    ],
)
def test_trial_status_cases(has_error, done, saved_status, expected):
    assert trial_status(has_error, done, saved_status) == expected


def test_resume_after_driver_killed(ray_local, taco_sample, taco_maps, tmp_path):
    out = tmp_path / "out"
    raywaste.preprocess(taco_sample, out, task=f"map:{taco_maps / 'map_10.csv'}", size=16)
    space = write_space(tmp_path / "space.json", {
        "model": {**TINY_MODEL, "conv_blocks": 1},
        "optimization": {"learning_rate": {"choice": [0.003, 0.01]}, "max_epochs": 3, "batch_size": 32},
        "data": {"flip": "none"},
    })
    marker, ray_tmp, env = driver_environment()
    command = [sys.executable, "-m", "raywaste", "tune", str(out), "--num-cpus", "2"]
    log = tmp_path / "driver.log"
    try:
        with log.open("w") as handle:
            driver = subprocess.Popen(
                command + ["--space", str(space), "--scheduler", "fifo", "--num-samples", "4"],
                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
            # Kill once some trial has a checkpoint and the experiment state lists all four
            # trials with at least one of them unfinished.
            wait_for(
                lambda: glob.glob(str(out / "tune" / "trial_*" / "checkpoint_*"))
                and len(trial_states(out)) == 4
                and any(status != "TERMINATED" for status, _ in trial_states(out).values()),
                timeout_s=600, what="the first checkpoint", process=driver, log=log,
            )
            before = trial_states(out)
            finished_rows = {
                trial_id: len(read_csv(out / "tune" / f"trial_{trial_id}" / "progress.csv"))
                for trial_id, (status, _) in before.items() if status == "TERMINATED"
            }
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
        end_marked_processes(marker)
        assert not (out / "best_model.keras").exists()

        resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        end_marked_processes(marker)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)

    after = trial_states(out)
    assert set(after) == set(before)
    assert {status for status, _ in after.values()} == {"TERMINATED"}
    rows = read_csv(out / "tune" / "results.csv")
    assert sorted(row["trial_id"] for row in rows) == sorted(before)
    for row in rows:
        assert row["status"] == "ok"
        assert row["epochs"] == "3"
        assert row["stopped_early"] == "False"
    for trial_id in before:
        progress = read_csv(out / "tune" / f"trial_{trial_id}" / "progress.csv")
        assert {int(row["epoch"]) for row in progress} == {1, 2, 3}, trial_id
        counts = np.bincount([int(row["epoch"]) for row in progress])
        # A trial restored after the kill repeats at most the epochs after its last checkpoint.
        assert counts.max() <= 2, trial_id
        assert all(row["val_macro_f1"] and row["val_accuracy"] for row in progress)
        if trial_id in finished_rows:
            assert len(progress) == finished_rows[trial_id], f"finished trial {trial_id} ran again"
        elif before[trial_id][1] > 0:
            # Every epoch is checkpointed, so a trial that had reported continues from that epoch or a later one.
            assert max(int(row["resumed_from_epoch"]) for row in progress) >= before[trial_id][1], trial_id
    model_info = json.loads((out / "best_model.json").read_text())
    assert model_info["metric"] == "val_macro_f1"
    assert model_info["task"].startswith("map:")


def test_cli_reports_invalid_space_and_combinations(binary_out, tmp_path):
    from click.testing import CliRunner

    from raywaste.cli import main

    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dropout: {uniform: [0.1, 1.5]}\n")
    result = runner.invoke(main, ["tune", str(binary_out), "--space", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: model.dropout: invalid value 1.5" in result.output

    result = runner.invoke(main, ["tune", str(binary_out), "--scheduler", "pbt", "--search", "grid", "--overwrite"])
    assert result.exit_code == 1
    assert "PBT mutates hyperparameters during trials, which defeats a grid" in result.output

    result = runner.invoke(main, ["tune", str(binary_out), "--metric", "macro_f1", "--overwrite"])
    assert result.exit_code == 1
    assert "metric 'macro_f1' does not apply to a binary task" in result.output


def test_cli_resume_takes_no_tuning_options(binary_out, tmp_path):
    from click.testing import CliRunner

    from raywaste.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["tune", "--resume", str(binary_out), "--num-samples", "3", "--scheduler", "fifo"])
    assert result.exit_code == 2
    assert "leave out --num-samples, --scheduler" in result.output

    empty = linked_out(binary_out, tmp_path / "out")
    result = runner.invoke(main, ["tune", "--resume", str(empty)])
    assert result.exit_code == 1
    assert f"no tuning run to resume in {empty / 'tune'}" in result.output


def test_interrupted_run_saves_no_model(binary_out, tmp_path):
    """SIGINT (Ctrl-C) to the driver: no model, unfinished trials marked interrupted, then a resume finishes them."""
    out = linked_out(binary_out, tmp_path / "out")
    space = write_space(tmp_path / "space.json", {
        "model": {**TINY_MODEL, "conv_blocks": 1},
        "optimization": {"learning_rate": {"choice": [0.003, 0.01]}, "batch_size": 32},
        "data": {"flip": "none"},
    })
    marker, ray_tmp, env = driver_environment()
    command = [sys.executable, "-m", "raywaste", "tune", str(out), "--num-cpus", "2"]
    log = tmp_path / "driver.log"
    max_epochs = 6

    def some_trial_reported() -> bool:
        return any(read_csv(path) for path in (out / "tune").glob("trial_*/progress.csv"))

    try:
        with log.open("w") as handle:
            # Three FIFO trials of one CPU on two CPUs: the third waits until another one ends.
            driver = subprocess.Popen(
                command + ["--space", str(space), "--scheduler", "fifo", "--num-samples", "3", "--max-epochs", str(max_epochs)],
                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
            wait_for(some_trial_reported, timeout_s=600, what="the first reported epoch", process=driver, log=log)
            driver.send_signal(signal.SIGINT)
            driver.wait(timeout=120)
        printed = log.read_text()
        end_marked_processes(marker)

        assert driver.returncode == 130, printed[-3000:]
        assert "tuning was interrupted: " in printed
        assert f"Continue the run with: raywaste tune --resume {out}\n" in printed
        assert "To visualize your results with TensorBoard" not in printed
        assert "best model saved" not in printed
        assert not (out / "best_model.keras").exists()
        assert not (out / "best_model.json").exists()
        rows = read_csv(out / "tune" / "results.csv")
        assert {f"trial_{row['trial_id']}" for row in rows} == {path.name for path in trial_dirs(out)}
        assert len(rows) == 3
        interrupted = [row for row in rows if row["status"] == "interrupted"]
        assert interrupted
        assert {row["status"] for row in rows} <= {"ok", "interrupted"}
        assert all(row["stopped_early"] == "False" for row in rows)
        for row in rows:
            if row["status"] == "ok":
                assert row["epochs"] == str(max_epochs)
        finished = len(rows) - len(interrupted)
        assert f"tuning was interrupted: {finished} of 3 trials finished." in printed

        resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        end_marked_processes(marker)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)

    assert "To visualize your results with TensorBoard" not in resumed.stdout + resumed.stderr
    assert "3 trials, 0 stopped early, 0 failed" in resumed.stdout
    rows = read_csv(out / "tune" / "results.csv")
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "ok"
        assert row["epochs"] == str(max_epochs)
        assert row["stopped_early"] == "False"
    model_info = json.loads((out / "best_model.json").read_text())
    assert model_info["trial_id"] in {row["trial_id"] for row in rows}
    assert (out / "best_model.keras").is_file()

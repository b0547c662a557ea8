"""Preprocessing on a Ray head and two worker nodes writes the same dataset as on one node."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import raywaste
from raywaste.dataset import read_split_table
from raywaste.preprocessing import RunOptions

pytestmark = pytest.mark.slow

# Small sample photos, so that the three Ray starts dominate the run time.
PHOTOS = ["batch_1/000004.jpg", "batch_1/000006.jpg", "batch_1/000007.jpg", "batch_1/000008.jpg",
          "batch_1/000012.jpg", "batch_1/000013.jpg", "batch_1/000021.jpg", "batch_1/000022.jpg",
          "batch_1/000035.jpg", "batch_1/000047.jpg", "batch_1/000054.jpg", "batch_1/000058.jpg"]
TIMEOUT_S = 600


def subset_annotations(taco_sample: Path, target: Path) -> Path:
    sample = json.loads((taco_sample / "annotations.json").read_text())
    images = [image for image in sample["images"] if image["file_name"] in PHOTOS]
    ids = {image["id"] for image in images}
    annotations = [a for a in sample["annotations"] if a["image_id"] in ids]
    target.write_text(json.dumps({**sample, "images": images, "annotations": annotations}))
    return target


def run_in_own_session(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run ``command`` in a new process group, and kill the whole group (Ray's processes too) on timeout."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"multi-node run timed out after {TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.fixture(scope="module")
def runs(ray_local, taco_sample, tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    annotations = subset_annotations(taco_sample, base / "annotations.json")
    # A short private RAY_TMPDIR: Ray's socket paths must stay under about 100 characters,
    # and the clusters' address file must not replace the one other Ray users rely on.
    ray_tmp = tempfile.mkdtemp(prefix="rw-ray-")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    script = Path(__file__).with_name("multinode_run.py")
    try:
        result = run_in_own_session([sys.executable, str(script), str(taco_sample), str(annotations), str(base), str(base / "result.json")], env)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    assert result.returncode == 0, result.stdout[-4000:]

    # The reference: this session's local Ray with 2 CPUs, 8 photos per task.
    raywaste.preprocess(taco_sample, base / "two-cpus", annotations=annotations, task="supercategory", size=32, padding=0.1,
                        fractions="0.6,0.2,0.2", options=RunOptions(photos_per_task=8))
    return base, json.loads((base / "result.json").read_text())


def test_tasks_ran_on_all_three_nodes(runs):
    base, result = runs
    assert len(result["node_ids"]) == 3
    tasks = [json.loads(line) for line in (base / "three-nodes" / "data" / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == len(PHOTOS)
    assert {task["node_id"] for task in tasks} == set(result["node_ids"])


@pytest.mark.parametrize("layout", ["one-cpu", "three-nodes"])
def test_same_dataset_as_two_cpus(runs, layout):
    base, _ = runs
    for split in ("train", "val", "test"):
        expected = read_split_table(base / "two-cpus" / "data", split)
        actual = read_split_table(base / layout / "data", split)
        assert actual.num_rows == expected.num_rows > 0
        assert actual.equals(expected), split
    for name in ("errors.jsonl", "dataset.json", "split_summary.csv"):
        assert (base / layout / "data" / name).read_text() == (base / "two-cpus" / "data" / name).read_text(), name

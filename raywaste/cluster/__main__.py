"""``python -m raywaste.cluster``: the commands behind the shell wrappers in ``cluster/``.

Progress and errors go to stderr. ``start`` prints only the path of ``ray.env`` on
stdout, so a shell can capture it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import click

from raywaste.cluster.allocation import job_key
from raywaste.cluster.errors import ClusterError
from raywaste.cluster.jobdir import JobDir
from raywaste.cluster.lifecycle import start_cluster, start_node, stop_cluster, stop_node
from raywaste.cluster.ports import derive_ports
from raywaste.cluster.settings import ClusterSettings


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    # PBS sends SIGTERM on qdel and at the walltime; turning it into KeyboardInterrupt
    # lets a start in progress stop the nodes it already started.
    raise KeyboardInterrupt(f"signal {signum}")


def _fail(error: ClusterError) -> None:
    click.echo(f"raywaste.cluster: error: {error}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
def main(quiet: bool) -> None:
    """Start, inspect and stop a token-authenticated Ray cluster inside a PBS or Slurm job."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.WARNING if quiet else logging.INFO,
        stream=sys.stderr,
    )


@main.command()
@click.option(
    "--node-script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Path of cluster/ray-node.sh, which the launcher runs on every other node.",
)
def start(node_script: Path) -> None:
    """Start the cluster of the current job (run on its first node); print the ray.env path."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # Ray's own processes print to file descriptor 1 (a raylet that dies, for one), so
    # send it to stderr while the cluster starts; stdout gets only the ray.env path.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        started = start_cluster(os.environ, node_script)
    except ClusterError as error:
        _fail(error)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    plan = started.plan
    for line in (
        f"Ray cluster of job {plan.job_id}: {len(plan.nodes)} nodes, {plan.num_cpus} CPUs and {plan.num_gpus} GPUs each",
        f"  address:   {plan.address} (RAY_ADDRESS in {started.job_dir.env_file})",
        f"  dashboard: {plan.dashboard_url} (token in {started.job_dir.token})",
        f"  tunnel:    {started.tunnel}",
        f"             (also in {started.dashboard_note})",
    ):
        click.echo(line, err=True)
    click.echo(str(started.job_dir.env_file))


@main.command()
@click.option(
    "--job-dir",
    envvar="RAYWASTE_JOB_DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Job directory of the cluster [default: $RAYWASTE_JOB_DIR].",
)
def stop(job_dir: Path) -> None:
    """Stop this job's Ray processes on every node and delete its token."""
    try:
        problems = stop_cluster(JobDir(job_dir), ClusterSettings.from_env(os.environ))
    except ClusterError as error:
        _fail(error)
    if problems:
        sys.exit(1)


@main.group()
def node() -> None:
    """Commands that the launcher runs on one node."""


@node.command("start")
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("index", type=int)
def node_start(job_dir: Path, index: int) -> None:
    """Join node INDEX of the plan in JOB_DIR to the cluster; blocks while Ray runs."""
    try:
        start_node(JobDir(job_dir), index)
    except ClusterError as error:
        _fail(error)


@node.command("stop")
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("index", type=int)
def node_stop(job_dir: Path, index: int) -> None:
    """Stop the Ray processes of node INDEX of the plan in JOB_DIR on this host."""
    try:
        left = stop_node(JobDir(job_dir).read_plan(), index, ClusterSettings.from_env(os.environ))
    except ClusterError as error:
        _fail(error)
    if left:
        sys.exit(1)


@main.command()
@click.option("--versions", is_flag=True, help="Also print Python, NumPy, TensorFlow and Ray versions of every node.")
@click.option("--tasks", is_flag=True, help="Also print how many tasks ran on every node.")
def report(versions: bool, tasks: bool) -> None:
    """Print the nodes and resources of the cluster in RAY_ADDRESS."""
    from raywaste.cluster.report import print_report

    print_report(versions=versions, tasks=tasks)


@main.command()
@click.argument("job_id")
def ports(job_id: str) -> None:
    """Print the ports that JOB_ID gets when its first block is free."""
    settings = ClusterSettings.from_env(os.environ)
    try:
        derived = derive_ports(job_key(job_id), settings.port_min, settings.port_max)
    except ClusterError as error:
        _fail(error)
    for name, port in vars(derived).items():
        click.echo(f"{name} {port}")


if __name__ == "__main__":
    main()

"""The ``raywaste`` command line: one subcommand per pipeline stage.

Imports of Ray and TensorFlow happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import logging

import click

from raywaste import __version__


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

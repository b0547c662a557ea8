"""Describe the machine and its load next to every benchmark number."""

from __future__ import annotations

import os
import platform
import shlex
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def load_average() -> float:
    """The 1-minute load average (runnable processes), or NaN where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def describe() -> str:
    """One line: CPUs, CPU model, memory, Python, and the current 1-minute load average."""
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), {memory_gib():.0f} GiB memory, "
        f"Python {platform.python_version()} on {platform.system()}; load average {load_average():.1f}"
    )


def command_line() -> str:
    return "python " + " ".join(shlex.quote(argument) for argument in sys.argv)

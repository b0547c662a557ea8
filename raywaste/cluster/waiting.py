"""The one bounded wait of the cluster steps."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float) -> bool:
    """Call ``condition`` every ``interval_s`` seconds until it returns True or ``timeout_s`` passes.

    Returns whether the condition became true. It is checked once more at the deadline,
    and exceptions from it propagate, so a check can end the wait early with an error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval_s, remaining))

"""The scenario recorder that the subprocess workers share (not collected: no test_).

A worker decorates each scenario with `scenario`: it runs at once, and its
dict of plain facts (or the error it raised, with a traceback) goes into one
JSON file, rewritten after each, so one failure does not hide the others and
a crash keeps what ran before it. A worker may be split into groups run as
separate processes at once (`recorder(path, group, groups)`).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable


def recorder(path: str, group: int = 0, groups: int = 1) -> tuple[dict, Callable]:
    """The results dict and the `scenario` decorator that fills it and writes `path`.

    With `groups` > 1, the scenarios are numbered in the order they are defined
    and this process runs only those whose number is `group` modulo `groups`:
    `groups` processes, started at once, share the scenarios between them.
    """
    results: dict = {"seconds": {}}
    defined = [0]

    def scenario(function):
        """Runs `function()` now and records its dict, or the error it raised."""
        number, defined[0] = defined[0], defined[0] + 1
        if number % groups != group:
            return function
        start = time.perf_counter()
        try:
            results[function.__name__] = function()
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[function.__name__] = {
                "error": f"{type(error).__name__}: {error}"[:1000],
                "traceback": "".join(traceback.format_tb(error.__traceback__))[-4000:]}
        # Wall seconds per scenario, to balance the groups (not asserted).
        results["seconds"][function.__name__] = round(time.perf_counter() - start, 2)
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        return function

    return results, scenario

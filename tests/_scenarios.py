"""The scenario recorder that the subprocess workers share (not collected: no test_).

A worker decorates each scenario with `scenario`: it runs at once, and its
dict of plain facts (or the error it raised, with a traceback) goes into one
JSON file, rewritten after each, so one failure does not hide the others and
a crash keeps what ran before it.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable


def recorder(path: str) -> tuple[dict, Callable]:
    """The results dict and the `scenario` decorator that fills it and writes `path`."""
    results: dict = {}

    def scenario(function):
        """Runs `function()` now and records its dict, or the error it raised."""
        try:
            results[function.__name__] = function()
        except Exception as error:  # noqa: BLE001 - recorded for the test to report
            results[function.__name__] = {
                "error": f"{type(error).__name__}: {error}"[:1000],
                "traceback": "".join(traceback.format_tb(error.__traceback__))[-4000:]}
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
        return function

    return results, scenario

"""Shared by the hardening tests: figures for the release note, printed at module teardown.

Not a test module (no `test_` prefix). Each module collects its numbers in a
dict and hands them to `emit`, which writes them to pytest's terminal (visible
without `-s`) and, if GOODINIT_FIGURES_DIR is set, to `<dir>/<name>.json`.
"""

from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def _nothing():
    yield


def emit(request, name: str, figures: dict, lines: list[str]) -> None:
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is not None and lines:
        # Module teardown output is captured; write past the capture to the terminal.
        with capture.global_and_fixture_disabled() if capture else _nothing():
            reporter.write_line("")
            for line in [f"[figures: {name}]", *lines]:
                reporter.write_line(line)
    directory = os.environ.get("GOODINIT_FIGURES_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{name}.json"), "w") as handle:
            json.dump(figures, handle, indent=1, sort_keys=True, default=str)

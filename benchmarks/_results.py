"""`--json PATH`: a benchmark's figures with the machine, load and versions they were taken on.

docs/gen_measurements.py turns the files under benchmarks/results/ into the
documentation's Measurements page.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not on this platform
        return None


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("keras", "tensorflow", "tensorflow-cpu", "jax", "torch", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class Recorder:
    """Started before the measurements (the load then), written after them."""

    def __init__(self, benchmark: str):
        self.benchmark = benchmark
        args, skip = [], False
        for arg in sys.argv[1:]:  # the command as run, less where its JSON went
            if not skip and not arg.startswith("--json"):
                args.append(arg)
            skip = arg == "--json"
        self.command = " ".join(["python", os.path.relpath(sys.argv[0]), *args])
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = _load()

    def write(self, path: str, rows: list[dict], **extra) -> None:
        """Writes the rows and their context as JSON to `path`."""
        ended = datetime.datetime.now(datetime.timezone.utc)
        result = {
            "benchmark": self.benchmark,
            "command": self.command,
            "date": self.started.strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round((ended - self.started).total_seconds(), 1),
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "system": f"{platform.system()} {platform.machine()}",
                        "python": platform.python_version(),
                        "load_before": self.load_before, "load_after": _load()},
            "versions": _versions(),
            **extra,
            "rows": rows,
        }
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")
        print(f"wrote {path}")

"""Tests of examples/compare_inits.py: the --quick run in a subprocess, the rest in-process."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_SCRIPT = _ROOT / "examples" / "compare_inits.py"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DEFAULT_INITS = ("orthogonal", "orthogonal_datadep", "he_proposed", "orthogonal_proposed",
                  "lsuv")
_RESNET_INITS = ("default", "mean_field", "lsuv_residual", "lsuv")
_HEADER = ("| init | final train acc | final test acc | best test acc "
           "| diverged | max epoch loss | h_L/x at init | seconds |")
_RESNET_HEADER = ("| init | final train acc | final test acc | best test acc | diverged "
                  "| max epoch loss | h_L/x at init | max stream var at init | seconds |")


def _run(*args: str) -> subprocess.CompletedProcess:
    """Runs the script as a user does. A subprocess: importing it here would define
    train.py's absl flags a second time next to tests/test_train_example.py's copy."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # A guard against a hang, not a speed check: the --quick run takes about 30 s of CPU,
    # and ran past 300 s of wall time at a load of 34 on 2 cores.
    return subprocess.run([sys.executable, str(_SCRIPT), *args], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of the script as a user runs it: (stdout, output directory)."""
    out = tmp_path_factory.mktemp("compare")
    completed = _run("--quick", f"--output={out / 'curves.png'}")
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, out


def test_quick_run_writes_png_and_json(quick_run):
    _, out = quick_run
    assert (out / "curves.png").read_bytes()[:8] == _PNG_MAGIC
    report = json.loads((out / "curves.json").read_text())
    config = report["config"]
    assert config["preset"] == "quick" and config["depth"] == 10 and config["epochs"] == 2
    assert config["resnet_blocks"] == 1 and config["resnet_epochs"] == 1
    results = report["results"]
    assert [r["init"] for r in results] == list(_DEFAULT_INITS)
    for result in results:
        assert isinstance(result["diverged"], bool)
        for key in ("final_train_accuracy", "final_test_accuracy", "best_test_accuracy"):
            assert 0.0 <= result[key] <= 1.0, (result["init"], key, result[key])
        assert result["best_test_accuracy"] >= result["final_test_accuracy"]
        assert result["seconds"] > 0
        if result["diverged"]:
            assert isinstance(result["diverged_at_step"], int) and result["diverged_at_step"] >= 1
        else:
            assert result["diverged_at_step"] is None
            assert result["epochs_run"] == 2
            assert len(result["history"]["val_accuracy"]) == 2
        # One signal row per hidden layer, plus the classifier.
        assert len(result["signal"]["norm_ratio"]) == 11


def test_quick_run_trains_the_resnet_row(quick_run):
    _, out = quick_run
    results = json.loads((out / "curves.json").read_text())["resnet_results"]
    assert [r["init"] for r in results] == list(_RESNET_INITS)
    for result in results:
        assert 0.0 <= result["final_test_accuracy"] <= 1.0 and result["epochs_run"] == 1
        # ResNet-8: 3 stages of 1 block, each with its stream variance at init.
        assert len(result["signal"]["stream_variance"]) == 3
        assert result["max_stream_variance"] == max(result["signal"]["stream_variance"]) > 0
    by_init = {r["init"]: r for r in results}
    # With N = 1 per stage, mean_field_init's branch end has gamma = 1: the stream's
    # variance can at most double per block from the stem's (the forward rule keeps the
    # input's norm, 1/16 of the digits' unit variance per channel at 16 channels), so it
    # stays far below plain LSUV's: its stem and branch ends have unit variance each, so
    # about 2 at the first Add.
    assert by_init["mean_field"]["max_stream_variance"] < 1.0
    assert by_init["lsuv"]["max_stream_variance"] > 1.0


def test_quick_run_prints_the_table(quick_run):
    stdout, _ = quick_run
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0] == _HEADER
    resnet_start = table.index(_RESNET_HEADER)
    rows = table[2:resnet_start]
    assert len(rows) == len(_DEFAULT_INITS)
    resnet_rows = table[resnet_start + 2:]
    assert [row.split("(`")[1].split("`)")[0] for row in resnet_rows] == list(_RESNET_INITS)
    for init, row in zip(_DEFAULT_INITS, rows):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert f"(`{init}`)" in cells[0]
        assert all(0.0 <= float(value) <= 1.0 for value in cells[1:4])
        assert cells[4] == "no" or cells[4].startswith("yes, step ")
    # Progress while training: before each run, which of how many and the time left; then
    # Keras' line per epoch (--verbose=2 is the default), before the table.
    lines = stdout.splitlines()
    runs = [(init, "(MLP depth 10, seed 0)") for init in _DEFAULT_INITS]
    runs += [(f"ResNet {init}", "(ResNet-8, seed 0)") for init in _RESNET_INITS]
    for number, (init, network) in enumerate(runs, 1):
        (start,) = [index for index, line in enumerate(lines)
                    if line.endswith(f"] training {init} {network} ...")]
        match = re.fullmatch(r"\[run (\d+) of (\d+), (.*)\] .*", lines[start])
        assert match and match.group(1, 2) == (str(number), str(len(runs))), lines[start]
        if number == 1:
            assert match.group(3) == "time left estimated after this run"
        else:
            assert re.fullmatch(r"\d+:\d\d elapsed, about \d+:\d\d left", match.group(3))
        epoch = start + 1
        if "MLP" in network:  # Keras prints no "Epoch 1/1" for the ResNet's single epoch
            assert lines[epoch] == "Epoch 1/2", lines[start:start + 4]
            epoch += 1
        assert " - loss: " in lines[epoch] and " - val_accuracy: " in lines[epoch]
    assert stdout.count("Epoch 2/2") == len(_DEFAULT_INITS)
    assert "no-BN ResNet-8 on digits" in stdout
    assert stdout.index("Epoch 2/2") < stdout.index(table[0])
    # At depth 10 the proposed init learns within 2 epochs (chance is 0.1).
    report = json.loads((quick_run[1] / "curves.json").read_text())
    proposed = next(r for r in report["results"] if r["init"] == "orthogonal_proposed")
    assert proposed["final_test_accuracy"] > 0.3 and not proposed["diverged"]


def _script():
    """The script as a module, in this process (no TensorFlow start-up per test)."""
    spec = importlib.util.spec_from_file_location("goodinit_compare_inits", _SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_divergence_is_recorded_with_its_step(tmp_path, capsys):
    # Two seeds: the spread over seeds and the --json summary, in the same cheap run.
    _script().main(["--quick", "--inits=orthogonal_proposed", "--epochs=1", "--lr=1e4",
                    "--resnet_inits=", "--verbose=0", "--seeds=3,4",
                    f"--output={tmp_path / 'diverged.png'}",
                    f"--json={tmp_path / 'summary.json'}"])
    stdout = capsys.readouterr().out
    report = json.loads((tmp_path / "diverged.json").read_text())
    assert report["config"]["epochs"] == 1  # an explicit flag wins over --quick
    assert report["config"]["seeds"] == [3, 4]
    assert [result["seed"] for result in report["results"]] == [3, 4]
    for result in report["results"]:
        assert result["diverged"] is True and result["epochs_run"] == 1
        step = result["diverged_at_step"]
        assert isinstance(step, int) and 1 <= step <= report["config"]["steps_per_epoch"]
        assert re.search(rf"seed {result['seed']} \|.*\| yes, step {step} \|", stdout)
        assert 0 < result["cpu_seconds"] and 0 < result["seconds"]
    assert (tmp_path / "diverged.png").read_bytes()[:8] == _PNG_MAGIC
    assert "Epoch 1/1" not in stdout  # --verbose=0: no progress lines
    assert report["resnet_results"] == [] and "ResNet" not in stdout
    (spread,) = report["spread"]
    accuracies = [result["final_test_accuracy"] for result in report["results"]]
    assert spread["final_test_accuracy"] == {
        "min": min(accuracies), "median": sum(accuracies) / 2, "max": max(accuracies)}
    assert spread["diverged"] == 2 and spread["seeds"] == [3, 4]
    assert "| 2 of 2 |" in stdout  # the spread table

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmark"] == "compare_inits" and summary["preset"] == "quick"
    assert summary["spread"] == report["spread"]
    assert summary["machine"]["cpus"] >= 1 and "keras" in summary["versions"]
    for row, result in zip(summary["rows"], report["results"], strict=True):
        assert row["network"] == "mlp"
        for key in ("init", "seed", "final_test_accuracy", "best_test_accuracy", "diverged",
                    "diverged_at_step", "seconds", "cpu_seconds"):
            assert row[key] == result[key], key
        assert row["h_L_over_x_at_init"] == result["signal"]["norm_ratio"][-2]


def _parse_error(capsys, *args: str) -> str:
    """The script's own argument check, in this process: no TensorFlow start-up per case."""
    with pytest.raises(SystemExit) as exit_info:
        _script().parse_args(list(args))
    assert exit_info.value.code == 2  # argparse's usage error, as on the command line
    return capsys.readouterr().err


def test_rejects_unknown_resnet_init(capsys):
    stderr = _parse_error(capsys, "--resnet_inits=mean_field,glorot")
    assert "--resnet_inits must be a comma-separated list" in stderr and "glorot" in stderr


def test_rejects_bad_verbose(capsys):
    assert "--verbose" in _parse_error(capsys, "--verbose=3")


def test_rejects_unknown_init(capsys):
    stderr = _parse_error(capsys, "--inits=orthogonal,xavier")
    assert "--inits must be a comma-separated list" in stderr and "xavier" in stderr


def test_presets_and_explicit_flags(capsys):
    script = _script()
    default = script.parse_args([])
    assert default.preset == "default" and default.seeds == [0]
    assert {name: getattr(default, name) for name in script.PRESETS["default"]} == {
        "depth": 50, "epochs": 10, "resnet_blocks": 3, "resnet_epochs": 2}
    full = script.parse_args(["--full", "--epochs=3"])
    assert (full.preset, full.depth, full.epochs, full.resnet_blocks, full.resnet_epochs) == (
        "full", 100, 3, 3, 10)
    assert script.parse_args(["--seeds=2, 5", "--seed=9"]).seeds == [2, 5]
    assert "not allowed with argument" in _parse_error(capsys, "--quick", "--full")


def test_rejects_bad_seeds(capsys):
    assert "--seeds must be comma-separated integers" in _parse_error(capsys, "--seeds=1,x")
    assert "--seeds must name at least one seed" in _parse_error(capsys, "--seeds=,")


def test_progress_estimates_from_the_work_done(monkeypatch, capsys):
    script = _script()
    now = [100.0]
    monkeypatch.setattr(script.time, "perf_counter", lambda: now[0])
    progress = script._Progress([1.0, 1.0, 2.0])
    progress.begin("first")
    now[0] += 10.0  # the first run, of work 1, took 10 s: 3 units of work are left
    progress.end()
    progress.begin("second")
    now[0] += 50.0
    progress.end()
    progress.begin("third")  # 60 s for 2 units: 2 units are 60 s more
    assert capsys.readouterr().out.splitlines() == [
        "[run 1 of 3, time left estimated after this run] first",
        "[run 2 of 3, 0:10 elapsed, about 0:30 left] second",
        "[run 3 of 3, 1:00 elapsed, about 1:00 left] third",
    ]

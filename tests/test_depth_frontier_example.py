"""examples/depth_frontier.py end to end at small depth, in its own process (absl flags)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_depth_frontier_runs_and_reports(tmp_path):
    output, plot = tmp_path / "rows.json", tmp_path / "plot.png"
    env = dict(os.environ, PYTHONPATH=str(_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(_ROOT / "examples" / "depth_frontier.py"),
         "--nets=tanh_mlp,resnet", "--inits=critical,default,skipinit,mean_field",
         "--depths=4", "--seeds=0", "--steps=60", f"--output={output}", f"--plot={plot}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["net"], r["init"]): r for r in json.loads(output.read_text())["rows"]}
    assert set(rows) == {("tanh_mlp", "critical"), ("tanh_mlp", "default"),
                         ("resnet", "skipinit"), ("resnet", "mean_field"),
                         ("resnet", "default")}
    assert plot.stat().st_size > 0
    assert "| tanh_mlp | critical | 4 |" in done.stdout
    for row in rows.values():
        assert row["steps"] == 60 and not row["diverged"]
        assert row["lr"] == 0.1 / 4  # lr0 / depth
        # 60 SGD steps at a stable learning rate take a 4-layer net well above chance (0.1).
        assert row["test_accuracy"] > 0.3, row
    # SkipInit starts every branch at zero: from the stem's output to the features the
    # network is the identity, so every singular value is 1 (to float32 rounding).
    skip = rows[("resnet", "skipinit")]
    assert abs(skip["mean_squared"] - 1) < 1e-5 and abs(skip["spread"] - 1) < 1e-5
    # At tanh's edge of chaos chi_1 = 1 per layer: the deep stack's mean squared singular
    # value is 1 up to finite-width fluctuations (width 64, 3 layers: a few per cent).
    assert 0.8 < rows[("tanh_mlp", "critical")]["mean_squared"] < 1.25
    assert np.isfinite(rows[("resnet", "mean_field")]["spread"])


def test_depth_frontier_q_star_per_depth_without_bias_is_labelled(tmp_path):
    # --q_star_depth=c sets q* = c / depth; --nobias drops the tanh networks' biases. The
    # rows carry both in their setting, and the table shows them beside the init.
    output = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(_ROOT / "examples" / "depth_frontier.py"),
         "--nets=tanh_cnn", "--inits=critical", "--depths=4", "--seeds=0", "--steps=0",
         "--q_star_depth=0.3", "--nobias", f"--output={output}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(output.read_text())["rows"]
    assert row["setting"] == "q* = 0.3/depth, no bias"
    assert row["q_star"] == 0.3 / 4 and "test_accuracy" not in row
    assert "| tanh_cnn | critical (q* = 0.3/depth, no bias) | 4 | 0.075 |" in done.stdout
    # The isometry band for the critical orthogonal networks.
    assert 0.5 <= row["mean_squared"] <= 2 and np.isfinite(row["spread"])

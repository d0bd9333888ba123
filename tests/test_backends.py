"""The backend-portable features under Keras' JAX and PyTorch backends (issue 11).

Keras reads KERAS_BACKEND once, at import, so each backend runs
tests/_backend_worker.py in its own process, with TensorFlow made
unimportable there (as if it were not installed). The worker records facts,
these tests assert them. A `.keras` file goes each way between this
(TensorFlow) process and each worker: saved under one backend, loaded under
the other, with the same outputs on the same batch.

Tolerances: a kernel's unit norms are exact to float32 rounding (1e-5
relative, a few ulps of a 64-term sum); orthogonality of the structured draw
within 8 sqrt(m) eps, as in test_initializers.py; a model loaded on another
backend, or a signal_report there, computes the same float32 sums in another
order: reordered(depth, n) of the values' scale (tests/_rounding.py).

The sweep (lsuv_init, weightnorm_data_init, LSUVCallback, mean_field_init
with data, signal_report) runs through jax.jit on JAX and eagerly on torch: on
a model and batch saved by this process it must give the weights and figures
TensorFlow's compiled sweep gives, and norm_ratios TensorFlow's ratios.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from _rounding import assert_signal_agrees, longest_sum, magnitude, reordered

from keras_goodinit import WeightNormalization, lsuv_init, signal_report, weightnorm_data_init
from keras_goodinit.models import wn_resnet
from keras_goodinit.propagation import mlp_chain, norm_ratios, residual_chain

WORKER = Path(__file__).with_name("_backend_worker.py")
# A kill switch for a hung worker, not a speed bound: every group of both backends runs at
# once, within this many seconds of their start (on 2 cores the JAX groups took 11 min at
# load 17 and ran past 30 min at load 34).
TIMEOUT = 3600
GROUPS = 2  # worker processes per backend (each runs every other scenario)
BACKENDS = ("jax", "torch")
ROUNDING = 1e-5
SIGNAL_FIELDS = ("mean", "std", "norm_ratio", "grad_norm_ratio", "weight_grad_std")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A weight-normalized ResNet saved under TensorFlow, with its outputs on a batch."""
    folder = tmp_path_factory.mktemp("backends")
    keras.utils.set_random_seed(0)
    model = wn_resnet((8, 8, 3), 3, num_blocks=1, width=8)
    x = np.random.default_rng(1).normal(size=(8, 8, 8, 3)).astype("float32")
    # Move g and v off their init so the file carries trained values.
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    model.save(folder / "from_tf.keras")
    np.savez(folder / "from_tf.npz", x=x, y=keras.ops.convert_to_numpy(model(x)))
    # A model before LSUV and data-dependent init, and its weights after each, here.
    keras.utils.set_random_seed(2)
    before = wn_resnet((8, 8, 3), 3, num_blocks=2, width=8, init="he")
    before.save(folder / "init_before.keras")
    batch = np.random.default_rng(3).normal(size=(32, 8, 8, 3)).astype("float32")
    for method, init in (("lsuv", lambda m: lsuv_init(m, batch, pre_init=None, verbose=0)),
                         ("data_init", lambda m: weightnorm_data_init(m, batch, verbose=0))):
        model = keras.saving.load_model(folder / "init_before.keras")
        init(model)
        np.savez(folder / f"{method}_after.npz", x=batch,
                 **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    labels = np.arange(32) % 3
    report = signal_report(keras.saving.load_model(folder / "init_before.keras"),
                           (batch, labels), seed=3)
    np.savez(folder / "signal.npz", x=batch, y=labels, loss=report.loss,
             block_variance=report.block_column("variance"),
             **{field: report.column(field) for field in SIGNAL_FIELDS})
    ratios = {}
    chain_x = np.random.default_rng(4).normal(size=(64, 24)).astype("float32")
    for name, chain in (("mlp_chain", mlp_chain([24] + [16] * 5, seed=1)),
                        ("residual_chain", residual_chain(24, 12, 3, seed=1))):
        chain.save(folder / f"{name}.keras")
        ratios[f"{name}_forward"], ratios[f"{name}_backward"] = norm_ratios(chain, chain_x,
                                                                            seed=4)
    np.savez(folder / "norm_ratios.npz", x=chain_x, **ratios)
    (folder / "signal.json").write_text(json.dumps(
        {"loss_name": report.loss_name, "grad_reference": report.grad_reference,
         "longest_sum": longest_sum(before, batch)}))
    return folder


@pytest.fixture(scope="module")
def started(shared):
    """Every backend's worker, as GROUPS processes each, all started at once.

    Each process runs every GROUPS-th scenario (_backend_worker.py), so the
    scenarios share the CPUs the test processes leave, rather than
    queueing behind one another after this module's TensorFlow work.
    """
    processes = {}
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
               # Two CPU devices for JAX's DataParallel scenario.
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        for group in range(GROUPS):
            out, log = shared / f"{backend}_{group}.json", shared / f"{backend}_{group}.log"
            with open(log, "w") as handle:  # a file, not a pipe: no process waits on a reader
                process = subprocess.Popen(
                    [sys.executable, str(WORKER), str(out), str(shared), f"{group}/{GROUPS}"],
                    stdout=handle, stderr=subprocess.STDOUT, text=True, env=env)
            processes[backend, group] = process, out, log
    deadline = time.monotonic() + TIMEOUT
    yield processes, deadline
    for process, _, _ in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=BACKENDS)
def worker(request, started):
    """(backend, the facts its worker processes recorded, the shared folder)."""
    backend = request.param
    processes, deadline = started
    results = {"seconds": {}}
    for group in range(GROUPS):
        process, out, log = processes[backend, group]
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output = log.read_text()
        assert out.exists() and "DONE" in output, output[-6000:]
        part = json.loads(out.read_text())
        results["seconds"].update(part.pop("seconds"))
        results.update(part)
    return backend, results, out.parent


def fact(worker, name):
    _, results, _ = worker
    result = results[name]
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    return result


def test_the_worker_ran_on_its_backend_without_tensorflow(worker):
    backend, results, _ = worker
    assert results["backend"] == backend
    imported = fact(worker, "imported_without_tensorflow")
    assert not imported["tensorflow_loaded"]
    assert {"GoodInit", "WeightNormalization", "lsuv_init"} <= set(imported["exports"])


def test_goodinit_norms_orthogonality_and_seeds(worker):
    r = fact(worker, "goodinit_norms_and_seeds")
    assert max(r["norm_errors"].values()) < ROUNDING, r["norm_errors"]
    assert r["gram_error"] < 8 * math.sqrt(64) * float(np.finfo("float32").eps), r
    # What Keras' RNG guarantees on every backend: an int seed repeats, a generator moves
    # on. The values themselves differ between backends (each has its own generator).
    assert r["int_seed_repeats"] and r["generator_differs"], r


def test_structured_orthogonal_draw(worker):
    r = fact(worker, "structured_draw_is_orthonormal")
    assert r["orthogonality_error"] < r["bound"], r
    assert r["norm_error"] < 1e-5 and r["max_entry"] < r["haar_bound"], r


def test_weight_norm_fit_and_jit_compile(worker):
    fit = fact(worker, "weight_norm_fit")
    assert fit["moved"] > 1e-3 and all(np.isfinite(fit["losses"])), fit
    assert fit["norms_are_g"] < 1e-5, fit
    jit = fact(worker, "weight_norm_jit_compile")
    assert all(np.isfinite(jit["losses"])) and jit["predict_vs_call"] < ROUNDING, jit


def test_weight_norm_mixed_precision(worker):
    r = fact(worker, "weight_norm_mixed_precision")
    assert r["loss_finite"] and r["output_dtype"] == "float16", r
    # Variables stay float32, and so does the effective kernel.
    assert r["variable_dtype"] == "float32" and r["kernel_dtype"] == "float32", r


def test_bake_weight_norm(worker):
    r = fact(worker, "bake_weight_norm_equal_outputs")
    assert r["max_diff"] < ROUNDING and not r["has_wn"], r


def test_mean_field_init_without_data(worker):
    r = fact(worker, "mean_field_init_without_data")
    assert r["gammas"][:4] == [2.0] * 4 and r["first_norm_error"] < ROUNDING, r


@pytest.mark.parametrize("method", ["lsuv", "data_init"])
def test_the_eager_sweep_gives_the_weights_tensorflow_gives(worker, method):
    backend, _, _ = worker
    name = {"lsuv": "lsuv_init", "data_init": "weightnorm_data_init"}[method]
    found = fact(worker, f"{name}_matches_tensorflow")
    # JAX: one jax.jit program by default; torch: the eager sweep, which says why.
    assert found["auto"]["mode"] == ("xla" if backend == "jax" else "eager"), found
    assert found["eager"]["mode"] == "eager", found
    if backend == "torch":
        assert any(backend in note for note in found["auto"]["notes"]), found
    for r in found.values():
        assert "ok" in r["statuses"] and r["same_shapes"], r
        # The same float32 forward on the same weights and batch; the statistics are
        # float64 on torch and float32 on JAX (no x64), so the scales agree to float32
        # rounding of sums over the batch: relative 1e-4.
        assert r["max_rel_diff"] < 1e-4, r


def test_lsuv_orthogonal_pre_init_and_the_callback_in_fit(worker):
    r = fact(worker, "lsuv_orthogonal_pre_init_and_callback_in_fit")
    assert set(r["statuses"]) <= {"ok", "skipped"} and "ok" in r["statuses"], r
    assert all(abs(v - 1.0) < 0.1 for v in r["var_after"]), r  # tol = 0.1
    assert "ok" in r["callback_statuses"], r
    assert r["second_reason"] and "already" in r["second_reason"], r


def test_mean_field_init_measures_with_data(worker):
    measured = fact(worker, "mean_field_init_with_data")["measured"]
    assert measured and all(np.isfinite(measured)) and min(measured) > 0, measured


def test_signal_report_gives_tensorflows_figures(worker):
    backend, _, folder = worker
    r = fact(worker, "signal_report_matches_tensorflow")
    expected = np.load(folder / "signal.npz")
    names = json.loads((folder / "signal.json").read_text())
    assert r["mode"] == ("xla" if backend == "jax" else "eager") and r["blocks"] > 0, r
    assert (r["loss_name"], r["grad_reference"]) == (names["loss_name"],
                                                     names["grad_reference"]), r
    # The same forward and backward pass, through the backend's own autodiff: other
    # kernels, the same sums in other orders (tests/_rounding.py).
    assert_signal_agrees(r, expected, names["longest_sum"], err_msg=backend)
    np.testing.assert_allclose(r["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(r["block_variance"], expected["block_variance"], rtol=1e-4)


def test_norm_ratios_give_tensorflows_figures(worker):
    backend, _, folder = worker
    r = fact(worker, "norm_ratios_match_tensorflow")
    expected = np.load(folder / "norm_ratios.npz")
    for name in ("mlp_chain", "residual_chain"):
        for direction in ("forward", "backward"):
            # float32 passes whose sums run in other orders: rounding, far below 1e-4.
            np.testing.assert_allclose(r[name][direction], expected[f"{name}_{direction}"],
                                       rtol=1e-4, err_msg=f"{backend} {name} {direction}")


def test_norm_ratios_of_a_subclassed_model(worker):
    backend, _, _ = worker
    r = fact(worker, "norm_ratios_of_a_subclassed_model")
    if backend == "jax":  # gradients at the layers' outputs need the layer graph there
        message = r["error_message"]
        assert "functional or Sequential" in message and "KERAS_BACKEND" not in message
        assert "'jax' backend" in message and "Received: model=" in message, message
    else:  # a tape sees the subclassed call's tensors
        assert r["forward"][0] == 1.0 and r["backward"][-1] == 1.0, r
        assert len(r["forward"]) == 3 and all(v > 0 for v in r["forward"] + r["backward"]), r


def across_backends(model, y):
    """|y - y'| for `model`'s outputs `y` computed by another backend's kernels: the same
    sums (fan-ins; inference mode takes no batch statistics) in other orders, through a
    chain as deep as its kernels (tests/_rounding.py)."""
    kernels = [w.shape for w in model.weights if len(w.shape) >= 2]
    return reordered(len(kernels), max(int(np.prod(shape[:-1])) for shape in kernels),
                     magnitude(y))


def test_a_model_saved_under_tensorflow_loads_with_equal_outputs(worker):
    _, _, folder = worker
    r = fact(worker, "loads_a_model_saved_under_tensorflow")
    saved = np.load(folder / "from_tf.npz")
    bound = across_backends(keras.saving.load_model(folder / "from_tf.keras"), saved["y"])
    assert r["wn_layers"] > 0 and r["max_diff"] < bound, (r, bound)


def test_a_model_saved_under_the_backend_loads_under_tensorflow(worker):
    backend, _, folder = worker
    assert fact(worker, "saves_a_model_for_tensorflow")["saved"]
    model = keras.saving.load_model(folder / f"from_{backend}.keras")
    saved = np.load(folder / f"from_{backend}.npz")
    assert any(isinstance(layer, WeightNormalization) for layer in model._flatten_layers())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(saved["x"])), saved["y"],
                               rtol=0, atol=across_backends(model, saved["y"]))


@pytest.mark.parametrize("worker", ["jax"], indirect=True)  # jax.jit is JAX's
def test_the_jitted_sweep_is_traced_once_and_reused(worker):
    r = fact(worker, "jitted_sweep_is_traced_once")
    assert r["modes"] == ["xla", "xla"], r
    # The layer's Python runs once, tracing the first call; the second runs the cached
    # program, which reads the weights the first call wrote (all within tol: 0 steps).
    assert r["first_calls"] == 1 and r["second_calls"] == 0, r
    assert r["second_iterations"] and not any(r["second_iterations"]), r


@pytest.mark.parametrize("worker", ["jax"], indirect=True)
def test_the_jitted_signal_report_is_traced_once_and_reads_new_labels(worker):
    r = fact(worker, "jitted_signal_report_is_traced_once")
    assert r["modes"] == ["xla", "xla", "eager"], r
    assert r["first_calls"] >= 1 and r["second_calls"] == 0, r
    # New labels are an input of the cached program, not a constant of its trace.
    assert r["losses"][0] != r["losses"][1], r
    np.testing.assert_allclose(r["losses"][1], r["losses"][2], rtol=1e-5)
    assert_signal_agrees({f: r[f"jitted_{f}"] for f in SIGNAL_FIELDS},
                         {f: r[f"eager_{f}"] for f in SIGNAL_FIELDS}, r["longest_sum"])


@pytest.mark.parametrize("worker", ["jax"], indirect=True)
def test_the_jitted_signal_report_tells_an_unreached_head(worker):
    r = fact(worker, "jitted_signal_report_discards_an_unreached_head")
    assert r["mode"] == "xla" and r["rows"] == ["d0", "aux", "d1"], r
    # The discarded head's gradient is all zeros in the program: not reaching the loss.
    assert r["grad_reference"] == "d1", r
    assert r["grad_norm_ratio"][1] is None and r["weight_grad_std"][1] is None, r
    assert r["grad_norm_ratio"][2] == 1.0 and r["grad_norm_ratio"][0] > 0, r


@pytest.mark.parametrize("worker", ["jax"], indirect=True)  # keras.distribution is JAX's
def test_jax_data_parallel_keeps_replicas_identical(worker):
    r = fact(worker, "data_parallel")
    assert r["devices"] == 2, r
    # [copies per variable, identical]: replicated on both devices, equal after GoodInit,
    # after mean_field_init and after training.
    assert r["built"] == r["initialized"] == r["fit"] == [2, True], r
    assert r["moved"] > 1e-3, r


@pytest.mark.parametrize("backend, package, extra", [
    ("tensorflow", "tensorflow", "[tf]"), ("jax", "jax", "[jax]"), ("torch", "torch", "[torch]")])
def test_a_missing_backend_package_names_its_extra(backend, package, extra):
    # Checked before Keras is imported: Keras' own error would name no extra.
    code = (f"import sys\nsys.modules[{package!r}] = None\n"
            "try:\n    import keras_goodinit\nexcept ImportError as error:\n"
            "    print(error)\nelse:\n    print('imported')\n")
    env = {**os.environ, "KERAS_BACKEND": backend}
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
    message = process.stdout
    # The package is not on PyPI: the message gives the install from a clone (issue 17).
    assert f'pip install ".{extra}"' in message and "not on PyPI" in message, (
        message + process.stderr[-2000:])
    assert f"{package} is not installed" in message, message
    assert all(name in message for name in ("[tf]", "[tf-cpu]", "[jax]", "[torch]")), message


# SignalMonitor (issue 20), on JAX and PyTorch: tests/_backend_worker.py trains with it.


def test_signal_monitor_records_through_one_program_during_fit(worker):
    from _rounding import reordered

    backend, _, _ = worker
    r = fact(worker, "signal_monitor_during_fit")
    # Every 2 steps of 4 per epoch; a second fit of 2 epochs goes on from step 4, its
    # epochs counted from 0 again, as Keras counts them.
    assert r["steps"] == [0, 2, 4, 6, 8, 10, 12] and r["epochs"] == [0, 0, 0, 0, 0, 1, 1], r
    assert r["modes"] == (["xla"] if backend == "jax" else ["eager"]), r
    if backend == "jax":  # 4 more records, synced mid-epoch, and no new trace
        assert r["first_calls"] >= 1 and r["later_calls"] == 0, r
    else:  # eager: each record runs the layer's Python again
        assert r["later_calls"] >= 4, r
    assert (r["rows"], r["blocks"], r["panels"]) == (10, 3, 7), r
    assert r["alarms"] == [] and not r["tensorflow_loaded"], r
    # The weights moved between every two records, so that the comparison below tells a
    # record of stale weights (on JAX, not synced mid-epoch) from the right one.
    assert len(set(r["losses"])) == len(r["losses"]), r
    # Each record is signal_report of the weights of its step, set back into the model: the
    # same values to the rounding of the pass (10 layers, sums of at most 3 * 3 * 16 terms;
    # a gradient goes forward and back through all of them), not another step's.
    forward, backward = reordered(10, 144), reordered(20, 144)
    bounds = {"mean": None, "std": forward, "norm_ratio": forward, "block_variance": forward,
              "loss": backward, "grad_norm_ratio": backward, "weight_grad_std": backward}
    for field, bound in bounds.items():
        if bound is not None:  # a mean near 0 has no relative bound
            assert r["differences"][field] <= bound, (field, r["differences"])


def test_signal_monitor_event_files_read_back_with_tensorboards_reader(worker):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = fact(worker, "signal_monitor_during_fit")
    folder = Path(r["folder"])
    with open(folder / "history.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert [record["step"] for record in records] == r["steps"]
    expected = {}  # tag -> [(step, value)], from the monitor's JSON Lines history
    for record in records:
        scalars = {"probe_loss": record["loss"]}
        for row in record["rows"]:
            scalars.update({f"{f}/{row['name']}": row[f] for f in SIGNAL_FIELDS})
        for block in record["blocks"]:
            scalars.update({f"block_{f}/{block['name']}": block[f] for f in
                            ("squared_mean", "variance", "branch_variance", "skip_variance")})
        for tag, value in scalars.items():
            expected.setdefault(tag, []).append((record["step"], float(value)))
    reader = EventAccumulator(str(folder / "signal"), size_guidance={"scalars": 0,
                                                                     "histograms": 0})
    reader.Reload()
    assert sorted(reader.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        events = reader.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in points], tag
        # TensorBoard keeps float32: the history's value rounded to float32, exactly.
        np.testing.assert_array_equal(np.float32([e.value for e in events]),
                                      np.float32([value for _, value in points]), err_msg=tag)
    histograms = reader.Tags()["histograms"]
    assert len(histograms) == r["rows"] and "activation/classifier" in histograms
    assert [e.step for e in reader.Histograms("activation/classifier")] == r["steps"]
    with open(folder / "history.csv") as handle:
        assert len(handle.readlines()) == 1 + len(records) * (r["rows"] + r["blocks"])


def test_signal_monitor_stops_training_and_names_the_layer(worker):
    r = fact(worker, "signal_monitor_stops_on_explosion")
    assert r["epochs_run"] == 1 and r["stop_training"], r
    assert r["alarm"] == [0, "big", "norm_ratio", "explodes"], r
    # ||1e4 x|| / ||x|| = 1e4 to float32 rounding (2 layers, sums of 8 terms).
    assert abs(r["value"] - 1e4) <= 1e4 * 2 * math.sqrt(8) * float(np.finfo("float32").eps), r
    assert r["warnings"] == [f"SignalMonitor: stopping training: {r['reason']}"], r


def test_weight_norm_data_init_in_fit(worker):
    """WeightNormalization(data_init=True): fit (jit_compile on JAX) does the init once."""
    backend = worker[0]
    r = fact(worker, "wn_data_init_in_fit")
    # The pre-activation output on the first batch has per-unit mean 0 and std 1, to float32
    # rounding of the conv and the batch sums ((fan_in + log2 count) eps max|y|).
    assert r["flag"] and r["mean_error"] <= r["bound"] and r["std_error"] <= r["bound"], r
    if backend == "jax":
        # Keras' JAX trainer keeps only non-trainable assignments: the init went into the
        # shifts, and the first eager use folded them into g and the bias.
        assert r["pending"] > 0 and r["folded"] == 0.0, r
    else:
        assert r["pending"] == 0.0, r
    # Another batch, a reloaded model: no second init (lr 0: nothing else moves g).
    assert r["redone"] == 0.0 and r["reloaded_flag"] and r["reload_redone"] == 0.0, r
    assert r["reload_out"] <= ROUNDING * r["out_size"], r
    assert r["bake_out"] <= ROUNDING * r["out_size"], r
    # weightnorm_data_init sets the same g (same rule, same batch) and the flag.
    assert r["explicit_flag"] and r["explicit_g"] <= ROUNDING, r


def test_bake_of_an_int8_weight_norm_model(worker):
    r = fact(worker, "wn_bake_int8")
    # The baked Dense holds the quantized layer's integer kernel and scales: its output is
    # the quantized model's to float32 rounding of a 16-term sum; the float model's is
    # within int8's rounding of it, derived from the scales (was about 100 % off).
    assert r["mode"] == "int8" and r["unchanged"], r
    assert r["vs_quantized"] <= 16 * float(np.finfo("float32").eps) * r["size"], r
    assert 0 < r["vs_float"] and r["over_int8_bound"] <= 1 + 1e-3, r


def test_weight_norm_data_init_under_jax_data_parallel(worker):
    if worker[0] != "jax":
        pytest.skip("JAX's DataParallel distribution")
    r = fact(worker, "wn_data_init_data_parallel")
    assert r["devices"] == 2 and r["replicas"] == [2, True] and r["flag"], r
    # The global batch's statistics: a single-device init on the same 32 samples.
    assert r["vs_single"] <= ROUNDING, r


# Issue 17 (helper H3): stale traces, untraceable models, losses without a gradient,
# statistics after a separate activation, targets the pass cannot measure.


def test_a_changed_layer_config_gets_a_new_trace(worker):
    backend = worker[0]
    r = fact(worker, "h3_a_changed_layer_config_gets_a_new_trace")
    assert r["lsuv_mode"] == ("xla" if backend == "jax" else "eager"), r
    # The second init read the new scale (x100): d1 back at unit variance, and the row says
    # what the model outputs (the stale program reported 1.0 for an output variance of 1e4).
    # Both are float32 moments of the same 512 values: 1e-5 relative (ROUNDING).
    assert r["var_after"] == pytest.approx(r["output_var"], rel=ROUNDING), r
    assert abs(r["output_var"] - 1.0) < 0.1, r
    for change in ("scale", "tanh"):
        got = r[change]
        compiled = {f: got[f"compiled_{f}"] for f in SIGNAL_FIELDS}
        eager = {f: got[f"eager_{f}"] for f in SIGNAL_FIELDS}
        assert got["mode"] == ("xla" if backend == "jax" else "eager"), got
        assert eager["std"][1] > 10, eager  # the scaled stream: 100 x a unit-scale one
        # Two layers of fan-in <= 32 and 64 x 32-value statistics (tests/_rounding.py).
        assert_signal_agrees(compiled, eager, 64 * 32, err_msg=change)


def test_an_untraceable_model_falls_back_to_eager_in_signal_report(worker):
    backend = worker[0]
    r = fact(worker, "h3_untraceable_model_signal_report")
    assert r["mode"] == "eager" and r["lsuv_mode"] == "eager", r
    assert r["rows"] == ["first", "head"] and all(math.isfinite(s) for s in r["std"]), r
    if backend == "jax":
        # JAX differentiates by tracing: no backward pass, and the note says why.
        assert "could not be traced (ConcretizationTypeError" in r["note"], r
        assert "no backward pass" in r["note"], r
        assert all(math.isnan(v) for v in r["grad_norm_ratio"]), r
        error, message = r["forced"]
        assert error == "ValueError" and "cannot be traced" in message, r
        assert "ConcretizationTypeError" in message and "compile='xla'" in message, r
    else:  # torch's autograd records the eager pass
        assert r["grad_norm_ratio"][1] == 1.0 and r["grad_norm_ratio"][0] > 0, r


def test_a_numpy_loss_is_refused(worker):
    r = fact(worker, "h3_a_numpy_loss_is_refused")
    for compile in ("auto", "eager"):
        error, message = r[compile]
        assert error == "ValueError", r
        assert "Argument `loss` gives no gradient" in message and "Received: loss=" in message


def test_statistics_are_after_a_separate_activation(worker):
    from _rounding import reordered

    r = fact(worker, "h3_statistics_after_a_separate_activation")
    assert r["rows"] == ["dense1", "dense2", "dense3", "classifier"], r
    for index in range(3):  # each followed by a ReLU layer
        assert r["mean"][index] >= 0 and r["sample_min"][index] >= 0, r
        # The ReLU layers' outputs, through other roundings: depth <= 4, 2048-term sums.
        bound = reordered(4, 64 * 32, r["expected_max"][index])
        assert abs(r["mean"][index] - r["expected_mean"][index]) <= bound, r
        assert abs(r["std"][index] - r["expected_std"][index]) <= bound, r


def test_a_target_the_pass_cannot_measure_is_a_skipped_row(worker):
    r = fact(worker, "h3_a_target_the_pass_cannot_measure_is_a_skipped_row")
    assert r["rows"][0] == ["head", "ok", ""], r
    name, status, reason = r["rows"][1]
    assert (name, status) == ("inner", "skipped") and "vectorized_map" in reason, r
    assert math.isnan(r["std"][1]), r  # JSON keeps NaN
    assert "1 of 2 target layers could not be measured" in r["note"], r
    assert r["lsuv"][1][:2] == ["inner", "skipped"] and "vectorized_map" in r["lsuv"][1][2], r


# ----------------------------------------------------------------------------
# Issue 17 (LSUVCallback's freshness rule and dtypes, force, data, float64 GoodInit).


def test_a_trained_head_that_cannot_be_checked_is_kept(worker):
    found = fact(worker, "i17_trained_head_that_cannot_be_checked_is_kept")
    assert found["kept"] and not found["report"]
    assert "['head']" in found["reason"]


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "float64", "mixed_float16",
                                    "mixed_bfloat16"])
def test_fresh_weights_match_in_every_dtype(worker, policy):
    found = fact(worker, "i17_fresh_weights_match_in_every_dtype")
    assert found[policy]["fresh"] == [None, 4]
    # 8 ulps of the stored dtype off in one entry: beyond the 4-ulp bound.
    assert found[policy]["perturbed"] == found[policy]["path"]
    assert found["float16_callback"] == {"reason": None, "ran": True}


def test_force_resets_the_optimizer_and_constraints_are_noted(worker):
    found = fact(worker, "i17_force_resets_the_optimizer_and_constraints_are_noted")
    assert found["steps_before"] == 8 and found["ran"]
    assert found["steps"] == 0 and found["slots"] == 0.0
    assert found["learning_rate"] == pytest.approx(1e-2)
    (unit, status, reason), (free, _, free_reason) = found["rows"]
    assert (unit, status, free) == ("unit", "ok", "free")
    assert "UnitNorm" in reason and "constrained" not in free_reason


def test_torch_dataloader_and_complex_data(worker):
    found = fact(worker, "i17_torch_dataloader_and_complex_data")
    for dtype in ("complex64", "complex128"):
        assert f"Received: data of dtype {dtype}" in found[dtype]
    if worker[0] != "torch":
        return
    for name in ("xy", "x"):
        assert found[name] == {"statuses": ["ok", "ok"], "same_as_first_batch": True,
                               "signal_rows": 2, "mean_field": "MeanFieldReport",
                               "callback_ran": True}


def test_float64_goodinit_is_orthonormal_to_its_rounding(worker):
    found = fact(worker, "i17_float64_goodinit_is_orthonormal_to_float64_rounding")
    for path, drawn in found.items():
        # float64 where the backend has it (JAX without x64 gives float32); an m-term dot
        # product errs by about sqrt(m) eps per pass, a few passes: 8 sqrt(m) eps.
        expected = "float32" if worker[0] == "jax" and drawn["dtype"] == "float32" else "float64"
        assert drawn["dtype"] == expected, path
        eps = float(np.finfo(expected).eps)
        assert drawn["error"] < 8 * math.sqrt(drawn["rows"]) * eps, path


def test_jacobian_spectrum(worker):
    found = fact(worker, "i21_jacobian_spectrum")
    # As in test_spectrum.py: an orthogonal chain's singular values are 1 to 9 reordered(depth,
    # width) (each kernel orthogonal to 8 sqrt(n) eps, each product one more sqrt(n) eps).
    bound = 9 * reordered(found["depth"], found["width"])
    assert found["deviation"] <= bound
    assert abs(found["mean_squared"] - 1) <= 2 * bound
    # Against the exact float64 Jacobian: two layers of sums of at most 7 terms, at the scale
    # of the largest singular value, times sqrt(k) for the norm of the perturbation.
    for output, error in found["exact_errors"].items():
        assert error <= reordered(2, 7, found["scale"]) * math.sqrt(5), output

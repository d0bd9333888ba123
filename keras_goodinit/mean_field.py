"""Data-free mean-field init of any built Sequential or functional model (Arpit et al., 2019)."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import layers as klayers
from keras import ops

from keras_goodinit import (
    _data,
    _distribute,
    _graph,
    _layouts,
    _moments,
    _patterns,
    _recurrent,
    _sweep,
    _tables,
    _validate,
    criticality,
    rules,
)
from keras_goodinit.initializers import DISTRIBUTIONS, GoodInit
from keras_goodinit.report import InitReport, LayerRecord, format_table
from keras_goodinit.rules import Signal
from keras_goodinit.weight_norm import unit_norms

RESIDUAL = ("scaled", "deepnorm", "skipinit", "rezero", "fixup", None)
CRITERIA = ("unit", "critical")
# A non-homogeneous activation's pre-activations are set to this second moment.
TARGET_Q = 1.0
# A measured second moment within this many sampling standard deviations of its
# prediction agrees with it (see `_agrees`).
_SIGMAS = 4.0
# Where the variance map's slope chi exceeds 1 by more than this, over the chain of layers
# that share an activation, the report warns (chi^depth is the growth of a deviation).
_CHI_TOLERANCE = 0.02


@dataclasses.dataclass
class MeanFieldRecord(LayerRecord):
    """One kernel layer's row of a `mean_field_init` report.

    On top of `LayerRecord`'s fields (`name` is the layer's path in the
    model, such as `"encoder_0/self_attention/query"`; `var_after` is the
    measured pre-activation variance, NaN without `data`):

    Attributes:
        gamma: The gain used, `g = sqrt(gamma * C_in / C_out)`.
        predicted: Predicted pre-activation second moment E[y^2]; NaN where
            no rule could predict it (status `"unanalysed"`).
        measured: Measured E[y^2] on `data`'s first batch; NaN without data.
        num_blocks: N of a residual branch end's `gamma / N`; 0 otherwise.
        chi: Slope of the variance map at this layer's operating point for
            the activation after it (1 for ReLU and linear layers; NaN when
            unknown): above 1, deviations grow by `chi` per layer.
        rule: Which rule set `gamma`: `"homogeneous"`, `"q=1"`, `"residual"`,
            `"head"`, `"head_paper"`, or `""` for a layer left as it was.
        tolerance: With data, the relative gap between `measured` and
            `predicted` within which they agree (sampling error of the batch,
            of the kernel's directions and of a drawn bias); NaN without data.
        q_star: With `criterion="critical"`, the fixed point of the
            activation after the layer that its pre-activations aim at
            (`criticality.critical_point`); NaN otherwise or where the
            activation has no critical line.
        chi_1: With `criterion="critical"`, `sigma_w2 E[phi'(z)^2]` at the
            predicted second moment: 1 at the edge of chaos.
        xi_c: The correlation depth scale there (infinite at the edge).
        trainable_depth: About `6 xi_c`: the depth up to which such networks
            train (Schoenholz et al. 2017).
        phase: `"critical"`, `"ordered"`, `"chaotic"` or `"marginal"` (a
            homogeneous activation: no critical line), or `""` with the
            default criterion.
    """

    gamma: float = math.nan
    predicted: float = math.nan
    measured: float = math.nan
    num_blocks: int = 0
    chi: float = math.nan
    rule: str = ""
    tolerance: float = math.nan
    q_star: float = math.nan
    chi_1: float = math.nan
    xi_c: float = math.nan
    trainable_depth: float = math.nan
    phase: str = ""


@dataclasses.dataclass
class MeanFieldReport(InitReport):
    """What `mean_field_init` did: one `MeanFieldRecord` per kernel layer.

    A row is `"ok"` only where a rule predicted its second moment and, with
    `data`, the measurement agrees with it; `"unanalysed"` where its input or
    the activation after it has no rule (its kernel is still written where
    the rule does not need them: a homogeneous activation's gain is
    scale-free); `"skipped"` where it was left as it was; `"missed"` where the
    measured second moment disagrees with the prediction.

    Attributes:
        unanalysed: `(name, class_name, reason)` of every step with no rule
            (an op without one, a layer that could not be traced): the moments
            after it are unknown.
        add_outputs: `{name: predicted second moment}` of every sum's output.
        training: The mode BatchNormalization and dropout were followed in.
        chi: `{activation: (slope, depth, drift)}` for each activation whose
            variance map is unstable at the chosen operating point (slope > 1):
            `drift = slope ** depth` is how much a deviation grows over the
            `depth` layers that use it.
        gates: `{path name: alpha}` of every `ResidualGate` the init set
            (`residual="skipinit"`).
    """

    unanalysed: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    add_outputs: dict[str, float] = dataclasses.field(default_factory=dict)
    training: bool = True
    chi: dict[str, tuple[float, int, float]] = dataclasses.field(default_factory=dict)
    gates: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["unanalysed"] = [list(item) for item in self.unanalysed]
        out["add_outputs"] = dict(self.add_outputs)
        out["training"] = self.training
        out["chi"] = {k: list(v) for k, v in self.chi.items()}
        out["gates"] = dict(self.gates)
        return out

    def table(self) -> str:
        critical = any(r.phase for r in self.rows)
        header = ("layer", "class", "gamma", "predicted q", "measured q", "chi",
                  *(("q*", "chi_1", "depth") if critical else ()), "status")
        lines = [(r.name, r.class_name, f"{r.gamma:.4g}", f"{r.predicted:.4g}",
                  f"{r.measured:.4g}", f"{r.chi:.3g}",
                  *((f"{r.q_star:.3g}", f"{r.chi_1:.4g}", f"{r.trainable_depth:.3g}")
                    if critical else ()),
                  r.status + (f" ({r.reason})" if r.reason else ""))
                 for r in self.rows]
        counts = {s: sum(r.status == s for r in self.rows)
                  for s in ("ok", "unanalysed", "missed", "skipped")}
        footer = [f"{self.method}: {len(self.rows)} kernel layers, " + ", ".join(
            f"{n} {s}" for s, n in counts.items() if n or s == "ok")]
        if self.unanalysed:
            footer.append("unanalysed (no rule; the moments after them are unknown): " + "; ".join(
                f"{name} ({reason})" for name, _, reason in self.unanalysed))
        return format_table(header, lines, "\n".join(footer + list(self.notes)))


def mean_field_init(
    model: keras.Model,
    *,
    residual: str | None = "scaled",
    criterion: str = "unit",
    q_star: float | None = None,
    distribution: str | None = "orthogonal",
    input_variance: float | None = None,
    input_mean: float | None = None,
    head: float | str = 1.0,
    attention_logits: float = 1.0,
    embeddings: bool = True,
    training: bool = True,
    data=None,
    seed: int | None = None,
    verbose: int = 1,
) -> MeanFieldReport:
    """Applies the paper's mean-field init to every kernel of a model, by walking its graph.

    Data-free: the mean and second moment of every tensor are propagated
    through the model's op-level graph (`keras_goodinit._graph`: layers, the
    ops of tensor code such as `h + x`, nested models, and subclassed layers
    traced into their ops), each step by its rule (`keras_goodinit.rules`).
    Each kernel layer (Dense, Conv*, Conv*Transpose, DepthwiseConv*,
    SeparableConv*, EinsumDense (its fans from its equation), `WeightNormalization`
    wrappers) gets, for every output unit, a fan-in vector of norm
    `g = sqrt(gamma * C_in / C_out)`:

    - What follows the layer is found through the steps its rule looks
      through (dropout, pooling, reshapes, padding, normalization): a fused
      activation, an activation layer or an activation op.
    - A *homogeneous* activation (relu, leaky_relu, prelu, linear) has a
      scale-free gain: `gamma = 1 / E[phi(z)^2]`, z ~ N(0, 1), exactly the
      paper's rule (2 for ReLU, 1 for a linear layer).
    - Any other activation (gelu, silu, tanh...) depends on the scale of its
      input, so `gamma` makes the predicted pre-activation second moment
      `q` exactly 1. Where the variance map's slope at q = 1, `chi`, exceeds
      1 (gelu, silu), no data-free scalar init is depth-stable: the report
      says by how much a deviation grows over the layers that use it
      (`chi ** depth`) and recommends `lsuv_init`.
    - With `criterion="critical"`, a kernel layer followed by an activation
      that has a critical point (`criticality.critical_point`: tanh, gelu,
      silu, elu, selu, softsign...) aims its pre-activations at that
      activation's fixed point `q*` instead of 1, and its bias is drawn
      `N(0, sigma_b2)` (written too): the edge of chaos, `chi_1 = 1`, where
      the correlation depth scale `xi_c` diverges (Poole et al. 2016;
      Schoenholz et al. 2017). Between layers of equal width this is
      `gamma = sigma_w2` exactly. The rows carry `q*`, `chi_1` at the
      predicted second moment, `xi_c` and the predicted trainable depth
      (about `6 xi_c`), and the report a note per activation. A layer with
      no bias holds `q*` with its kernel alone (`sigma_w2` times
      `q* / (q* - sigma_b2)`): its row gives the `chi_1` just above 1 and
      the finite `xi_c` of that point. An activation
      with no critical line (relu, leaky_relu: marginal) or none at `q_star`
      (sigmoid, softplus) keeps the default rule, and the row says why.
    - The head (a last kernel layer with no activation after it, or only a
      softmax) aims at logits of second moment `head` (1 by default);
      `head="paper"` keeps the paper's `g^2 = C_in / C_out`.
    - The query and key projections of an attention (`dot_product_attention`,
      as `MultiHeadAttention` and KerasHub's attention layers call it) aim at
      logits `scale * q.k` whose variance over one query's keys is
      `attention_logits`: attention starts neither uniform nor one-hot. The
      attention output's moments follow `rules.AttentionRule` (the values
      averaged by the softmax, what tokens share surviving it); where it
      assumes (a data-dependent mask, token correlation it cannot follow) the
      report says so.
    - With `embeddings=True`, each `Embedding` table (token, position,
      segment; KerasHub's `ReversibleEmbedding` too) is rescaled so that the
      stream starts at second moment 1, shared among the embeddings summed
      into it. A table tied to the output logits (`tie_weights=True`) takes
      `E[e^2] = head / d` instead: after a final normalization of unit
      variance the tied logits then have second moment `head`.
    - A residual block is any sum (an `Add` layer, `h + x`,
      `keras.ops.add`...) with an identity or projection skip. With
      `residual="scaled"` each branch's last kernel gets `gamma / N`, N the
      number of blocks of its stage (see `_graph._stages`), divided among the
      block's branches, so that the stream grows by at most `(1 + 1/N)^N < e`
      in second moment over a stage. A constant factor on a branch
      (`x + 0.1 * f(x)`) or a gate is the model's own design: it is kept and
      counted in the predictions. `residual=None` treats every sum as a
      plain sum.
    - The zero-init residual families start every branch at zero, so the
      stream keeps its input's second moment through every block at init
      (the predictions say so, and each branch-end row says how):
      `residual="skipinit"` (alias `"rezero"`; De & Smith 2020, Bachlechner
      et al. 2020) sets the `ResidualGate` (`keras_goodinit.layers`) at the
      end of each branch to `alpha = 0` and gives the branch's kernels the
      mean-field init, its end without the `1/N`; a branch without a gate
      gets its last kernel and bias set to zero instead (SkipInit's alpha
      moved onto the kernel: the same function at init). `residual="fixup"`
      (Zhang, Dauphin & Ma 2019) sets each branch's last kernel and bias to
      zero and multiplies the mean-field gamma of the branch's other kernels
      (but queries and keys, whose rule sets the attention logits) by
      `L^(-1/(m-1))`, i.e. their weights by `L^(-1/(2m-2))`, for L the
      residual branches of the whole network and m the kernel layers of the
      branch. Fixup's scalar biases and multiplier change the architecture:
      this init does not add them (a `ResidualGate(1.0)` on each branch is
      the multiplier, and is left as it is). The paper's `1/N` stays the
      default: it bounds the stream while every branch carries signal.

    Moments propagate through every step by its rule, the first moment too
    (ReLU outputs, `Rescaling` offsets, biases and means count in the second
    moment of what follows). BatchNormalization and dropout are followed in
    the mode given by `training` (default: the training mode `fit` uses;
    `training=False` follows BatchNormalization's moving statistics).

    Report rows are `"ok"` only where a rule made the prediction, and, with
    `data`, where the measured second moment agrees with it within the
    sampling error of the batch; otherwise `"unanalysed"`, `"missed"` or
    `"skipped"`, with the reason. Rows are named by their path in the model.

    Biases are kept (but those the zero-init families and the critical
    criterion write); the WeightNormalization `g` is set and `v` is kept
    (with `distribution=None`) or re-drawn (a zeroed branch end under weight
    norm gets `g = 0`); `ResidualGate`s are set by `residual="skipinit"`; the
    other weights are untouched. If anything raises, every weight is left
    exactly as it was.

    Examples:

    >>> model = keras.Sequential([keras.Input((64,)),
    ...                           keras.layers.Dense(64, activation="tanh"),
    ...                           keras.layers.Dense(64, activation="gelu"),
    ...                           keras.layers.Dense(10)])
    >>> report = mean_field_init(model, seed=0, verbose=0)
    >>> [round(row.predicted, 3) for row in report.rows]  # the head aims at 1 too
    [1.0, 1.0, 1.0]
    >>> relu = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32),
    ...                          keras.layers.ReLU(), keras.layers.Dense(8)])
    >>> [row.gamma for row in mean_field_init(relu, head="paper", verbose=0).rows]
    [2.0, 1.0]

    Args:
        model: A built model: Sequential, functional or subclassed (traced
            from the input shape it was built with).
        residual: `"scaled"` (the paper's `1/N` for residual branch ends),
            `"deepnorm"` (Wang et al. 2022, for post-LN transformers: every
            kernel inside a branch but the query and key projections gets
            `gamma * beta^2`, `beta = (8 L)^(-1/4)` for L = N / 2 layers; the
            skip's `alpha = (2 L)^(1/4)` is the model's own code, and the
            report says its value), `"skipinit"` (or `"rezero"`: branch
            gates at 0, or branch ends zero where there is no gate),
            `"fixup"` (branch ends zero, the branches' other kernels scaled
            by `L^(-1/(2m-2))`) or `None` (every sum is a plain sum).
        criterion: `"unit"` (the default: a non-homogeneous activation's
            pre-activations at second moment 1) or `"critical"` (at the
            activation's critical fixed point `q*`, biases `N(0, sigma_b2)`).
        q_star: With `criterion="critical"`, the fixed point to put every
            activation at (a positive number; default: `critical_point`'s,
            0.01).
        distribution: `"orthogonal"` or `"normal"` re-draws every kernel's
            directions; `"delta_orthogonal"` too, with convolutions
            delta-orthogonal (Xiao et al. 2018: an orthogonal matrix at the
            centre tap, zeros elsewhere), but those that widen their channels
            (a stem), which get orthogonal kernels over all their taps; `None`
            keeps the directions and sets only the norms. The moments at a
            convolution's borders follow where the kernel's energy sits.
        input_variance: Variance of the model's inputs' entries. Default: 1, or
            measured on `data` when it is given.
        input_mean: Mean of the inputs' entries. Default: 0, or measured on
            `data` when it is given.
        head: The second moment the logits aim at (a positive number), or
            `"paper"` for the paper's `gamma = 1` on the last layer.
        attention_logits: The variance of each query's attention logits over
            its keys at init (a positive number; 1 by default).
        embeddings: Rescale embedding tables for the stream they start
            (True, the default) or leave them as they are (False).
        training: Follow BatchNormalization and dropout as in training
            (`fit`) or, with False, as in inference.
        data: Optional batch (or dataset: its first batch). If given, the
            input moments default to its own, and one compiled forward pass
            (in the mode `training` says, every other variable restored)
            measures each kernel layer's pre-activation second moment.
        seed: An int makes the re-drawn directions reproducible (each layer
            gets its own seed, in the order of the model's layers); `None`
            gives fresh ones.
        verbose: 0 silent, 1 or 2 prints the report.

    Returns:
        A `MeanFieldReport` (an `InitReport`) with one `MeanFieldRecord` per
        kernel layer, in execution order.

    Reference:
        - [Arpit, Campos & Bengio, 2019](https://arxiv.org/abs/1906.02341)
        - [Poole et al., 2016](https://arxiv.org/abs/1606.05340)
        - [Schoenholz et al., 2017](https://arxiv.org/abs/1611.01232)
        - [Zhang, Dauphin & Ma, 2019 (Fixup)](https://arxiv.org/abs/1901.09321)
        - [De & Smith, 2020 (SkipInit)](https://arxiv.org/abs/2002.10444)
        - [Bachlechner et al., 2020 (ReZero)](https://arxiv.org/abs/2003.04887)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: model={model!r}")
    residual = _validate.one_of("residual", residual, RESIDUAL)
    residual = "skipinit" if residual == "rezero" else residual  # one init, two names
    criterion = _validate.one_of("criterion", criterion, CRITERIA)
    if q_star is not None:
        q_star = _validate.number("q_star", q_star, positive=True)
        if criterion != "critical":
            raise ValueError("Argument `q_star` is only used with criterion='critical'. "
                             f"Received: q_star={q_star!r} with criterion={criterion!r}")
    distribution = _validate.one_of("distribution", distribution, (*DISTRIBUTIONS, None))
    if input_variance is not None:
        input_variance = _validate.number("input_variance", input_variance, positive=True)
    if input_mean is not None:
        input_mean = _validate.number("input_mean", input_mean)
    head = _head(head)
    attention_logits = _validate.number("attention_logits", attention_logits, positive=True)
    embeddings = _validate.boolean("embeddings", embeddings)
    training = _validate.boolean("training", training)
    seed = _validate.seed(seed)
    verbose = _validate.verbose(verbose)
    if not model.built:
        raise ValueError("Argument `model` must be built (call it once, or give it a "
                         f"`keras.Input`). Received: model={model.name!r}")
    x = None
    if data is not None:
        x = _data.first_batch(data)
        _data.check_batch(x)
    shape = None if x is None else tuple(keras.tree.flatten(x)[0].shape)
    # Open sequence axes are traced at the data's length, so that what depends on it
    # (attention averages, causal masks) is predicted for the sequences measured.
    graph = _graph.flatten(model, input_shape=shape,
                           length=shape[1] if shape is not None and len(shape) >= 2 else None)
    targets = _sweep.find_targets(model)
    inputs = _input_signals(model, graph, x, input_variance, input_mean)
    plan = _Planner(graph, targets, residual, inputs, head, training, attention_logits,
                    embeddings, _input_dtypes(model), plan_recurrent=distribution is not None,
                    criterion=criterion, q_star=q_star, distribution=distribution).run()
    rng = None if seed is None else np.random.default_rng(seed)
    seeds = {id(t): (None if rng is None else int(rng.integers(0, 2**31 - 1)),
                     None if rng is None else int(rng.integers(0, 2**31 - 1)))
             for t in targets}
    written = [v for t in targets for v in t.variables()]
    written += [t.depthwise_variable for t in targets if t.depthwise_variable is not None]
    written += [table.variable for table in plan.tables.values()]
    recurrent = list(plan.recurrent.values()) if distribution is not None else []
    written += [v for layer, _ in recurrent for v in _recurrent.variables(layer)]
    written += [step.layer.alpha for step, _ in plan.gate_values.values()]
    with _sweep.atomic(written):
        _tables.write(plan.tables)
        for step, value in plan.gate_values.values():
            step.layer.alpha.assign(np.asarray(value, keras.backend.standardize_dtype(
                step.layer.alpha.dtype)))
        for layer, layer_plan in recurrent:
            _recurrent.write(layer, layer_plan,
                             seed=None if rng is None else int(rng.integers(0, 2**30)))
        for target in targets:
            decision = plan.decisions.get(id(target))
            if decision is not None and decision.writes:
                decision.scale = _write(target, decision, distribution, seeds[id(target)])
                _write_bias(target, decision, seeds[id(target)][0])
        # With seed=None every worker drew its own directions: all take the chief's.
        _distribute.broadcast_from_chief(written)
        if x is not None:
            _measure(model, x, targets, plan, training)
    rows = plan.rows(targets, None if x is None else _batch_size(x))
    for layer, layer_plan in recurrent:
        found = None if x is None else _recurrent.measure(model, x, layer, layer_plan)
        rows += [MeanFieldRecord(**fields)
                 for fields in _recurrent.plan_rows(layer, layer_plan, found)]
    report = MeanFieldReport("mean_field_init", rows, batches=0 if x is None else 1,
                             notes=plan.notes(), unanalysed=plan.unanalysed,
                             add_outputs=plan.add_outputs, training=training, chi=plan.chi(),
                             gates={step.name: value
                                    for step, value in plan.gate_values.values()})
    report.notes.extend(_chi_notes(report.chi))
    if x is None and _length_matters(graph):
        report.notes.append(
            f"the model leaves its sequence length open: sequences of {graph.length} taken "
            "(attention averages and causal masks depend on it); data= traces at its length")
    if verbose:
        report.summary()
    return report


def _head(head):
    if isinstance(head, str):
        if head != "paper":
            raise ValueError("Argument `head` must be a positive number (the logits' second "
                             f"moment) or 'paper'. Received: head={head!r}")
        return head
    return _validate.number("head", head, positive=True)


def _batch_size(x) -> int:
    return int(keras.tree.flatten(x)[0].shape[0])


def _input_signals(model, graph, x, variance, mean) -> dict[int, Signal]:
    """The moments of the model's inputs: given, measured on `x`, or N(0, 1).

    `variance` and `mean` override what `x` gives; the second moment is
    `variance + mean^2`.
    """
    flat = [None] * len(graph.inputs) if x is None else _by_input(model, x)
    signals = {}
    for key, value in zip(graph.inputs, flat):
        shape = rules.map_shape(graph.shapes[key])
        m, v = 0.0, 1.0
        if value is not None:
            array = np.asarray(ops.convert_to_numpy(value), dtype="float64")
            m, v = float(np.mean(array)), float(np.var(array))
        measured = None
        if value is not None and array.ndim >= 3 and array.shape[1] > 1:
            measured = rules.measured_cross(array)
        m0, v0 = m, v
        m = m if mean is None else mean
        v = v if variance is None else variance
        # Independent positions unless the data say otherwise; their covariance in the
        # units the overrides give.
        cross = m**2 if measured is None else m**2 + (measured - m0**2) * (
            v / v0 if v0 > 0 else 0.0)
        signals[key] = Signal(np.full(shape, v + m**2), np.full(shape, m), cross=cross)
    return signals


def _input_dtypes(model) -> list[str]:
    try:
        return [str(t.dtype) for t in keras.tree.flatten(model.inputs)]
    except (AttributeError, ValueError):  # a subclassed model has no symbolic inputs
        return []


def _by_input(model, x) -> list:
    """The batch's tensors in the order of the model's inputs (a dict by input name)."""
    if isinstance(x, dict):
        names = [getattr(t, "name", None) for t in keras.tree.flatten(model.inputs)]
        if all(name in x for name in names):
            return [x[name] for name in names]
    return keras.tree.flatten(x)


@dataclasses.dataclass
class _Decision:
    target: _sweep.Target
    name: str
    gamma: float = math.nan
    ratio: float = math.nan  # C_in / C_out
    predicted: float = math.nan
    measured: float = math.nan
    measured_var: float = math.nan
    status: str = "ok"
    reason: str = ""
    num_blocks: int = 0
    calls: int = 1
    scale: float = 1.0
    chi: float = math.nan
    activation: str = ""  # the name of the activation after it, for the chi verdict
    rule: str = ""
    mean_fraction: float = 0.0  # the share of its input's second moment that is the mean's
    zero: bool = False  # kernel and bias written as exact zeros: a branch that starts at 0
    bias_draw: float | None = None  # the variance of the N(0, v) bias it draws, if it does
    point: criticality.MeanFieldPhase | None = None  # criterion="critical": the activation's
    phase: criticality.MeanFieldPhase | None = None  # ...and its phase at the predicted q

    @property
    def bias_moments(self) -> tuple[float, float] | None:
        """(E[b^2], E[b]) of the bias it writes; None where it keeps the layer's own."""
        if self.zero:
            return 0.0, 0.0
        return None if self.bias_draw is None else (self.bias_draw, 0.0)

    @property
    def units(self) -> int:
        return int(self.target.direction_variable.shape[-1])

    @property
    def norm(self) -> float:
        return math.sqrt(self.gamma * self.ratio)

    @property
    def writes(self) -> bool:
        return self.status in ("ok", "unanalysed") and math.isfinite(self.gamma)


class _Planner:
    """Propagates moments through the graph in execution order, deciding each kernel's gamma."""

    def __init__(self, graph, targets, residual, inputs, head, training, attention_logits=1.0,
                 embeddings=False, input_dtypes=(), plan_recurrent=True, criterion="unit",
                 q_star=None, distribution="orthogonal"):
        self.graph = graph
        self.distribution = distribution
        self._values: dict[int, object] = {}
        self.input_dtypes = list(input_dtypes)
        self.patterns = _patterns.find(graph)
        self._rotary_end = {m.source: s for s in graph.steps
                            for m in [self.patterns.get(id(s))] if m and m.kind == "rotary"}
        self.internal = set().union(*(m.internal for m in self.patterns.values()))
        self.tables = _tables.plan(graph, head) if embeddings else {}
        self.recurrent: dict[int, tuple] = {}  # id(layer) -> (layer, its plan)
        # Recurrent kernels are redrawn (orthogonal U): not with distribution=None.
        self.plan_recurrent = plan_recurrent
        self.attention_logits = attention_logits
        self.targets = {id(t.layer): t for t in targets}
        self.residual, self.head, self.training = residual, head, training
        blocks, plain = _graph.residual_blocks(graph)
        self.branch_ends: dict[int, int] = {}
        self._notes = [why for _, why in plain]
        self.deepnorm: dict[int, tuple[float, float]] = {}  # id(step) -> (beta, alpha)
        # Zero-init families: kernels written as zeros (id(step) -> why), branch ends gated
        # by a ResidualGate (id(step) -> why), the gates' values (id(layer) -> (step, alpha)),
        # and Fixup's factor on gamma (id(step) -> (factor, L, m)).
        self.zeroed: dict[int, str] = {}
        self.gated_ends: dict[int, str] = {}
        self.gate_values: dict[int, tuple] = {}
        self.fixup: dict[int, tuple[float, int, int]] = {}
        self.criterion, self.q_star = criterion, q_star
        self._points: dict[str, tuple] = {}  # activation name -> (MeanFieldPhase or None, why)
        if residual == "deepnorm":
            self._deepnorm(graph, blocks)
        if residual == "skipinit":
            self._skipinit(blocks)
        if residual == "fixup":
            self._fixup(graph, blocks)
        if residual == "scaled":
            for block in blocks:
                ends = [end for end in block.branch_ends if end is not None]
                for end in ends:
                    self.branch_ends[id(end)] = block.num_blocks * len(block.branches)
                if block.reason:
                    self._notes.append(f"{block.add.name}: {block.reason}")
        self.signals = dict(inputs)
        self.decisions: dict[int, _Decision] = {}
        self.unanalysed: list[tuple[str, str, str]] = []
        self.add_outputs: dict[str, float] = {}
        self._attention_of: dict[int, tuple] = {}

    def run(self) -> _Planner:
        graph = self.graph
        for step in graph.steps:
            ins = [self.signals[k] for k in step.inputs]
            shapes = [graph.shapes[k] for k in step.outputs]
            if id(step.layer) in self.targets:
                outs = [self._kernel(step, ins[0])]
            elif id(step.layer) in self.gate_values:
                outs = [rules.scaled(ins[0], self.gate_values[id(step.layer)][1])]
            elif _tables.is_table(step):
                outs = [self._table(step)]
            elif _tables.is_reverse(step):
                outs = [_tables.reverse_output(step, ins[0], self.tables)]
            elif id(step) in self.patterns:
                match = self.patterns[id(step)]
                outs = [_patterns.propagate(match, self.signals[match.source],
                                            rules.map_shape(shapes[0]))]
            elif self.plan_recurrent and step.rule is not None and (
                    step.rule.family == "recurrent") and (
                        self._recurrent_plan(step, ins) is not None):
                ctx = self._context(step)
                outs = _recurrent.planned_outputs(ctx, ins, self.recurrent[id(step.layer)][1])
                for note in ctx.notes:
                    if f"{step.name}: {note}" not in self._notes:
                        self._notes.append(f"{step.name}: {note}")
            elif step.outputs and all(k in self.internal for k in step.outputs):
                # Inside an RMSNorm or a rotation written as ops: not needed, not reported.
                outs = [Signal.unknown_after(f"inside a pattern ending after {step.name}",
                                             rules.map_shape(s)) for s in shapes]
            else:
                outs = self._propagate(step, ins)
            for key, signal, shape in zip(step.outputs, outs, shapes):
                self.signals[key] = rules.fit(signal, rules.map_shape(shape))
        return self

    def _propagate(self, step, ins) -> list[Signal]:
        rule = step.rule
        ctx = self._context(step)
        why = ""
        if rule is None:
            why = step.opaque or f"no rule for {type(step.layer).__name__}"
        elif rule.family == "merge" and not isinstance(rule, rules.ConcatenateRule):
            why = _graph.dependent(self.graph, step)  # sums and products need independence
        if not why and rule is not None:
            try:
                outs = rule.propagate(ctx, ins)
            except NotImplementedError as error:
                why = str(error) or f"no rule for {type(step.layer).__name__}"
            for note in ctx.notes:
                if f"{step.name}: {note}" not in self._notes:
                    self._notes.append(f"{step.name}: {note}")
        if why and all(self._value(k) is not None and not np.issubdtype(
                self._value(k).dtype, np.floating) for k in step.outputs):
            # Computed from integer inputs alone (a mask, positions): its values are known.
            return [self._known(self._value(k), ctx.out_map(i))
                    for i, k in enumerate(step.outputs)]
        if why:
            self._unanalysed(step, why)
            return [Signal.unknown_after(f"after {step.name} ({why})", ctx.out_map(i))
                    for i in range(len(step.outputs))]
        for signal in outs:
            if signal.unknown and not any(s.unknown for s in ins):
                self._unanalysed(step, signal.unknown)
        if rule.terms(ctx) is not None and not outs[0].unknown:
            self.add_outputs[step.name] = outs[0].q
        return outs

    def _deepnorm(self, graph, blocks) -> None:
        """DeepNorm's beta on every kernel inside each block's branches (Wang et al. 2022)."""
        alphas = set()
        streams = {block.add.outputs[0] for block in blocks}  # a branch stops at a stream
        for block in blocks:
            layers = max(block.num_blocks / 2.0, 1.0)  # a transformer layer has two sums
            beta, alpha = (8.0 * layers) ** -0.25, (2.0 * layers) ** 0.25
            alphas.add(round(alpha, 4))
            for key in block.branches:
                for step in _branch_kernels(graph, block, key, streams):
                    self.deepnorm[id(step)] = (beta, alpha)
        if alphas:
            self._notes.append(
                "residual='deepnorm': branch kernels (but queries and keys) times beta; "
                "DeepNorm also multiplies each skip by alpha = " + ", ".join(
                    f"{a:g}" for a in sorted(alphas)) + ": that is the model's own code "
                "(x = LN(alpha x + f(x))); without it this is beta alone")

    def _skipinit(self, blocks) -> None:
        """SkipInit / ReZero: every branch starts at zero through a gate alpha = 0.

        A branch with a `ResidualGate` gets alpha = 0 (the nearest the sum: a
        second gate at 0 behind it would block alpha's gradient); its kernels
        keep the mean-field init, its end without the 1/N. A branch without
        one gets its last kernel and bias zero: the same function at init,
        alpha moved onto the kernel (De & Smith 2020).
        """
        gated, zeroed = [], []
        for block in blocks:
            for end, gates in zip(block.branch_ends, block.residual_gates, strict=True):
                if gates:
                    gate = gates[0]
                    self.gate_values[id(gate.layer)] = (gate, 0.0)
                    gated.append(f"{block.add.name} (gate {gate.name})")
                    if end is not None:
                        self.gated_ends[id(end)] = (
                            f"SkipInit: the branch is gated by {gate.name}, set to alpha = 0; "
                            "its end not divided by N")
                elif end is not None:
                    self.zeroed[id(end)] = (
                        "SkipInit: no ResidualGate on the branch, so its gate alpha = 0 is "
                        "moved onto its last kernel: kernel and bias set to zero")
                    zeroed.append(f"{block.add.name} (end {end.name})")
                else:
                    self._notes.append(f"{block.add.name}: residual='skipinit' cannot start a "
                                       f"branch at zero ({block.reason}): left to the "
                                       "mean-field init")
        if gated or zeroed:
            # Each branch end's row says which; here the count and the first few.
            self._notes.append("residual='skipinit' (every branch adds 0 at init): " + "; ".join(
                f"{len(found)} {what}: " + ", ".join(found[:3]) + (", ..." if len(found) > 3
                                                                  else "")
                for what, found in (("branches gated at alpha = 0", gated),
                                    ("branch ends zero (no ResidualGate)", zeroed)) if found))

    def _fixup(self, graph, blocks) -> None:
        """Fixup: branch ends zero; the branch's other kernels' weights times
        `L^(-1/(2m-2))` (Zhang, Dauphin & Ma 2019)."""
        count = sum(len(block.branches) for block in blocks)  # L: every branch of the model
        streams = {block.add.outputs[0] for block in blocks}
        for block in blocks:
            for key, end in zip(block.branches, block.branch_ends, strict=True):
                if end is None:
                    self._notes.append(f"{block.add.name}: residual='fixup' cannot zero a "
                                       f"branch end ({block.reason}): left to the mean-field "
                                       "init")
                    continue
                kernels = list({id(step.layer): step for step in
                                _branch_kernels(graph, block, key, streams)}.values())
                m = len(kernels)
                self.zeroed[id(end)] = (f"Fixup: branch end, kernel and bias set to zero "
                                        f"(L = {count} residual branches, m = {m} kernel "
                                        "layers in the branch)")
                if m > 1:
                    factor = count ** (-1.0 / (m - 1))
                    for step in kernels:
                        if step.layer is not end.layer:
                            self.fixup.setdefault(id(step), (factor, count, m))
        if blocks:
            self._notes.append(
                f"residual='fixup': {count} residual branches start at zero (their ends zero), "
                "their other kernels' weights times L^(-1/(2m-2)); Fixup's scalar biases and "
                "multiplier are the model's own layers (a ResidualGate at 1 is the multiplier)")

    def _recurrent_plan(self, step, ins) -> dict | None:
        """A recurrent layer's plan (`_recurrent.plan`), made once from its first call's
        input; None (the rule then gives unknowns with its reason) where that is unknown."""
        found = self.recurrent.get(id(step.layer))
        if found is not None:
            return found[1]
        try:
            rnns = _recurrent.sides(step.layer)
        except ValueError:
            return None
        signal = ins[0] if ins else None
        if (signal is None or signal.unknown or not signal.q > 0 or len(ins) > 1
                or any(rnn.stateful for rnn in rnns)):
            return None
        plan = _recurrent.plan(step.layer, signal, target_var=TARGET_Q)
        self.recurrent[id(step.layer)] = (step.layer, plan)
        return plan

    def _table(self, step) -> Signal:
        """A table-made output (an embedding, a position embedding): rescaled where
        `_tables.plan` planned it."""
        if id(step.layer) in self.tables:
            table = self.tables[id(step.layer)]
            signal, factor = table.signal, table.scale
            return Signal(signal.power * factor**2, signal.mean * factor,
                          cross=None if signal.cross is None else signal.cross * factor**2)
        signal, _, why = _tables.signal_of(self.graph, step, self._context(step))
        if signal is None:
            self._unanalysed(step, why)
            return Signal.unknown_after(f"after {step.name} ({why})",
                                        rules.map_shape(self.graph.shapes[step.outputs[0]]))
        return signal

    def _context(self, step) -> rules.Context:
        ctx = _graph.context(self.graph, step, self.training)
        if isinstance(step.rule, (rules.AttentionRule, rules.SoftmaxRule, rules.EinsumRule)):
            ctx.in_shapes = [self._sequence_shape(k) for k in step.inputs]
            # Masks are computed from the model's inputs (a padding mask, positions): their
            # values, from the data or for full sequences, say which keys a query sees.
            ctx.values = [self._value(k) if i > 0 else None
                          for i, k in enumerate(step.inputs)]
        return ctx

    @staticmethod
    def _known(value, out_map) -> Signal:
        value = np.asarray(value, float)
        return rules.fit(Signal(np.asarray(np.mean(value**2)), np.asarray(np.mean(value))),
                         out_map)

    def _value(self, key: int):
        """The value of tensor `key` computed from the model's integer and boolean inputs
        taken as ones (sequences without padding); None where it needs more."""
        if key in self._values:
            return self._values[key]
        value = None
        if key in self.graph.inputs:
            index = self.graph.inputs.index(key)
            shape = self.graph.shapes[key]
            # At the graph's own sizes (its constants were made at them): one full sequence,
            # with or without data (the data's length may differ from the graph's).
            if index < len(self.input_dtypes) and (
                    "int" in self.input_dtypes[index] or "bool" in self.input_dtypes[index]):
                value = np.ones(tuple(1 if i == 0 else self.graph.length if d is None else d
                                      for i, d in enumerate(shape)), "int32")
        else:
            step = self.graph.producer.get(key)
            if step is not None and step.inputs and len(step.inputs) <= 4:
                inputs = [self._value(k) for k in step.inputs]
                # Integer and boolean values only: masks and positions, not the signal.
                if all(v is not None and not np.issubdtype(v.dtype, np.floating)
                       for v in inputs):
                    value = self._call(step, inputs, key)
        self._values[key] = value
        return value

    def _call(self, step, inputs, key):
        ctx = _graph.context(self.graph, step, self.training)

        def bind(value):
            return inputs[value.index] if isinstance(value, rules.Input) else value

        args = keras.tree.map_structure(bind, ctx.args)
        kwargs = keras.tree.map_structure(bind, ctx.kwargs)
        try:
            out = step.layer(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not computable here: the rule assumes instead
            return None
        flat = keras.tree.flatten(out)
        return np.asarray(ops.convert_to_numpy(flat[step.outputs.index(key)]))

    def _sequence_shape(self, key: int) -> tuple:
        """`key`'s shape, its sequence axis taken from upstream where a layer's own shape
        inference left it open (MultiHeadAttention's projections do)."""
        shape = tuple(self.graph.shapes[key])
        seen, frontier = set(), [key]
        while len(shape) >= 3 and shape[1] is None and frontier:
            current = frontier.pop(0)
            step = self.graph.producer.get(current)
            if step is None or current in seen:
                continue
            seen.add(current)
            for k in step.inputs:
                upstream = self.graph.shapes[k]
                if len(upstream) >= 3 and isinstance(upstream[1], int):
                    return (shape[0], upstream[1], *shape[2:])
                frontier.append(k)
        return shape

    def _unanalysed(self, step, why):
        if all(name != step.name for name, _, _ in self.unanalysed):
            self.unanalysed.append((step.name, type(step.layer).__name__, why))

    def _kernel(self, step, signal: Signal) -> Signal:
        target = self.targets[id(step.layer)]
        rule = step.rule
        unknown = signal.unknown
        if not unknown:
            taps = rule.taps(step.layer, signal.power, self.graph.shapes[step.outputs[0]],
                             _tap_profile(target, self.distribution))
        else:
            taps = np.full(rules.map_shape(self.graph.shapes[step.outputs[0]]), math.nan)
        bias = (np.zeros(1) if target.bias is None
                else ops.convert_to_numpy(target.bias).astype(float).ravel())
        decision = self.decisions.get(id(target))
        if decision is None:
            decision = self._decide(step, target, float(np.mean(taps)), bias, unknown,
                                    rules.cross_of(signal),
                                    0.0 if unknown else float(np.mean(signal.mean)) ** 2)
            self.decisions[id(target)] = decision
            if not unknown and signal.q > 0:
                decision.mean_fraction = float(np.mean(signal.mean) ** 2 / signal.q)
        else:
            decision.calls += 1
        out_map = rules.map_shape(self.graph.shapes[step.outputs[0]])
        bias_sq, bias_mean = decision.bias_moments or (float(np.mean(bias**2)),
                                                       float(np.mean(bias)))
        if decision.zero:  # exactly zero, whatever its input
            taps, unknown, signal = np.zeros(out_map), "", Signal(np.zeros(()), np.zeros(()),
                                                                   cross=0.0)
        if unknown or decision.status == "unanalysed" and not math.isfinite(decision.gamma):
            return Signal.unknown_after(unknown or f"after {decision.name}", out_map)
        norms = decision.norm**2 if decision.writes else _current_gain(target)
        cross = rules.cross_of(signal) if rules.per_position(step.layer) else None
        pre = Signal(norms * taps + bias_sq, np.full(taps.shape, bias_mean),
                     cross=None if cross is None else norms * cross + bias_sq)
        if decision.calls == 1:
            decision.predicted = pre.q
            spec = self._spec_after(step, target)[0]
            if spec is not None:
                decision.chi = _moments.chi(spec, q=max(pre.q - bias_mean**2, 1e-12),
                                            mean=bias_mean)
            if decision.point is not None and decision.point.phase != "marginal":
                point = decision.point
                sigma_w2, sigma_b2 = point.sigma_w2, point.sigma_b2
                if target.bias is None and point.q_star > sigma_b2:
                    # The kernel alone holds q*: sigma_w2 grows by q* / (q* - sigma_b2), and
                    # without a bias the layer sits a little off the critical line.
                    sigma_w2, sigma_b2 = sigma_w2 * point.q_star / (point.q_star - sigma_b2), 0.0
                # chi_1 and the depth scales where this layer's pre-activations are predicted.
                decision.phase = criticality._phase(criticality._spec(spec), sigma_w2,
                                                    sigma_b2, q=pre.q)
        spec, _ = _moments.function_spec(getattr(target.inner, "activation", None))
        if spec is None:
            return Signal.unknown_after(f"after {decision.name}'s activation", out_map)
        return rules.activation_output(spec, pre)

    def _decide(self, step, target, taps: float, bias, unknown: str,
                cross: float | None = None, mean_sq: float = 0.0) -> _Decision:
        decision = _Decision(target, self._name(step))
        unscalable = target.unscalable_reason() or _unsupported(target)
        if unscalable:
            decision.status, decision.reason = "skipped", unscalable
            return decision
        decision.ratio = _fan_ratio(target)
        if id(step) in self.zeroed:  # the branch starts at zero: written exactly
            decision.gamma, decision.zero = 0.0, True
            decision.rule, decision.reason = self.residual, self.zeroed[id(step)]
            return decision
        spec, why, kind = self._following(step, target)
        decision.activation = "" if spec is None else spec.name
        num_blocks = self.branch_ends.get(id(step), 0)
        branch_end = bool(num_blocks) or id(step) in self.gated_ends
        if kind == "head" and not branch_end:
            return self._head(decision, taps, bias, why, unknown)
        if kind.startswith("attention_") and not branch_end:
            return self._attention(decision, kind, taps, bias, why, unknown, cross, mean_sq)
        if spec is None:  # the activation after it has no rule
            decision.status, decision.reason = "unanalysed", why
            if not branch_end:
                return decision
            spec = _moments.spec_of("linear")
        point, note = (None, "")
        if self.criterion == "critical" and kind == "activation" and not branch_end:
            point, note = self._critical_point(spec)
            decision.point = point
        if spec.homogeneous or branch_end:
            gain_spec = spec if spec.homogeneous else _moments.spec_of("linear")
            gamma = _moments.gamma(gain_spec)
            decision.rule = "homogeneous"
            if not spec.homogeneous:
                why += "; the residual stream is linear: its gain counts"
            elif point is not None:
                why += f"; criterion='critical': {note}: the homogeneous rule kept"
        elif _left_as_it_is(decision, unknown, taps, why):
            return decision
        elif point is not None and point.phase != "marginal":
            # The edge of chaos: q = q*, biases N(0, sigma_b2); between equal widths
            # gamma = (q* - sigma_b2) / E[phi(z*)^2] = sigma_w2.
            decision.bias_draw = point.sigma_b2 if target.bias is not None else None
            room = point.q_star - (decision.bias_draw or 0.0)
            gamma = room / taps / decision.ratio
            decision.rule = "critical"
            why += (f"; criterion='critical': q set to q* = {point.q_star:.4g} (input second "
                    f"moment {taps:.3g})")
            why += (f", biases drawn N(0, {point.sigma_b2:.4g})" if target.bias is not None
                    else f"; no bias to draw N(0, {point.sigma_b2:.4g}) into: q* from the "
                    "kernel alone")
        else:
            room = TARGET_Q - float(np.mean(bias**2))
            decision.rule = "q=1"
            if note:
                why += f"; criterion='critical': {note}: the q = 1 rule kept"
            if not room > 0:
                gamma = _moments.gamma(spec)
                why += "; its bias alone exceeds q = 1: gamma at q = 1 used"
            else:
                gamma = room / taps / decision.ratio
                why += f"; q set to {TARGET_Q:g} (input second moment {taps:.3g})"
        if id(step) in self.gated_ends:
            why += "; " + self.gated_ends[id(step)]
            decision.rule = "skipinit"
        if id(step) in self.fixup:
            factor, count, m = self.fixup[id(step)]
            gamma *= factor
            why += (f"; Fixup: times L^(-1/(m-1)) = {factor:.4g} (weights times "
                    f"L^(-1/(2m-2)); L = {count} residual branches, m = {m})")
            decision.rule = "fixup"
        if num_blocks:
            gamma /= num_blocks
            why += f"; residual branch end, N = {num_blocks}"
            decision.num_blocks = num_blocks
            decision.rule = "residual"
        if id(step) in self.deepnorm:
            beta, _ = self.deepnorm[id(step)]
            gamma *= beta**2
            why += f"; DeepNorm: times beta^2 = {beta**2:.3g}"
            decision.rule = "deepnorm"
        if unknown:
            decision.status = "unanalysed"
            why = f"its input's moments are unknown ({unknown}): gain set, q not predicted; {why}"
        decision.gamma = gamma
        decision.reason = why if decision.status != "unanalysed" or not decision.reason else (
            f"{decision.reason}; {why}")
        return decision

    def _critical_point(self, spec) -> tuple[criticality.MeanFieldPhase | None, str]:
        """(the activation's critical point, what to say of it) for criterion="critical";
        (None, why) where it has none at `q_star`."""
        if spec.name not in self._points:
            try:
                point = criticality.critical_point(spec, q_star=self.q_star)
            except ValueError as error:
                found = None, f"{spec.name} has no critical point here: {error}"
            else:
                if point.phase == "marginal":
                    found = point, f"{spec.name} has no critical line (marginal): {point.note}"
                else:
                    found = point, f"{spec.name} at its critical point"
            self._points[spec.name] = found
            self._notes.append(f"criterion='critical': {found[0] if found[0] else found[1]}")
        return self._points[spec.name]

    def _head(self, decision, taps, bias, why, unknown) -> _Decision:
        if self.head == "paper":
            decision.gamma, decision.rule = 1.0, "head_paper"
            decision.reason = f"{why}; head: the paper's gamma = 1"
            if unknown:
                decision.status = "unanalysed"
            return decision
        if unknown:
            decision.status, decision.reason = "unanalysed", (
                f"head: its input's moments are unknown ({unknown}): left as it is")
            return decision
        room = self.head - float(np.mean(bias**2))
        if not (taps > 0 and room > 0):
            decision.status, decision.reason = "skipped", (
                "head: its input is predicted to be zero, or its bias alone exceeds the "
                f"target {self.head:g}")
            return decision
        decision.gamma = room / taps / decision.ratio
        decision.rule = "head"
        decision.reason = f"{why}; head: logits' second moment set to {self.head:g}"
        return decision

    def _attention(self, decision, kind, taps, bias, why, unknown, cross,
                   mean_sq: float = 0.0) -> _Decision:
        """A query or key projection: logits of variance `attention_logits` over the keys.

        The logit `scale q.k` varies from key to key with variance
        `scale^2 d q_q (q_k - c_k)` (`rules.AttentionRule`); the query and the
        key each take the square root of the target in units of `1 / (scale^2 d)`.
        """
        _, role, depth, scale = self._attention_of[id(decision.target)]
        share = math.sqrt(self.attention_logits) / (scale * math.sqrt(depth))
        decision.rule = "attention"
        if _left_as_it_is(decision, unknown, taps, why):
            return decision
        if kind == "attention_query":
            room = share - float(np.mean(bias**2))
            if not room > 0:
                room = share
                why += "; its bias alone exceeds the target: the bias not counted"
            decision.gamma = room / taps / decision.ratio
            decision.reason = (f"{why}; query: its second moment set to {share:.3g}, for "
                               f"logits of variance {self.attention_logits:g}")
            return decision
        # Keys: only what varies between tokens moves the softmax.
        # Independent tokens (cross not followed) share their mean alone.
        spread = taps - (mean_sq if cross is None else cross)
        floor = 0.01 * taps
        if spread < floor:
            spread = floor
            why += "; the tokens are nearly identical here: the key gain is capped"
        decision.gamma = share / spread / decision.ratio
        assumed = " (tokens taken independent)" if cross is None else ""
        decision.reason = (f"{why}; key: its variance across tokens set to {share:.3g}, for "
                           f"logits of variance {self.attention_logits:g}{assumed}")
        return decision

    def _name(self, step) -> str:
        target = self.targets[id(step.layer)]
        return step.name if step.layer is target.layer else target.name

    def _spec_after(self, step, target):
        spec, why, _ = self._following(step, target)
        return spec, why

    def _following(self, step, target) -> tuple[_moments.ActivationSpec | None, str, str]:
        """(spec of the activation the layer's output meets, why, kind); kind "head" for
        a last layer; spec None where that activation has no rule."""
        activation = getattr(target.inner, "activation", None)
        spec, reason = _moments.function_spec(activation)
        if activation not in (None, keras.activations.linear):
            if spec is None:
                return None, f"{reason}: unanalysed", "activation"
            return spec, f"{spec.name} follows (fused)", "activation"
        found = _graph.follower(self.graph, step.outputs[0])
        through = list(found.through)
        while found.kind == "activation" and _is_identity(found.step):
            through.append(found.step.layer.name)  # Activation(None): look on
            found = _graph.follower(self.graph, found.step.outputs[0])
            through.extend(found.through)
        via = f" (through {', '.join(through)})" if through else ""
        if found.kind == "activation":
            spec, reason = found.step.rule.activation(found.step.layer)
            if spec is None:
                after = _graph.follower(self.graph, found.step.outputs[0])
                if after.kind == "output":
                    return _moments.spec_of("linear"), f"{reason}; model output{via}", "head"
                return None, f"{reason}: unanalysed{via}", "activation"
            return spec, f"{spec.name} follows{via}", "activation"
        if found.kind == "output":
            return _moments.spec_of("linear"), f"model output{via}", "head"
        attention = self._attention_role(step.outputs[0])
        if attention is not None:
            self._attention_of[id(target)] = attention
            name, role = attention[0].name, attention[1]
            kind = f"attention_{role}" if role in ("query", "key") else "linear"
            return (_moments.spec_of("linear"), f"linear: the {role} of {name}", kind)
        what = {"add": f"sum {found.step.name} follows" if found.step else "",
                "kernel": "a kernel layer follows",
                "fork": "its output feeds several steps",
                "other": f"{found.step.name} follows" if found.step else ""}
        return _moments.spec_of("linear"), f"linear: {what[found.kind]}{via}", "linear"

    def _attention_role(self, key: int) -> tuple | None:
        """(attention step, "query"/"key"/"value", depth, scale) where the tensor `key` becomes
        an attention's argument: through the steps its rules look through, a constant scale
        (`q * d**-0.5`) and a rotary embedding written as ops (`_patterns`), which keep the
        norm; None otherwise."""
        for _ in range(len(self.graph.steps)):
            if key in self._rotary_end:
                key = self._rotary_end[key].outputs[0]
                continue
            users = self.graph.consumers.get(key, [])
            if len(users) != 1:
                return None
            (user,) = users
            rule = user.rule
            if isinstance(rule, rules.AttentionRule):
                ctx = self._context(user)
                bound = rules.attention_arguments(ctx)
                index = user.inputs.index(key)
                role = next((name for name in ("query", "key", "value")
                             if isinstance(bound.get(name), rules.Input)
                             and bound[name].index == index), "input")
                depth = ctx.in_shapes[bound["query"].index][-1]
                scale = rules._numeric(bound.get("scale"))
                scale = 1.0 / math.sqrt(depth) if scale is None else float(scale.ravel()[0])
                return user, role, depth, scale
            if isinstance(rule, rules.EinsumRule):
                found = rules.einsum_role(self._context(user), user.inputs.index(key))
                if found is None:
                    return None
                role, depth = found
                # The scale is a constant multiply before or after the einsum: 1/sqrt(d).
                return user, role, depth, 1.0 / math.sqrt(depth) if depth else 1.0
            if rule is None or len(user.inputs) != 1 or rule.family == "normalization" or not (
                    rule.look_through or rule.scale(self._context(user)) is not None):
                return None
            key = user.outputs[0]
        return None

    def notes(self) -> list[str]:
        mode = ("training mode (batch statistics), as `fit` runs" if self.training else
                "inference mode (moving statistics)")
        notes = list(self._notes)
        if any(isinstance(s.layer, (klayers.BatchNormalization, klayers.Dropout))
               for s in self.graph.steps):
            notes.insert(0, f"BatchNormalization and dropout followed in {mode}")
        return notes

    def chi(self) -> dict[str, tuple[float, int, float]]:
        """Per activation whose variance map is unstable here: (slope, depth, drift)."""
        found: dict[str, list[float]] = {}
        for decision in self.decisions.values():
            if decision.activation and math.isfinite(decision.chi):
                found.setdefault(decision.activation, []).append(decision.chi)
        out = {}
        for name, slopes in found.items():
            slope = float(np.exp(np.mean(np.log(slopes))))
            if slope > 1 + _CHI_TOLERANCE:
                out[name] = (slope, len(slopes), slope ** len(slopes))
        return out

    def rows(self, targets, batch: int | None) -> list[MeanFieldRecord]:
        order = [self.targets[id(s.layer)] for s in self.graph.steps
                 if id(s.layer) in self.targets]
        seen, rows = set(), [
            MeanFieldRecord(t.name, t.class_name, math.nan, math.nan, 0, t.scale, t.status,
                            t.reason, gamma=t.scale**2, predicted=t.target, rule="embedding")
            for t in self.tables.values()]
        for target in order + list(targets):
            if id(target) in seen:
                continue
            seen.add(id(target))
            d = self.decisions.get(id(target))
            if d is None:
                name, where = _container(target, self.graph)
                rows.append(MeanFieldRecord(name, target.class_name, math.nan, math.nan,
                                            0, 1.0, "skipped", where))
                continue
            status, reason = d.status, d.reason
            if d.calls > 1:
                reason += f"; called {d.calls} times, set at its first call"
            tolerance = math.nan
            if batch is not None and math.isfinite(d.measured) and d.zero:
                tolerance = 0.0  # zeros in, exact zeros out
                if status == "ok" and d.measured != 0.0:
                    status = "missed"
                    reason = f"measured q {d.measured:.4g} where the branch is zero; {reason}"
            elif batch is not None and math.isfinite(d.measured):
                bias_share = (d.bias_draw / d.predicted if d.bias_draw and d.predicted > 0
                              else 0.0)
                tolerance = _tolerance(batch, d.units, d.mean_fraction, bias_share)
                if status == "ok" and not _agrees(d.predicted, d.measured, tolerance):
                    status = "missed"
                    reason = (f"measured q {d.measured:.4g} misses the predicted "
                              f"{d.predicted:.4g} by a factor {d.measured / d.predicted:.3g} "
                              f"(tolerance +-{tolerance:.2g} at batch {batch}); {reason}")
            phase = d.phase or d.point
            if d.point is None or d.status == "unanalysed" or (
                    d.phase is None and d.point.phase != "marginal"):
                phase = None  # no critical point, or this layer was not set at one
            critical = {} if phase is None else dict(
                q_star=d.point.q_star, chi_1=phase.chi_1, xi_c=phase.xi_c,
                trainable_depth=phase.trainable_depth,
                phase="marginal" if d.point.phase == "marginal" else phase.phase)
            rows.append(MeanFieldRecord(d.name, target.class_name, math.nan,
                                        d.measured_var, 0, d.scale, status, reason,
                                        gamma=d.gamma, predicted=d.predicted,
                                        measured=d.measured, num_blocks=d.num_blocks,
                                        chi=d.chi, rule=d.rule, tolerance=tolerance,
                                        **critical))
        return rows


def _branch_kernels(graph, block, key: int, streams: set) -> list:
    """The kernel steps of the branch of `block` that ends at `key`: every step between
    the block's source and `key`, stopping at other streams (nested blocks' sums)."""
    found, stack, seen = [], [key], set()
    while stack:
        current = stack.pop()
        if current in seen or current == block.source or current in streams:
            continue
        seen.add(current)
        step = graph.producer.get(current)
        if step is None:
            continue
        if rules.is_kernel(step.layer):
            found.append(step)
        stack.extend(step.inputs)
    return found


def _left_as_it_is(decision, unknown: str, taps: float, why: str) -> bool:
    """A gain that needs its input's second moment cannot be set: say why, on `decision`."""
    if unknown:
        decision.status, decision.reason = "unanalysed", (
            f"its input's moments are unknown ({unknown}); {why}: left as it is")
        return True
    if not taps > 0:
        decision.status, decision.reason = "skipped", "its input is predicted to be zero"
        return True
    return False


def _length_matters(graph) -> bool:
    open_axes = any(None in tuple(graph.shapes[k])[1:-1] or (
        len(graph.shapes[k]) == 2 and graph.shapes[k][1] is None) for k in graph.inputs)
    attention = (rules.AttentionRule, rules.EinsumRule, rules.SoftmaxRule)
    return open_axes and any(isinstance(step.rule, attention) for step in graph.steps)


def _is_identity(step) -> bool:
    spec, _ = step.rule.activation(step.layer)
    return spec is not None and spec.name == "linear"


def _tolerance(batch: int, units: int, mean_fraction: float, bias_share: float = 0.0) -> float:
    """The relative gap within which a measured second moment agrees with its prediction.

    Three sources of sampling error, in relative variance: the batch (a mean
    of squares over `batch` independent samples of Gaussian entries: at most
    `2 / batch`, all of a sample's entries counted as one, the worst case);
    the draw of the kernel's directions: the share `f` of the input's
    second moment that lies along its mean is one direction, which each of
    the layer's `units` random unit directions catches with relative
    variance about `2 f^2` (a chi-square with one degree of freedom):
    `2 f^2 / units` over the layer; and a bias drawn N(0, v) (the critical
    criterion), whose mean square over `units` entries has relative variance
    `2 / units`: `2 s^2 / units` for its share `s = v / q` of the prediction.
    `_SIGMAS` standard deviations of the sum.
    """
    return _SIGMAS * math.sqrt(2.0 / max(batch, 1)
                               + 2.0 * (mean_fraction**2 + bias_share**2) / max(units, 1))


def _agrees(predicted: float, measured: float, tolerance: float) -> bool:
    return (math.isfinite(predicted) and predicted > 0
            and abs(measured / predicted - 1.0) <= tolerance)


def _chi_notes(chi: dict) -> list[str]:
    return [f"{name}: the variance map's slope at the operating point is {slope:.3g} > 1, so "
            f"no data-free scalar init is depth-stable for it: over its {depth} layers a "
            f"deviation grows by {slope:.3g}^{depth} = {drift:.3g}; use lsuv_init (data-driven) "
            "to hold every layer at its target"
            for name, (slope, depth, drift) in chi.items()]


def _container(target, graph) -> tuple[str, str]:
    """(path name, why no decision) of a kernel the plan did not meet."""
    for step in graph.steps:
        if not isinstance(step.layer, keras.layers.Layer):
            continue
        inside = step.layer._flatten_layers(include_self=False, recursive=True)
        if any(layer is target.layer for layer in inside):
            why = step.opaque or "its call is not traced"
            return (f"{step.name}/{target.name}",
                    f"inside {type(step.layer).__name__} {step.name!r}, {why}: left as it is")
    return target.name, "not called in the model's graph: left as it is"


def _unsupported(target) -> str:
    try:
        _rule_axes(target)
    except ValueError as error:
        return str(error).split(" Received")[0]
    return ""


def _rule_axes(target) -> tuple[list[int], list[int]] | None:
    """`target.fan_axes` of a kernel of rank > 2 (an EinsumDense's, from its equation);
    None for a matrix, whose fans the layout gives."""
    return None if len(target.direction_variable.shape) == 2 else target.fan_axes


def _einsum(target) -> bool:
    """A kernel of rank > 2 whose fans its rule places (an EinsumDense's equation)."""
    try:
        return _rule_axes(target) is not None
    except ValueError:  # fans the equation cannot give: `_unsupported` says so
        return True


def _einsum_view(target) -> tuple[list[int], list[int], tuple[int, int]]:
    """(fan-in axes, output axes, (C_in, C_out)) of a kernel its rule places the fans of."""
    shape = tuple(target.direction_variable.shape)
    fan_in, units = target.fan_axes
    return fan_in, units, (math.prod(shape[i] for i in fan_in),
                           math.prod(shape[i] for i in units))


def _fan_ratio(target) -> float:
    """C_in / C_out of the layer (for a separable conv, of the whole layer)."""
    depthwise = target.depthwise_variable
    if depthwise is not None:
        return depthwise.shape[-2] / target.direction_variable.shape[-1]
    if _einsum(target):
        c_in, c_out = _einsum_view(target)[2]
        return c_in / c_out
    c_in, c_out = _layouts.channel_fans(tuple(target.direction_variable.shape),
                                        target.kernel_layout)
    return c_in / c_out


def _current_gain(target) -> float:
    """Mean squared norm of the layer's current effective fan-in vectors."""
    if target.is_weight_normalized:
        norms = ops.convert_to_numpy(target.layer.g).astype(float)
    elif _einsum(target):
        values = ops.convert_to_numpy(target.direction_variable.value).astype(float)
        norms = np.sqrt(np.sum(values**2, axis=tuple(_einsum_view(target)[0])))
    else:
        norms = ops.convert_to_numpy(unit_norms(target.direction_variable.value,
                                                target.kernel_layout)).astype(float)
    gain = float(np.mean(norms**2))
    if target.depthwise_variable is not None:
        gain *= _depthwise_gain(target.depthwise_variable)
    return gain


def _depthwise_gain(depthwise) -> float:
    """Mean squared unit norm of a depthwise kernel (`LayerRule.depthwise_variable`)."""
    norms = ops.convert_to_numpy(unit_norms(depthwise.value, "depthwise"))
    return float(np.mean(norms.astype(float) ** 2))


def _distribution_for(target, distribution):
    """`distribution`, but "orthogonal" for a convolution that widens its channels.

    A delta-orthogonal kernel sees only its centre tap: on a layer with fewer input
    than output channels (a stem on one to three image channels) its outputs are
    copies of those few signals, unequal across units and blind to the
    neighbourhood. An orthogonal kernel over all the taps embeds the patch.
    """
    if distribution != "delta_orthogonal" or not target.is_convolution:
        return distribution
    if target.kernel_layout == "depthwise" or target.depthwise_variable is not None:
        return distribution
    c_in, c_out = _layouts.channel_fans(tuple(target.direction_variable.shape),
                                        target.kernel_layout)
    return "orthogonal" if c_in < c_out else distribution


def _tap_profile(target, distribution) -> np.ndarray | None:
    """The share of a conv kernel's energy at each spatial tap, once written; None: alike.

    Redrawn orthogonal or Gaussian kernels spread it evenly on average;
    delta-orthogonal ones hold it all at the centre `(k - 1) // 2`; kept
    directions (`distribution=None`) keep the kernel's own profile.
    """
    if not target.is_convolution:
        return None
    size = tuple(target.inner.kernel_size)
    distribution = _distribution_for(target, distribution)
    if distribution == "delta_orthogonal":
        profile = np.zeros(size)
        profile[tuple((k - 1) // 2 for k in size)] = 1.0
        return profile
    if distribution is not None:
        return None
    kernel = target.depthwise_variable
    kernel = target.direction_variable if kernel is None else kernel  # its taps come first
    energy = np.sum(ops.convert_to_numpy(kernel).astype(float) ** 2, axis=(-2, -1))
    total = float(np.sum(energy))
    return energy / total if energy.shape == size and total > 0 else None


def _write(target, decision: _Decision, distribution, seeds) -> float:
    """Sets the target's unit norms to `decision.norm`; returns new / old RMS unit norm."""
    old = math.sqrt(_mean_square_norm(target))
    if decision.zero:
        # Exact zeros (no draw makes g = 0); under weight norm `g`, as `v / ||v||` needs v.
        for variable in target.scale_variables:
            variable.assign(ops.zeros(tuple(variable.shape), variable.dtype))
        return 0.0
    layout = target.kernel_layout
    kernel = target.direction_variable
    norm = decision.norm
    distribution = _distribution_for(target, distribution)
    new = norm  # what a draw or a weight-norm `g` guarantees, to rounding
    depthwise = target.depthwise_variable
    if depthwise is not None:
        if distribution is not None:
            multiplier = depthwise.shape[-1]
            # Unit-norm depthwise vectors (gamma = multiplier gives g = 1 there).
            depthwise.assign(GoodInit("wn_linear", gamma=float(multiplier), layout="depthwise",
                                      distribution=distribution, seed=seeds[1]).draw(
                tuple(depthwise.shape), depthwise.dtype))
        norm = norm / math.sqrt(_depthwise_gain(depthwise))
        c_in, c_out = _layouts.channel_fans(tuple(kernel.shape), "default")
        gamma = norm**2 * c_out / c_in
    else:
        gamma = decision.gamma
    if distribution is not None and _einsum(target):
        # Drawn as the (C_in, C_out) matrix the equation applies, then put in place.
        fan_in, units, matrix = _einsum_view(target)
        drawn = GoodInit("wn_linear", gamma=gamma, distribution=distribution,
                         seed=seeds[0]).draw(matrix, kernel.dtype)
        shape = tuple(kernel.shape)
        drawn = ops.reshape(drawn, [shape[i] for i in fan_in + units])
        kernel.assign(ops.transpose(drawn, [int(i) for i in np.argsort(fan_in + units)]))
    elif distribution is not None:
        drawn = GoodInit("wn_linear", gamma=gamma, distribution=distribution, layout=layout,
                         seed=seeds[0]).draw(tuple(kernel.shape), kernel.dtype)
        kernel.assign(drawn)
        if target.is_weight_normalized:
            g = target.layer.g
            g.assign(ops.cast(unit_norms(drawn, layout), g.dtype))
    elif target.is_weight_normalized:
        g = target.layer.g
        g.assign(np.full(tuple(g.shape), norm, keras.backend.standardize_dtype(g.dtype)))
    else:
        values = ops.convert_to_numpy(kernel.value).astype("float64")
        axes = (tuple(_einsum_view(target)[0]) if _einsum(target)
                else _layouts.norm_axes(len(values.shape), layout))
        norms = np.sqrt(np.sum(np.square(values), axis=axes, keepdims=True))
        factor = np.where(norms > 0, norm / np.where(norms > 0, norms, 1.0), 1.0)
        kernel.assign((values * factor).astype(keras.backend.standardize_dtype(kernel.dtype)))
        new = math.sqrt(_mean_square_norm(target))  # all-zero units stay zero
    return new / old if old > 0 else math.inf


def _write_bias(target, decision: _Decision, seed: int | None) -> None:
    """Writes the bias the decision plans: zeros, or N(0, v) draws (fresh with no seed)."""
    bias = target.bias
    if bias is None or decision.bias_moments is None:
        return
    shape, dtype = tuple(bias.shape), bias.dtype
    if decision.zero or not decision.bias_draw:
        bias.assign(ops.zeros(shape, dtype))
        return
    # Its own stream, apart from the kernel's (seeded from the same per-layer seed).
    seed = None if seed is None else (seed + 1) % (2**31 - 1)
    bias.assign(keras.initializers.RandomNormal(stddev=math.sqrt(decision.bias_draw),
                                                seed=seed)(shape, dtype))


def _mean_square_norm(target) -> float:
    """`_current_gain` in one reduction: the mean squared unit norm is the kernel's sum
    of squares over its number of units (summed in float32 at least)."""
    if target.is_weight_normalized:
        return _current_gain(target)
    kernel = target.direction_variable.value
    dtype = "float64" if keras.backend.standardize_dtype(kernel.dtype) == "float64" else "float32"
    axes = (tuple(_einsum_view(target)[0]) if _einsum(target)
            else _layouts.norm_axes(len(kernel.shape), target.kernel_layout))
    units = math.prod(kernel.shape) // math.prod(kernel.shape[i] for i in axes)
    gain = float(ops.convert_to_numpy(ops.sum(ops.square(ops.cast(kernel, dtype))))) / units
    if target.depthwise_variable is not None:
        gain *= _depthwise_gain(target.depthwise_variable)
    return gain


def _measure(model, x, targets, plan: _Planner, training: bool) -> None:
    """One compiled forward pass: each kernel layer's pre-activation moments."""
    def policy(target, y, activation, state):
        if state is None:
            mean, var = _sweep.moments(y, tuple(range(len(y.shape))), target.mask)
            state = {"mean": ops.reshape(mean, ()), "var": ops.reshape(var, ())}
        return activation(y), state

    result = _sweep.run(model, x, targets, policy, key=("mean_field_measure",),
                        training=training)
    for target in targets:
        decision = plan.decisions.get(id(target))
        state = result.states.get(id(target))
        if decision is not None and state is not None:
            mean, var = float(np.asarray(state["mean"])), float(np.asarray(state["var"]))
            decision.measured, decision.measured_var = var + mean**2, var


def measured_moments(model: keras.Model, x, layer_names, *,
                     training: bool = False) -> dict[str, tuple[float, float]]:
    """`{name: (second moment, variance)}` of the named layers' outputs on the batch `x`.

    A helper for checking a prediction (such as `MeanFieldReport.add_outputs`)
    on data; `model` must be functional or Sequential.
    """
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    probe = keras.Model(inputs, [model.get_layer(name).output for name in layer_names])
    outputs = probe(x, training=training)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    found = {}
    for name, y in zip(layer_names, outputs):
        y = ops.convert_to_numpy(y).astype("float64")
        found[name] = (float(np.mean(y**2)), float(np.var(y)))
    return found


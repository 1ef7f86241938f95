"""LSTM, GRU and RNN nodes as the plain ONNX ops they compute, one time step after another.

TVM 0.27's ONNX frontend has no converter for the recurrent ops, so a model with one compiled to no
artifact. Before the import (`relax_build.import_onnx`) each recurrent node of the main graph is
replaced by its unrolled form for the static sequence length the artifact is compiled for: per
direction, X's product with W for every time step at once (one MatMul over the sequence, both
biases added), then per step the hidden state's product with R, the gates and the new states, by
ONNX's equations for the op (its activations, clip, peepholes, input_forget, linear_before_reset and
layout), in ops the model's opset has: Slice with constant bounds (Gather before opset 10: TVM's frontend
reads only Slice's later form), Reshape for unsqueezes, Min and Max for the clip. (Gathers, as first
written, each imported as six index ops that FoldConstant compiled one by one: 17 of an LSTM's 18 s of
build over 20 steps. Equal Splits, tried next, made TVM's FuseTIR fail now and then on a bidirectional
GRU, "buffer_idx == buffers.size()", one build in three to five.)

The weights W, R, B and P must be initializers (they are transposed and summed here once); anything
else is a CodegenError naming the node. Where `sequence_lens` (a graph input, or a constant of any length
other than the full one) may end a sequence early, each step is masked per sequence: past its end a
sequence's states are held and its Y is 0, as onnxruntime computes it, in either direction (and an empty
sequence's last states are zeros). pruned.onnx keeps its recurrent nodes: only the copy TVM compiles is
unrolled, and the artifact's gate checks that copy's outputs against onnxruntime running the original.

    >>> flat = unrolled(model, {"x": [20, 1, 40]})     # an LSTM over 20 steps: ~18 plain nodes a step
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pruneaug.errors import CodegenError
from pruneaug.ir.prunable import unique_node_names
from pruneaug.ir.shape_folding import inferred_shapes

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# Each activation's parameters, with ONNX's defaults where the op has one (None: the node must give it).
ACTIVATION_PARAMETERS: dict[str, dict[str, float | None]] = {
    "Sigmoid": {}, "Tanh": {}, "Relu": {}, "Softsign": {}, "Softplus": {},
    "LeakyRelu": {"alpha": 0.01}, "ThresholdedRelu": {"alpha": 1.0}, "Elu": {"alpha": 1.0},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5}, "Affine": {"alpha": None, "beta": None},
    "ScaledTanh": {"alpha": None, "beta": None},
}


@dataclass(frozen=True)
class Activation:
    """One of a recurrent node's activation functions, with its parameters."""

    name: str
    alpha: float | None = None
    beta: float | None = None


def _bind(names: Sequence[str], values: Mapping[str, Sequence[float]], each_takes_both: bool) -> tuple[Activation, ...]:
    """The activations with their parameters, consumed in order from the node's lists: each value by the next
    activation that takes that parameter, or (`each_takes_both`) one alpha and one beta by each activation that
    takes any. Where the two readings differ onnxruntime did not follow either for every mix (a LeakyRelu
    before a ScaledTanh), so the node is refused; where they agree both runtimes read them alike."""
    left = {key: list(values[key]) for key in ("alpha", "beta")}
    bound = []
    for name in names:
        defaults = ACTIVATION_PARAMETERS[name]
        taken = {key: left[key].pop(0) if left[key] and (key in defaults or (defaults and each_takes_both)) else None
                 for key in left}
        bound.append(Activation(name, **{key: default if taken[key] is None else taken[key]
                                         for key, default in defaults.items()}))
    return tuple(bound)


def unrolled(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """`model` with every LSTM, GRU and RNN node of its main graph unrolled for the static `input_shapes`
    (every graph input's shape); `model` itself where it has none."""
    if not any(_is_recurrent(node) for node in model.graph.node):
        return model
    names = unique_node_names(model.graph.node)
    shapes = inferred_shapes(model, input_shapes)
    constants = {init.name: init for init in model.graph.initializer}
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
    nodes, initializers = [], list(model.graph.initializer)
    for name, node in zip(names, model.graph.node):
        if not _is_recurrent(node):
            nodes.append(node)
            continue
        expansion = _Unroller(name, node, shapes, constants, opset)
        nodes.extend(expansion.nodes)
        initializers.extend(expansion.initializers)
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    del flat.graph.node[:]
    flat.graph.node.extend(nodes)
    del flat.graph.initializer[:]
    flat.graph.initializer.extend(initializers)
    return flat


def _is_recurrent(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in RECURRENT_OPS


class _Unroller:
    """The plain nodes and new initializers that compute one recurrent node (`nodes`, `initializers`)."""

    def __init__(self, name: str, node: onnx.NodeProto, shapes: Mapping[str, list[int]],
                 constants: Mapping[str, onnx.TensorProto], opset: int):
        self.name, self.node, self.op, self.opset = name, node, node.op_type, opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._constants: dict[tuple, str] = {}
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.hidden = int(attrs.get("hidden_size", 0))
        direction = attrs.get("direction", b"forward")
        self.direction = direction.decode() if isinstance(direction, bytes) else direction
        self.layout = int(attrs.get("layout", 0))
        self.clip = attrs.get("clip")
        self.input_forget = int(attrs.get("input_forget", 0))
        self.linear_before_reset = int(attrs.get("linear_before_reset", 0))
        if self.direction not in ("forward", "reverse", "bidirectional"):
            self._fail(f"direction {self.direction!r} is not forward, reverse or bidirectional")
        self.directions = 2 if self.direction == "bidirectional" else 1
        self.activations = self._activations(attrs)
        inputs = list(node.input) + [""] * (8 - len(node.input))
        x = inputs[0]
        if x not in shapes or len(shapes[x]) != 3:
            self._fail(f"input X ({x!r}) has no static 3-D shape here")
        seq_axis, batch_axis = (1, 0) if self.layout else (0, 1)
        self.steps, self.batch = shapes[x][seq_axis], shapes[x][batch_axis]
        self.weights = {role: self._constant(constants, inputs[index], role)
                        for index, role in ((1, "W"), (2, "R"), (3, "B"), (7, "P"))}
        if self.weights["W"] is None or self.weights["R"] is None:
            self._fail("has no W or R input")
        if not self.hidden:
            self.hidden = self.weights["R"].shape[-1]
        self.lengths = self._sequence_lens(constants, shapes, inputs[4])
        self._masks: dict[int, str] = {}
        self._expand(x, inputs[5], inputs[6])

    # -- what the node asks for

    def _fail(self, reason: str):
        raise CodegenError(f"node {self.name!r}: {self.op} {reason}")

    def _activations(self, attrs: dict) -> list[Activation]:
        """The activations of every direction (ONNX lists them per direction, forward first), parameters bound."""
        per_direction = DEFAULT_ACTIVATIONS[self.op]
        names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
        names = names or list(per_direction) * self.directions
        if len(names) != len(per_direction) * self.directions:
            self._fail(f"has {len(names)} activations; expected {len(per_direction) * self.directions}")
        known = []
        for name in names:
            match = next((k for k in ACTIVATION_PARAMETERS if k.lower() == name.lower()), None)
            if match is None:
                self._fail(f"activation {name!r} is not one of {', '.join(ACTIVATION_PARAMETERS)}")
            known.append(match)
        values = {"alpha": list(attrs.get("activation_alpha", [])), "beta": list(attrs.get("activation_beta", []))}
        bindings = {_bind(known, values, each_takes_both) for each_takes_both in (False, True)}
        if len(bindings) > 1:
            self._fail(f"activations {', '.join(known)} with activation_alpha {values['alpha']} and activation_beta "
                       f"{values['beta']}: runtimes read these lists differently for this mix of activations")
        bound = bindings.pop()
        for activation in bound:
            for key in ACTIVATION_PARAMETERS[activation.name]:
                if getattr(activation, key) is None:
                    self._fail(f"activation {activation.name} needs activation_{key}")
        return list(bound)

    def _constant(self, constants, name: str, role: str) -> np.ndarray | None:
        if not name:
            return None
        if name not in constants:
            self._fail(f"input {role} ({name!r}) must be an initializer to unroll the node")
        return numpy_helper.to_array(constants[name]).astype(np.float32)

    def _sequence_lens(self, constants, shapes, name: str) -> str | None:
        """The lengths each step is masked by, or None where every sequence runs the full length (no input,
        or a constant of full lengths: nothing to mask)."""
        if not name:
            return None
        if name in constants:
            lengths = numpy_helper.to_array(constants[name])
            if lengths.shape == (self.batch,) and np.all(lengths == self.steps):
                return None
            if lengths.shape != (self.batch,) or np.any(lengths < 0) or np.any(lengths > self.steps):
                self._fail(f"sequence_lens ({name!r}) {lengths.tolist()} is not one length from 0 to {self.steps} "
                           f"per sequence of the batch of {self.batch}")
        elif name in shapes and list(shapes[name]) != [self.batch]:
            self._fail(f"sequence_lens ({name!r}) has shape {shapes[name]}; expected [{self.batch}]")
        return name

    # -- graph building

    def _fresh(self, what: str) -> str:
        self._count += 1
        return f"{self.name}/unrolled/{what}_{self._count}"

    def _const(self, what: str, value: np.ndarray) -> str:
        """An initializer holding `value`: one per distinct value (every step's gate columns, shapes and scalars
        are the same few)."""
        array = np.array(value, order="C")  # 0-d stays 0-d
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self._fresh(what)
            self.initializers.append(numpy_helper.from_array(array, self._constants[key]))
        return self._constants[key]

    def _emit(self, op: str, inputs: Sequence[str], what: str | None = None, output: str | None = None,
              **attrs) -> str:
        output = output or self._fresh(what or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=self._fresh(op), **attrs))
        return output

    def _scalar(self, value: float) -> str:
        return self._const("scalar", np.array(value, np.float32))

    def _split(self, tensor: str, parts: int, size: int, axis: int, what: str) -> list[str]:
        """`tensor` in `parts` slices of `size` along `axis`: Slices with constant bounds, or before opset 10
        (whose Slice takes them as attributes, which TVM's frontend does not read) Gathers."""
        if parts == 1:
            return [tensor]
        slices = []
        for start in range(0, parts * size, size):
            if self.opset >= 10:
                bounds = [self._const("bound", np.array([value], np.int64)) for value in (start, start + size, axis)]
                slices.append(self._emit("Slice", [tensor, *bounds], what))
            else:
                indices = self._const("indices", np.arange(start, start + size, dtype=np.int64))
                slices.append(self._emit("Gather", [tensor, indices], what, axis=axis))
        return slices

    def _activate(self, x: str, activation: Activation, clipped: bool = True) -> str:
        if clipped and self.clip is not None:  # the gates' inputs; onnxruntime leaves the cell state unclipped
            x = self._emit("Max", [self._emit("Min", [x, self._scalar(self.clip)]), self._scalar(-self.clip)])
        name, alpha, beta = activation.name, activation.alpha, activation.beta
        if name in ("Sigmoid", "Tanh", "Relu", "Softsign", "Softplus"):
            return self._emit(name, [x])
        if name in ("LeakyRelu", "ThresholdedRelu", "Elu"):
            return self._emit(name, [x], alpha=alpha)
        if name == "HardSigmoid":
            return self._emit(name, [x], alpha=alpha, beta=beta)
        if name == "Affine":
            return self._emit("Add", [self._emit("Mul", [x, self._scalar(alpha)]), self._scalar(beta)])
        return self._emit("Mul", [self._emit("Tanh", [self._emit("Mul", [x, self._scalar(beta)])]),  # ScaledTanh
                                  self._scalar(alpha)])

    def _states(self, tensor: str) -> list[str | None]:
        """Each direction's [batch, H] slice of an initial state [directions, batch, H] (layout 1: [batch,
        directions, H]); None for an absent one (zeros)."""
        if not tensor:
            return [None] * self.directions
        slices = self._split(tensor, self.directions, 1, 1 if self.layout else 0, "state")
        return [self._emit("Reshape", [part, self._shape(self.batch, self.hidden)], "state") for part in slices]

    def _expand(self, x: str, initial_h: str, initial_c: str) -> None:
        if self.layout:  # [batch, seq, input] -> [seq, batch, input]
            x = self._emit("Transpose", [x], "x", perm=[1, 0, 2])
        sequences, finals, cells = [], [], []
        for direction, h, c in zip(range(self.directions), self._states(initial_h), self._states(initial_c)):
            h_steps, h, c = self._direction(x, direction, h, c)
            sequences.append(self._emit("Concat", h_steps, "y", axis=0))  # [seq, batch, H]
            finals.append(h)
            cells.append(c)
        outputs = list(self.node.output) + [""] * (3 - len(self.node.output))
        y, y_h, y_c = outputs[:3]
        hidden = [self.batch, self.hidden]
        if y:
            stacked = [self._emit("Reshape", [s, self._shape(self.steps, 1, *hidden)]) for s in sequences]
            full = self._join(stacked, 1, "Y")  # [seq, directions, batch, H]
            self._finish(full, y, [2, 0, 1, 3])
        for final, name in ((finals, y_h), (cells, y_c)):
            if name:
                stacked = [self._emit("Reshape", [f, self._shape(1, *hidden)]) for f in final]
                self._finish(self._join(stacked, 0, "state"), name, [1, 0, 2])

    def _join(self, parts: list[str], axis: int, what: str) -> str:
        return parts[0] if len(parts) == 1 else self._emit("Concat", parts, what, axis=axis)

    def _finish(self, tensor: str, output: str, batch_first: list[int]) -> None:
        """`tensor` as the node's `output`, in the node's layout."""
        if self.layout:
            self._emit("Transpose", [tensor], output=output, perm=batch_first)
        else:
            self._emit("Identity", [tensor], output=output)

    def _direction(self, x: str, direction: int, h: str | None, c: str | None) -> tuple[list[str], str, str | None]:
        """One direction over the sequence: each step's H ([1, batch, H], in time order), the last H and C."""
        gates, hidden = GATES[self.op], self.hidden
        w, r = self.weights["W"][direction], self.weights["R"][direction]  # [G*H, input], [G*H, H]
        bias = self.weights["B"]
        w_bias, r_bias = ((bias[direction, : gates * hidden], bias[direction, gates * hidden:]) if bias is not None
                          else (np.zeros(gates * hidden, np.float32),) * 2)
        if self.op == "GRU" and self.linear_before_reset:
            # Rbh is added to H's product with Rh before the reset gate multiplies it: keep it apart
            input_bias = w_bias + np.concatenate([r_bias[: 2 * hidden], np.zeros(hidden, np.float32)])
        else:
            input_bias = w_bias + r_bias
        projected = self._emit("Add", [self._emit("MatMul", [x, self._const("W_t", w.T)]),
                                       self._const("bias", input_bias)], "xw")  # [seq, batch, G*H]
        recurrence = self._recurrence(r.T, r_bias)
        activations = self.activations[direction * len(DEFAULT_ACTIVATIONS[self.op]):]
        peepholes = self.weights["P"][direction] if self.weights["P"] is not None else None
        forward = direction == 0 and self.direction != "reverse"
        step = {"LSTM": self._lstm_step, "GRU": self._gru_step, "RNN": self._rnn_step}[self.op]
        inputs = [self._emit("Reshape", [part, self._shape(self.batch, gates * hidden)], "x_t")
                  for part in self._split(projected, self.steps, 1, 0, "x_t")]
        outputs: dict[int, str] = {}
        for t in range(self.steps) if forward else range(self.steps - 1, -1, -1):
            h_t, c_t = step(inputs[t], h, c, recurrence, activations, peepholes)
            if self.lengths:  # past a sequence's end: its states held, its Y zero
                mask = self._mask(t)
                h, c = self._held(h, h_t, mask), None if c_t is None else self._held(c, c_t, mask)
                h_t = self._emit("Mul", [h_t, mask], "h")
            else:
                h, c = h_t, c_t
            outputs[t] = self._emit("Reshape", [h_t, self._shape(1, self.batch, hidden)], "h_t")
        if self.lengths:  # an empty sequence's last states are zeros, not its initial ones (as onnxruntime's)
            nonempty = self._mask(0)
            h = self._emit("Mul", [h, nonempty], "h")
            c = None if c is None else self._emit("Mul", [c, nonempty], "c")
        return [outputs[t] for t in range(self.steps)], h, c

    def _mask(self, t: int) -> str:
        """[batch, 1]: 1.0 for the sequences step `t` lies within, 0.0 past their end (shared by the directions)."""
        if t not in self._masks:
            within = self._emit("Less", [self._const("step", np.array(t, np.int32)), self.lengths], "within")
            self._masks[t] = self._emit("Reshape", [self._emit("Cast", [within], to=onnx.TensorProto.FLOAT),
                                                    self._shape(self.batch, 1)], "mask")
        return self._masks[t]

    def _held(self, state: str | None, new: str, mask: str) -> str:
        """`new` where `mask` is 1, else `state` (None: the zero initial state)."""
        if state is None:
            return self._emit("Mul", [new, mask], "held")
        return self._emit("Add", [state, self._emit("Mul", [mask, self._emit("Sub", [new, state])])], "held")

    def _recurrence(self, r_t: np.ndarray, r_bias: np.ndarray) -> dict[str, str]:
        """The initializers a step multiplies H by: R^T whole, or for a GRU its z and r columns apart from
        its h columns (which multiply r * H, or whose product r multiplies) and Rbh."""
        if self.op != "GRU":
            return {"R": self._const("R_t", r_t)}
        hidden = self.hidden
        return {"R_zr": self._const("R_zr_t", r_t[:, : 2 * hidden]), "R_h": self._const("R_h_t", r_t[:, 2 * hidden:]),
                "Rb_h": self._const("Rb_h", r_bias[2 * hidden:])}

    def _shape(self, *dims: int) -> str:
        return self._const("shape", np.array(dims, np.int64))

    def _gates(self, x_t: str, h: str | None, r_t: str) -> str:
        """A step's gate inputs: X's share plus H times R^T (nothing where H is the zero initial state)."""
        return x_t if h is None else self._emit("Add", [x_t, self._emit("MatMul", [h, r_t])], "gates")

    def _lstm_step(self, x_t, h, c, recurrence, activations, peepholes):
        f, g, act_h = activations[:3]
        hidden = self.hidden
        gates = self._gates(x_t, h, recurrence["R"])
        i_pre, o_pre, f_pre, c_pre = self._split(gates, 4, hidden, 1, "gate")
        if peepholes is not None and c is not None:
            i_pre = self._emit("Add", [i_pre, self._emit("Mul", [c, self._const("P_i", peepholes[:hidden])])])
            f_pre = self._emit("Add", [f_pre, self._emit("Mul", [c, self._const("P_f", peepholes[2 * hidden:])])])
        i = self._activate(i_pre, f)
        forget = self._emit("Sub", [self._scalar(1.0), i]) if self.input_forget else self._activate(f_pre, f)
        candidate = self._emit("Mul", [i, self._activate(c_pre, g)])
        c = candidate if c is None else self._emit("Add", [self._emit("Mul", [forget, c]), candidate], "c")
        if peepholes is not None:
            o_pre = self._emit("Add", [o_pre, self._emit("Mul", [c, self._const("P_o", peepholes[hidden:2 * hidden])])])
        h = self._emit("Mul", [self._activate(o_pre, f), self._activate(c, act_h, clipped=False)], "h")
        return h, c

    def _gru_step(self, x_t, h, _c, recurrence, activations, _peepholes):
        f, g = activations[:2]
        x_z, x_r, x_h = self._split(x_t, 3, self.hidden, 1, "gate")
        if h is None:  # H0 = 0: R's products vanish (but not Rbh, where the reset gate multiplies it)
            z, r = self._activate(x_z, f), self._activate(x_r, f)
            h_pre = self._emit("Add", [x_h, self._emit("Mul", [r, recurrence["Rb_h"]])]) if self.linear_before_reset \
                else x_h
            candidate = self._activate(h_pre, g)
            return self._emit("Sub", [candidate, self._emit("Mul", [z, candidate])], "h"), None
        h_z, h_r = self._split(self._emit("MatMul", [h, recurrence["R_zr"]]), 2, self.hidden, 1, "gate")
        z = self._activate(self._emit("Add", [x_z, h_z]), f)
        r = self._activate(self._emit("Add", [x_r, h_r]), f)
        if self.linear_before_reset:
            recurrent = self._emit("Add", [self._emit("MatMul", [h, recurrence["R_h"]]), recurrence["Rb_h"]])
            h_pre = self._emit("Add", [x_h, self._emit("Mul", [r, recurrent])])
        else:
            h_pre = self._emit("Add", [x_h, self._emit("MatMul", [self._emit("Mul", [r, h]), recurrence["R_h"]])])
        candidate = self._activate(h_pre, g)
        # H = (1 - z) * candidate + z * H_prev = candidate + z * (H_prev - candidate)
        return self._emit("Add", [candidate, self._emit("Mul", [z, self._emit("Sub", [h, candidate])])], "h"), None

    def _rnn_step(self, x_t, h, _c, recurrence, activations, _peepholes):
        return self._activate(self._gates(x_t, h, recurrence["R"]), activations[0]), None

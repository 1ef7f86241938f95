"""The whole ONNX model -> one TVM Relax executable: block-sparse kernels for pruned layers, dense for the rest.

    >>> ex = build_model(pruned, {"fc1.weight": (16, 16)}, resolve_target("x86"), {"input": [1, 128]})
    >>> ex  # tvm.runtime.Executable; export it with pruneaug.codegen.export.export_artifact

Steps (DESIGN §2 "Codegen"): import with TVM's ONNX frontend at static shapes; fold constants so that
every linear layer reads `matmul(x, const)` or `conv2d`/`conv1d(x, const)`; rewrite those calls into `call_tir`
of our kernels (`pruneaug.codegen.bsr`): the block-sparse kernel where the constant is a weight named
in `sparse_weights`, the dense kernel otherwise, a bias add and a ReLU after it fused in (a strided conv
runs as a stride-1 conv over its input's stride phases, see `conv_lowering.StridePhases`); on CPUs,
last-axis layer norms (with a residual add before one read inside it) and softmaxes become our
vectorised kernels (`norm.py`, `softmax.py`); on every target, reshape pairs that cancel are dropped
(`rewritten_model`); then TVM's usual legalize-and-fuse for the rest. TVM's CPU pipeline schedules
nothing (an untuned model ran ~100x slower than onnxruntime), so every remaining PrimFunc gets a
schedule: DLight's CPU GEMV and Reduction rules (other reductions) and two small rules below, one for
a reduction with two operands (matmuls between activations, depthwise and grouped convs) and one for injective ops;
exp/erf/tanh become TVM's vectorisable fast versions (libm's are scalar calls). No tuning: compile
time stays seconds. On CPUs the Relax function itself is lowered to native code (`_exec_mode`), and
its intermediate tensors are allocated once per loaded model, not per run (`workspace.py`).
CUDA uses TVM's own pipeline, which schedules with DLight's GPU rules and replays the inner kernels
as a CUDA graph (`_pass_context`).

Sparse layers are found by value, not by name (the frontend keeps no ONNX names on Relax calls): each
sparse initializer's canonical view W[out, in] is hashed and compared with each folded constant.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from pruneaug.codegen import bsr, conv_lowering, pooling, recurrent, row_mean, softmax
from pruneaug.codegen.cpu_kernels import largest_divisor
from pruneaug.codegen.threads import worth_parallel
from pruneaug.codegen.workspace import lift_workspace_pass
from pruneaug.cost_model.targets import TargetProfile
from pruneaug.errors import CodegenError
from pruneaug.gate import GATE_RTOL, close, onnxruntime_outputs, output_mismatch
from pruneaug.ir import shape_folding
from pruneaug.ir.prunable import unique_node_names, weight_uses

if TYPE_CHECKING:  # TVM's compiler is imported where it is used, not when this module is
    import tvm

def build_model(
    model: onnx.ModelProto,
    sparse_weights: Mapping[str, tuple[int, int]],
    target: TargetProfile,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tvm.runtime.Executable:
    """Compile `model` for `target`; the initializers in `sparse_weights` run in our BSR kernel with their (r, c)
    blocks (a dense one too, every block kept), the other linear layers' in the dense kernel (`bsr.DENSE_BLOCK`).

    Raises CodegenError for a block shape the target cannot serve (before any compile), an op TVM's
    ONNX frontend cannot import (named), or a dynamic input dimension that `input_shapes` leaves open.
    """
    for block in sorted(set(sparse_weights.values())):
        bsr.check_block_supported(target, tuple(block))
    mod = rewritten_model(model, sparse_weights, target, input_shapes)
    from tvm import relax

    from pruneaug.codegen.export import cuda_binaries_at_build

    with target.tvm(), cuda_binaries_at_build(target), _pass_context(target):
        return relax.build(mod, target.tvm(), relax_pipeline=_pipeline(target), exec_mode=_exec_mode(target))


def rewritten_model(model: onnx.ModelProto, sparse_weights: Mapping[str, tuple[int, int]], target: TargetProfile,
                    input_shapes: Mapping[str, Sequence[int]] | None = None):
    """The Relax module `build_model` hands to TVM's pipeline: imported, constants folded, linear layers
    (and on CPUs layer norms and softmaxes) as calls of our kernels.

    Our kernels read and write 2-D views, so each call sits between reshapes; where one kernel's output
    view feeds the next kernel, TVM's `RemoveRedundantReshape` drops the pair that cancels. Each
    reshape left is a runtime call (about 115 ns on an EPYC host): the bundled encoder had 13, now 7."""
    from tvm import relax

    mod = import_onnx(model, input_shapes)
    views = canonical_views(model, sparse_weights)
    mod = _batch_norms_as_scale_shift(_fold_constants(mod))
    if target.kind != "cuda":
        mod = _transposed_convs_as_convs(mod)
    by_value: dict[tuple, list[tuple[str, tuple[int, int], np.ndarray]]] = {}
    for name, w in views.items():  # weights equal in value (all zero, say) are one kernel's to serve
        by_value.setdefault(_key(w), []).append((name, tuple(sparse_weights[name]), w))
    rewriter = _LinearRewriter(target, by_value)
    mod = rewriter.rewrite(mod)
    missing = sorted(set(sparse_weights) - rewriter.matched)
    if missing:  # the plan counts on their kernels: an artifact running them dense would belie it
        raise CodegenError(f"weights planned for our block-sparse kernels that no MatMul/Gemm/Conv of the imported "
                           f"model reads as those kernels serve it (TVM would run them): {', '.join(missing)}")
    if target.kind != "cuda":
        mod = _norms_from_parts(mod)
        mod = _rewrite_cpu_ops(mod, target)
        mod = _widen_grouped_convs(mod, _vector_lanes(target))
        mod = _vectorisable_math(mod)
    return relax.transform.RemoveRedundantReshape()(mod)


# ---------------------------------------------------------------------------------------------------------
# Correctness gate


def check_against_onnxruntime(
    compiled,
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    rtol: float = GATE_RTOL,
    *,
    sparse_weights: Mapping[str, tuple[int, int]] | None = None,
    target: TargetProfile | None = None,
    expected: Sequence[np.ndarray] | None = None,
) -> None:
    """Raise CodegenError unless the compiled model's outputs match onnxruntime's on `inputs`.

    `compiled` is an Executable from `build_model` for `target` (x86 when not given), run as its exported
    artifact would run, or a `pruneaug.runtime.LoadedModel`.
    An output matches when `max|ours - ort| <= rtol * max|ort|` (float32 sums in another order differ
    by far less). On a mismatch, given the `sparse_weights` and `target` it was built with, the model is
    rebuilt with every MatMul/Gemm/Conv output exposed, and the error names the first such node that differs.
    `expected`: onnxruntime's outputs on `inputs` where they were computed already (`gate.onnxruntime_outputs`).
    """
    theirs = onnxruntime_outputs(model, inputs) if expected is None else expected
    mismatch = output_mismatch(model, _run_compiled(compiled, model, inputs, target), theirs, rtol)
    if mismatch is None:
        return
    bad, error = mismatch
    where = f"output {bad!r}"
    if target is not None:
        layer = _first_differing_layer(model, inputs, rtol, sparse_weights or {}, target)
        if layer is not None:
            where = f"layer {layer!r} (first differing node; model output {bad!r})"
    raise CodegenError(f"compiled model differs from onnxruntime at {where}: relative error {error:.2e} > {rtol:g}")


def _run_compiled(compiled, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                  target: TargetProfile | None = None) -> list[np.ndarray]:
    """Outputs of a LoadedModel, or of an Executable built for `target` (default x86) exported and loaded
    as a deployment would load it.

    (Running a VM on the Executable itself would also mark its constants with memory scopes that a
    later export saves, and every load of that artifact then logs TVM warnings.)"""
    if hasattr(compiled, "run"):
        return compiled.run(inputs)
    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.cost_model.targets import resolve_target
    from pruneaug.runtime import device_for, load

    target = target or resolve_target("x86")
    shapes = {name: list(array.shape) for name, array in inputs.items()}
    with tempfile.TemporaryDirectory(prefix="pruneaug-gate-") as folder:
        path = export_artifact(compiled, target, Path(folder) / "gate", model_signature(model, shapes))
        return load(path, device_for(target.kind)).run(inputs)


def _first_differing_layer(model, inputs, rtol, sparse_weights, target) -> str | None:
    """The first MatMul/Gemm/Conv (in graph order) whose output differs, from a rebuild exposing them all."""
    layers = [node for node in model.graph.node if node.op_type in ("MatMul", "Gemm", "Conv")]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {value.name for value in exposed.graph.output}
    inferred = {value.name: value for value in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in layers:
        name = node.output[0]
        if name not in existing:
            exposed.graph.output.append(
                inferred.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    names = [value.name for value in exposed.graph.output]
    shapes = {name: array.shape for name, array in inputs.items()}
    ours = _run_compiled(build_model(exposed, sparse_weights, target, shapes), exposed, inputs, target)
    theirs = dict(zip(names, onnxruntime_outputs(exposed, inputs)))
    ours_by_name = dict(zip(names, ours))
    for node in layers:
        name = node.output[0]
        if not close(ours_by_name[name], theirs[name], rtol):
            return node.name or name
    return None


# ---------------------------------------------------------------------------------------------------------
# Import


def import_onnx(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None):
    """The model as a Relax IRModule with static shapes; CodegenError naming what the frontend cannot take.
    Its shape computations are folded to constants first (`shape_folding.folded`): the frontend left some symbolic;
    then its LSTM, GRU and RNN nodes are unrolled (`recurrent.unrolled`): the frontend has no converter for them."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    shapes = _static_input_shapes(model, input_shapes or {})
    # folded first: the unrolling reads the model's shapes, which fold its shape computations again otherwise
    model = recurrent.unrolled(shape_folding.folded(model, shapes), shapes)
    known = set(_get_convert_map()) | {"Constant", "If"}
    for name, node in zip(unique_node_names(model.graph.node), model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            raise CodegenError(
                f"node {name!r}: op {node.domain + '.' if node.domain else ''}{node.op_type} "
                "is not supported by TVM's ONNX frontend"
            )
    try:
        with _without_onnx_checker():
            mod = from_onnx(model, shape_dict=shapes, sanitize_input_names=False)
    except Exception as err:  # the frontend raises bare TVM/Python errors; say which model step failed
        reason = str(err).strip().splitlines()[-1]
        raise CodegenError(f"TVM's ONNX frontend could not import the model: {reason}") from err
    return mod


@contextlib.contextmanager
def _without_onnx_checker() -> Iterator[None]:
    """Let TVM's frontend skip its `onnx.checker.check_model`: it only turns the checker's errors into
    warnings, and pruneaug checks every model from its file already (`onnx_io.check_model`); in memory
    the check cost 1.1 s on BERT-base."""
    check = onnx.checker.check_model
    onnx.checker.check_model = lambda *args, **kwargs: None
    try:
        yield
    finally:
        onnx.checker.check_model = check


def _static_input_shapes(model: onnx.ModelProto, given: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Every graph input's shape with dynamic dims bound from `given`; an unbound dynamic dim is an error."""
    initializer_names = {init.name for init in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        if value.name in given:
            shapes[value.name] = [int(d) for d in given[value.name]]
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            raise CodegenError(f"input {value.name!r} has a dynamic shape: give its static shape (input_shapes)")
        shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def canonical_views(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    """W[out, in] (DESIGN §2) of each named initializer, as the MatMul/Gemm/Conv that reads it sees it."""
    constants = {init.name: init for init in model.graph.initializer}
    for name in names:
        if name not in constants:
            raise CodegenError(f"sparse weight {name!r} is not an initializer of the model")
    views = {}
    for use in weight_uses(model):
        if use.weight in names and use.weight not in views:
            stored = numpy_helper.to_array(constants[use.weight]).astype(np.float32)
            views[use.weight] = np.ascontiguousarray(use.layout.to_canonical(stored))
    return views


def _key(array: np.ndarray) -> tuple:
    """Identity of a weight by value: its shape and a digest of its bytes (SHA-256: with the CPU's SHA
    instructions twice blake2b's speed here, and a model's every weight goes through it)."""
    return array.shape, hashlib.sha256(np.ascontiguousarray(array, np.float32).data).digest()


def _fold_constants(mod):
    """Fold Gemm's transposes and beta scaling of constants so that linear layers read plain constants."""
    from tvm import relax

    return relax.transform.FoldConstant()(relax.transform.DecomposeOpsForInference()(mod))


def _batch_norms_as_scale_shift(mod):
    """Each inference BatchNormalization, as TVM decomposes it (`(x - mean) / sqrt(var + eps) * gamma + beta`, the
    constants folded), as `x * scale + shift` with `scale = gamma / sqrt(var + eps)` and `shift = beta - mean *
    scale` folded here, as onnxruntime computes it: TVM divided every element by its channel's root. A BN no conv
    precedes stays in the model (torch folds the others into the conv on export), as DenseNet-121's before each
    layer: its whole model ran 1.04x faster so (16x1 at 70%, side by side, 2 threads)."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, mean, root, gamma, beta = wildcard(), is_const(), is_const(), is_const(), is_const()
    pattern = is_op("relax.add")(is_op("relax.multiply")(
        is_op("relax.divide")(is_op("relax.subtract")(x, mean), root), gamma), beta)

    def scale_shift(orig, matched):
        shape = _static_shape(orig)
        values = [matched[c].value.numpy().astype(np.float64) for c in (mean, root, gamma, beta)]
        if (shape is None or orig.ty.dtype != "float32"
                or any(np.broadcast_shapes(value.shape, shape) != tuple(shape) for value in values)):
            return orig
        mean_value, root_value, gamma_value, beta_value = values
        scale = gamma_value / root_value
        shift = beta_value - mean_value * scale
        return relax.op.add(relax.op.multiply(matched[x], relax.const(scale.astype(np.float32))),
                            relax.const(shift.astype(np.float32)))

    return _rewrite_main(mod, pattern, scale_shift, lambda value: _op_name(value) == "relax.divide")


# ---------------------------------------------------------------------------------------------------------
# Rewriting linear layers into calls of our kernels


def _activation_pattern(activation: str | None, linear) -> tuple[object, Callable[[dict], bool]]:
    """The pattern of `activation` applied to `linear`, and a check of a match that the pattern alone cannot
    express. ONNX's Clip reaches Relax as TVM's frontend emits it, `call_tir(minimum, (call_tir(maximum,
    (y, lo)), hi))`: ReLU6 is that with lo = 0 and hi = 6 (the callees are named after their topi ops).
    HardSwish reaches it as `y * (clip(y + 3, 0, 6) / 6)`; GELU as torch exports it (Div, Erf, Add, Mul, Mul) as
    `y * (erf(y / sqrt 2) + 1) * 0.5`, or written out as `(y * 0.5) * (1 + erf(y * (1 / sqrt 2)))` (the bundled
    encoder's, Hugging Face's BERT's), either operand of each product and sum first."""
    from tvm.relax.dpl import is_call_tir, is_const, is_op, wildcard

    if activation is None:
        return linear, lambda matched: True
    if activation == "relu":
        return is_op("relax.nn.relu")(linear), lambda matched: True
    if activation == "hardswish":
        three, six, low, high = is_const(), is_const(), wildcard(), wildcard()
        clip = is_op("relax.clip")(is_op("relax.add")(linear, three), low, high)
        swish = is_op("relax.multiply")(linear, is_op("relax.divide")(clip, six))

        def is_hardswish(matched) -> bool:
            bounds = [_prim_value(matched[bound]) for bound in (low, high)]
            return bounds == [0.0, 6.0] and _scalar(matched[three]) == 3.0 and _scalar(matched[six]) == 6.0

        return swish, is_hardswish
    if activation == "gelu":
        root, inverse_root, one, half = is_const(), is_const(), is_const(), is_const()
        scaled = (is_op("relax.divide")(linear, root) | is_op("relax.multiply")(linear, inverse_root)
                  | is_op("relax.multiply")(inverse_root, linear))
        erf = is_op("relax.erf")(scaled)
        one_plus = is_op("relax.add")(erf, one) | is_op("relax.add")(one, erf)
        halved = is_op("relax.multiply")(linear, half) | is_op("relax.multiply")(half, linear)
        gelu = (is_op("relax.multiply")(is_op("relax.multiply")(linear, one_plus), half)  # torch's export
                | is_op("relax.multiply")(halved, one_plus) | is_op("relax.multiply")(one_plus, halved))

        def is_gelu(matched) -> bool:
            scale = _scalar(matched[root]) if root in matched else 1 / (_scalar(matched[inverse_root]) or np.inf)
            return abs(scale - 2 ** 0.5) < 1e-6 and _scalar(matched[one]) == 1.0 and _scalar(matched[half]) == 0.5

        return gelu, is_gelu
    assert activation == "relu6", activation
    low, high = is_const(), is_const()
    floor = is_call_tir("", (linear, low))
    clip = is_call_tir("", (floor, high))

    def is_relu6(matched) -> bool:
        return all(matched[call].args[0].name_hint.startswith(name) and _scalar(matched[bound]) == value
                   for call, name, bound, value in ((floor, "maximum", low, 0.0), (clip, "minimum", high, 6.0)))

    return clip, is_relu6


# the op a model must call for an activation's pattern to match (`_activation_pattern`): patterns of absent
# activations are not tried, each pass over BERT-base's graph costs ~0.8 s (`_rewrite_cpu_ops`)
_ACTIVATION_OPS = {"hardswish": "relax.clip", "relu6": "relax.call_tir", "relu": "relax.nn.relu", "gelu": "relax.erf"}


@dataclass
class _Match:
    """One linear call found in the Relax graph: its input, weight constant, optional bias constant and the
    activation applied to its result (None or one of `bsr.ACTIVATIONS`)."""

    x: object
    weight: np.ndarray
    bias: np.ndarray | None
    activation: str | None = None


class _LinearRewriter:
    """Replaces `matmul(x, const)` and group-1 `conv2d(x, const)` and `conv1d(x, const)` (a 2-D conv of
    one-row images) (with an optional `+ const` bias and an optional ReLU after it) by kernels."""

    def __init__(self, target: TargetProfile, sparse: dict[tuple, list[tuple[str, tuple[int, int], np.ndarray]]]):
        self.target = target
        self.sparse = sparse
        self.matched: set[str] = set()
        self._bb = None

    def rewrite(self, mod):
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        self._bb = relax.BlockBuilder(mod)
        func = mod["main"]
        called = {_op_name(binding.value) for block in func.body.blocks for binding in block.bindings}
        for op, make in (("relax.matmul", self._matmul), ("relax.nn.conv2d", self._conv2d),
                         ("relax.nn.conv1d", self._conv1d)):
            if op not in called:
                continue
            x, weight, bias = wildcard(), is_const(), is_const()
            call = is_op(op)(x, weight)
            with_bias = is_op("relax.add")(call, bias) | is_op("relax.add")(bias, call)
            # the longest pattern first: an activation after the layer is fused into its kernel's stores
            for activation in ("gelu", "hardswish", "relu6", "relu", None):
                if activation is not None and _ACTIVATION_OPS[activation] not in called:
                    continue
                for linear in (with_bias, call):
                    pattern, applies = _activation_pattern(activation, linear)
                    func = relax.dpl.rewrite_call(
                        pattern,
                        lambda orig, m, c=call, a=activation, ok=applies:
                            self._dispatch(orig, m, c, x, weight, bias, a, make) if ok(m) else orig,
                        func,
                    )
        out = self._bb.get()
        out["main"] = func
        return relax.transform.DeadCodeElimination()(out)

    def _dispatch(self, orig, m, call_pattern, x, weight, bias, activation, make):
        call = m[call_pattern]
        bias_array = m[bias].value.numpy() if bias in m else None
        found = _Match(m[x], m[weight].value.numpy(), bias_array, activation)
        new = make(call, found)
        return orig if new is None else new

    def _add_kernel(self, kernel: bsr.Kernel):
        """Add a kernel's PrimFunc to the module (marked scheduled) and return its GlobalVar.

        The BlockBuilder names it uniquely and keeps one copy of structurally equal functions: layers
        of one shape (and, if sparse, one kept-block count) share their compiled code."""
        func = kernel.primfunc.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
        return self._bb.add_func(func, kernel.name)

    def _call(self, kernel: bsr.Kernel, x, out_shape):
        from tvm import relax

        gv = self._add_kernel(kernel)
        consts = [relax.const(c) for c in kernel.constants]
        return relax.call_tir(gv, [x, *consts], relax.TensorType(out_shape, "float32"))

    def _sparse_entry(self, w: np.ndarray):
        """The (name, block, weight) of the sparse weight equal to `w`, or None. Weights equal in value
        (a model's all-zero layers) are told apart by nothing the imported model keeps: the first one's
        block serves them all, and all count as served."""
        entries = self.sparse.get(_key(w))
        if not entries:
            return None
        self.matched.update(name for name, _, _ in entries)
        return entries[0]

    def _matmul(self, call, found: _Match):
        from tvm import relax

        x_shape = _static_shape(found.x)
        if found.weight.ndim != 2 or found.weight.dtype != np.float32 or not x_shape:
            return None
        w = np.ascontiguousarray(found.weight.T)  # [K, N] constant -> canonical W[N, K]
        out_dim, in_dim = w.shape
        bias = _vector_bias(found.bias, out_dim, ndim=len(x_shape))
        if found.bias is not None and bias is None:
            return None  # a bias we cannot fuse: the pattern without it takes the matmul, TVM adds it after
        m = int(np.prod(x_shape[:-1]))  # a vector x (1-D) is one row
        entry = self._sparse_entry(w)
        if entry is not None:
            kernel = bsr.bsr_matmul_kernel(self.target, m, bsr.to_bsr(w, entry[1]), bias=bias, name="bsr_matmul",
                                           activation=found.activation)
        else:
            kernel = bsr.dense_matmul_kernel(self.target, m, w, bias=bias, name="dense_matmul",
                                             activation=found.activation)
        x2 = found.x if len(x_shape) == 2 else relax.op.reshape(found.x, [m, in_dim])
        y = self._call(kernel, x2, [m, out_dim])
        return y if len(x_shape) == 2 else relax.op.reshape(y, [*x_shape[:-1], out_dim])

    def _conv2d(self, call, found: _Match):
        attrs = call.attrs
        x_shape = _conv_input_shape(call, found, ("NCHW", "OIHW", "NCHW"))
        if x_shape is None:
            return None
        return self._conv(found, tuple(x_shape), found.weight.shape[2:], attrs.groups, tuple(attrs.strides),
                          tuple(attrs.padding), tuple(attrs.dilation))

    def _conv1d(self, call, found: _Match):
        """A Conv1d as the 2-D conv of one-row images: X [N, C, L] viewed as [N, C, 1, L], kernel 1 x k."""
        from tvm import relax

        attrs = call.attrs
        x_shape = _conv_input_shape(call, found, ("NCW", "OIW", "NCW"))
        if x_shape is None:
            return None
        n, c, length = x_shape
        (stride,), (begin, end), (dilation,) = attrs.strides, attrs.padding, attrs.dilation
        y = self._conv(found, (n, c, 1, length), (1, found.weight.shape[2]), attrs.groups, (1, stride),
                       (0, begin, 0, end), (1, dilation), x=relax.op.reshape(found.x, [n, c, 1, length]))
        return None if y is None else relax.op.reshape(y, [n, *_static_shape(call)[1:]])

    def _conv(self, found: _Match, x_shape: tuple[int, int, int, int], kernel_hw, groups, strides, pads, dilations,
              x=None):
        """Our kernels for a float32 conv over NCHW `x` (default: the matched input) of `x_shape`, or None to
        leave it to TVM: group 1, or on CPUs a grouped conv of `GROUPED_MIN_ROWS` output channels a group or
        more (`_grouped_block`)."""
        c_out = found.weight.shape[0]
        groups = int(groups)
        if found.weight.dtype != np.float32 or (groups != 1 and (self.target.kind == "cuda"
                                                                 or c_out // groups < GROUPED_MIN_ROWS)):
            return None
        bias = _channel_bias(found.bias, c_out, spatial=found.weight.ndim - 2)
        if found.bias is not None and bias is None:
            return None
        if groups != 1:
            w, name = _block_diagonal(found.weight, groups), "grouped_conv2d"
            block = _grouped_block(self.target, c_out // groups, x_shape, kernel_hw, strides, pads, dilations)
        else:
            w = np.ascontiguousarray(found.weight.reshape(c_out, -1))
            entry = self._sparse_entry(w)
            block = entry[1] if entry is not None else bsr.DENSE_BLOCK  # dense: every block kept
            name = "bsr_conv2d" if entry is not None else "dense_conv2d"
        y = found.x if x is None else x
        for step in conv_lowering.conv_calls(self.target, tuple(int(d) for d in x_shape), w, block,
                                             tuple(int(k) for k in kernel_hw), tuple(int(v) for v in strides),
                                             tuple(int(v) for v in pads), tuple(int(v) for v in dilations),
                                             bias=bias, activation=found.activation, name=name):
            y = self._call(step.kernel, y, step.out_shape)
        return y


# output channels a group from which a grouped conv runs in our block-sparse kernel, its weight block-diagonal
# (`_block_diagonal`, `_grouped_block`): RegNetY-400MF's 3x3 convs of 8 channels a group ran 1.3-12x faster so than
# in TVM's grouped conv, and 1.1-4x faster than onnxruntime's, from 56x56 to 7x7 maps; ResNeXt's of 4 a group
# 1.3-1.85x faster than TVM's (3-5.5x onnxruntime's), from 128x56x56 to 1024x7x7; strided, in blocks of 16 rows,
# 1.2-11x faster than TVM's and 1.8-4.1x onnxruntime's, 4 or 8 a group (scratch A/Bs, 2 threads); a depthwise conv
# (1 a group) would be blocks of one row
GROUPED_MIN_ROWS = 4
STRIDED_GROUPED_ROWS = 16  # rows of a strided grouped conv's blocks


def _grouped_block(target: TargetProfile, rows_per_group: int, x_shape, kernel_hw, strides, pads,
                   dilations) -> tuple[int, int]:
    """The block of a grouped conv's block-diagonal weight: as many rows as divide a group's (up to 16: no
    zero in a block); but for a strided conv whose kernel would then split its input into stride phases
    first (the layout that loads the input as vectors along a row: a group's 8 or 4 rows on AVX-512),
    STRIDED_GROUPED_ROWS, so that the layout loads it a scalar at a time and reads it at the stride
    (`conv_lowering.strided_in_place`). On AVX-512, 8 a group, 128x56x56 to 1024x14x14 inputs ran 1.3-3.8x
    faster in 16-row blocks than split, though half of each block is zeros (4 a group: 1.2-4.4x); at
    stride 1 16-row blocks ran 1.3-3x slower than a group's rows. (With 8 or 4 lanes, a group's 8 rows
    already load the input a scalar at a time.)"""
    block = (math.gcd(rows_per_group, 16), 1)
    x_shape, kernel_hw, strides, pads, dilations = (tuple(int(v) for v in values)
                                                    for values in (x_shape, kernel_hw, strides, pads, dilations))
    if strides == (1, 1) or conv_lowering.strided_in_place(target, x_shape, block, kernel_hw, strides, pads, dilations):
        return block
    return (STRIDED_GROUPED_ROWS, 1)


def _block_diagonal(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight [Cout, Cin / groups, kh, kw] as the canonical weight [Cout, Cin * kh * kw] of the
    group-1 conv it equals: group g's outputs read only group g's inputs, the rest zero (blocks the BSR kernel
    drops, so it does the grouped conv's work alone)."""
    c_out, per_group = weight.shape[0], weight.shape[1] * int(np.prod(weight.shape[2:]))
    rows = c_out // groups
    w = np.zeros((c_out, groups * per_group), np.float32)
    for g in range(groups):
        outputs = slice(g * rows, (g + 1) * rows)
        w[outputs, g * per_group:(g + 1) * per_group] = weight[outputs].reshape(rows, -1)
    return w


@dataclass(frozen=True)
class _KernelOp:
    """An op that a kernel of ours can replace: its pattern, and `kernel(call, shape, rows, cols, matched)`
    (`shape`: the op's output shape; `rows x cols`: that shape as a matrix of rows along its last axis),
    which returns `(key, make, name, inputs, extra)` (`make(*key)` builds the PrimFunc; its arguments are
    the `inputs`, then the `extra` ones) or None to leave the call to TVM. A row op (`rows`: layer norm,
    softmax) reads each input, of the op's shape, and writes its output as [rows, cols] views; another
    op's kernel reads its inputs and writes its output in their own shapes."""

    pattern: object
    kernel: Callable
    rows: bool = True


def _rewrite_cpu_ops(mod, target: TargetProfile, ops: Sequence[str] = ("layer_norm", "softmax", "max_pool",
                                                                      "avg_pool", "mean")):
    """Each call of the `ops` (`_CPU_OPS`) with a static float32 shape that its kernel takes as `call_tir`
    of our kernel (a row op's on [rows, cols] views of its input and output).

    One pattern pass for all of them: a pass that rewrites anything costs BERT-base ~0.8 s however
    little it rewrites. A PrimFunc is added once per key (BERT-base's 25 layer norms are one function).
    A 2-D input is passed as it is: a reshape of a function's parameter to its own shape is a copy, not a view."""
    import operator

    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    rules = [_CPU_OPS[name](target) for name in ops]
    builder = relax.BlockBuilder(mod)
    added: dict[tuple, object] = {}

    def replace(orig, matched):
        rule = next(rule for rule in rules if rule.pattern in matched)
        call = matched[rule.pattern]  # `orig` may be the variable the call is bound to
        shape = _static_shape(call)
        if shape is None or len(shape) < 1 or call.ty.dtype != "float32":
            return orig
        rows, cols = math.prod(shape[:-1]), shape[-1]
        chosen = rule.kernel(call, shape, rows, cols, matched)
        if chosen is None:
            return orig
        key, make, name, inputs, extra = chosen
        if (name, key) not in added:
            # without its TVMScript name: two kernels of one op (two layer norm widths) would share it
            added[name, key] = builder.add_func(make(*key).without_attr("global_symbol"), name)
        if not rule.rows:
            return relax.call_tir(added[name, key], [*inputs, *extra], relax.TensorType(shape, "float32"))
        views = [x if len(shape) == 2 else relax.op.reshape(x, [rows, cols]) for x in inputs]
        out = relax.call_tir(added[name, key], [*views, *extra], relax.TensorType([rows, cols], "float32"))
        return out if len(shape) == 2 else relax.op.reshape(out, shape)

    func = rewrite_call(functools.reduce(operator.or_, (rule.pattern for rule in rules)), replace, mod["main"])
    out = builder.get()
    out["main"] = func
    return out


def _layer_norm_rows(target: TargetProfile) -> _KernelOp:
    """Every float32 layer norm over the last axis, with scale and shift, and every RMS norm over it, as
    `norm.layer_norm_primfunc` (vector accumulators; TVM's own sums each row as one scalar chain). A norm
    of an add of two tensors of its shape (a transformer's residual add) reads both in the kernel: one call
    and one pass over the rows fewer (the bundled encoder has four)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    from pruneaug.codegen import norm

    x, other, plain, gamma, beta = wildcard(), wildcard(), wildcard(), wildcard(), wildcard()
    added = is_op("relax.add")(x, other)
    layer_norm = is_op("relax.nn.layer_norm")(added | plain, gamma, beta)
    rms_norm = is_op("relax.nn.rms_norm")(added | plain, gamma)

    def kernel(call, shape, rows, cols, matched):
        attrs = call.attrs
        centred = layer_norm in matched
        if (centred and not (attrs.center and attrs.scale)
                or [int(a) % len(shape) for a in attrs.axes] != [len(shape) - 1]):
            return None
        key = (rows, cols, float(attrs.epsilon), _vector_lanes(target), worth_parallel(rows * cols, target.cores))
        shift = matched[beta] if centred else relax.const(np.zeros(cols, np.float32))
        scale_shift = [matched[gamma], shift]
        if added in matched and _static_shape(matched[x]) == shape == _static_shape(matched[other]):
            return (*key, True, centred), norm.layer_norm_primfunc, "layer_norm", [matched[x], matched[other]], \
                scale_shift
        source = matched[added] if added in matched else matched[plain]  # an add that broadcasts: TVM's, then ours
        return (*key, False, centred), norm.layer_norm_primfunc, "layer_norm", [source], scale_shift

    return _KernelOp(layer_norm | rms_norm, kernel)


def _softmax_rows(target: TargetProfile) -> _KernelOp:
    """Every float32 softmax over the last axis as `softmax.softmax_primfunc` (vector partial maxima and
    sums, a vectorised exp); others (another axis, a dynamic shape, float16) stay TVM's."""
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    pattern = is_op("relax.nn.softmax")(x)

    def kernel(call, shape, rows, cols, matched):
        if int(call.attrs.axis) % len(shape) != len(shape) - 1:
            return None
        parallel = worth_parallel(rows * cols * softmax.WORK_PER_ELEMENT, target.cores)
        return (rows, cols, _vector_lanes(target), parallel), softmax.softmax_primfunc, "softmax", [matched[x]], []

    return _KernelOp(pattern, kernel)


def _pool(kind: str, op: str) -> Callable[[TargetProfile], _KernelOp]:
    """Every float32 2-D NCHW pool of `kind` ("max" or "avg") as `pooling.pool2d_primfunc`; left to TVM: a
    dilated pool, a ceil-mode average, a pool with a window of padding alone or of more than `MAX_TAPS`
    taps, and a pool strided along rows whose interior (`PoolGeometry.interior`) is shorter than a vector."""
    def rule(target: TargetProfile) -> _KernelOp:
        from tvm.relax.dpl import is_op, wildcard

        x = wildcard()
        pattern = is_op(op)(x)

        def kernel(call, shape, rows, cols, matched):
            attrs = call.attrs
            x_shape = _static_shape(matched[x])
            if (x_shape is None or len(x_shape) != 4 or attrs.layout != "NCHW" or attrs.out_layout != "NCHW"
                    or any(int(d) != 1 for d in attrs.dilation) or (kind == "avg" and attrs.ceil_mode)):
                return None
            geo = pooling.PoolGeometry(tuple(x_shape), tuple(int(k) for k in attrs.pool_size),
                                    tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
                                    tuple(shape[2:]))
            first, end = geo.interior
            if (not geo.windows_overlap_input() or math.prod(geo.kernel_hw) > pooling.MAX_TAPS
                    or (geo.strides[1] > 1 and end - first < _vector_lanes(target))):
                return None  # see `pooling`: a strided row shorter than a vector ran faster in TVM's
            parallel = worth_parallel(math.prod(shape) * math.prod(geo.kernel_hw), target.cores)
            include_pad = kind == "avg" and bool(attrs.count_include_pad)
            key = (kind, geo, parallel, include_pad)
            return key, pooling.pool2d_primfunc, f"{kind}_pool2d", [matched[x]], []

        return _KernelOp(pattern, kernel, rows=False)

    return rule


def _trailing_mean(target: TargetProfile) -> _KernelOp:
    """Every float32 mean over trailing axes of at least a vector's length (a global average pool written as
    ReduceMean) as `row_mean.row_mean_primfunc`; others (a leading or middle axis, a short row) stay TVM's."""
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    pattern = is_op("relax.mean")(x)

    def kernel(call, shape, rows, cols, matched):
        x_shape = _static_shape(matched[x])
        if x_shape is None or call.attrs.axis is None:
            return None
        axes = sorted(int(a) % len(x_shape) for a in call.attrs.axis)
        kept = len(x_shape) - len(axes)
        if axes != list(range(kept, len(x_shape))) or math.prod(x_shape[kept:]) < _vector_lanes(target):
            return None
        parallel = worth_parallel(math.prod(x_shape), target.cores)
        key = (tuple(x_shape), tuple(shape), _vector_lanes(target), parallel)
        return key, row_mean.row_mean_primfunc, "row_mean", [matched[x]], []

    return _KernelOp(pattern, kernel, rows=False)


_CPU_OPS: dict[str, Callable[[TargetProfile], _KernelOp]] = {
    "layer_norm": _layer_norm_rows, "softmax": _softmax_rows,
    "max_pool": _pool("max", "relax.nn.max_pool2d"), "avg_pool": _pool("avg", "relax.nn.avg_pool2d"),
    "mean": _trailing_mean,
}


WIDEN_MAX_PIXELS = 1024  # output pixels a channel up to which `_widen_grouped_convs` widens a map (28x28, not 56x56)


def _widen_grouped_convs(mod, lanes: int):
    """Each stride-1 depthwise or grouped conv TVM schedules (`_LoopNestRule`) whose output rows or columns
    no register tile divides, as the conv of a wider output (more zero padding at the bottom and right, up
    to `_tile_factors`) sliced back, where that makes its rows whole vectors. Its loop nest cannot be
    padded as a matmul's is (its input index is a sum). `tools/bench_kernels.py --part depthwise`: 14x14
    maps took 1.5x the time narrow, 28x28 1.3x; widened, 7x7 maps (to half vectors on a 16-lane host)
    took 1.2x and a stride-2 conv 1.6x the time they take narrow, so they are not widened, nor maps of more
    than WIDEN_MAX_PIXELS: MobileNetV2's 144x56x56 conv widened to 64 columns took 1.2x the time narrow (its
    slice a pass over a map out of L1; AVX-512: 105.8 against 86.8 µs and 109.1 against 90.1 µs; on AVX2,
    eight lanes, 56 columns are whole vectors and 28x28 maps widened still ran 1.09-1.12x faster)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    pattern = is_op("relax.nn.conv2d")(wildcard(), wildcard())

    def widen(orig, matched):
        call = matched[pattern]
        attrs, shape = call.attrs, _static_shape(call)
        if (not _is_grouped_conv(call) or shape is None or len(shape) != 4
                or [int(v) for v in attrs.strides] != [1, 1]
                or (attrs.data_layout, attrs.out_layout) != ("NCHW", "NCHW")):
            return orig
        rows, cols = shape[2:]
        if rows * cols > WIDEN_MAX_PIXELS:
            return orig
        factors = _tile_factors(rows, cols, lanes)
        extra = [-(-extent // factor) * factor - extent for extent, factor in zip((rows, cols), factors)]
        if extra == [0, 0] or (cols + extra[1]) % lanes:
            return orig
        top, left, bottom, right = (int(v) for v in attrs.padding)
        wide = relax.op.nn.conv2d(call.args[0], call.args[1], attrs.strides,
                                  (top, left, bottom + extra[0], right + extra[1]),
                                  attrs.dilation, attrs.groups, attrs.data_layout, attrs.kernel_layout,
                                  attrs.out_layout, attrs.out_dtype)
        return relax.op.strided_slice(wide, axes=[2, 3], begin=[0, 0], end=[rows, cols])

    return _rewrite_main(mod, pattern, widen, _is_grouped_conv)


def _transposed_convs_as_convs(mod):
    """Each ConvTranspose (group 1, no dilation; 2-D, or 1-D as a 2-D one of one-row images) as one stride-1 conv
    that computes all its output phases at once (`_phase_weight`), then a depth-to-space of the phases (reshape,
    transpose, reshape) cropped to the output. Output row `o` is phase `(o + top) % s` at `(o + top) // s`, which
    sums input rows `q - j` times taps `j * s + phase`: a correlation of the input, padded `T - 1` before, with
    those taps flipped, `T = ceil(k / s)` of them. Where the stride divides the kernel no multiply is wasted
    (U-Net's 2x2 upsampling: a 1x1 conv); a 3x3 stride-2 kernel computes 16 taps for 9. The conv runs in our
    dense conv kernel, a bias after the ConvTranspose in its stores. TVM's own conv2d_transpose ran 3.5-11x
    slower than onnxruntime's, its conv1d_transpose (HiFi-GAN's 16-tap stride-8 upsampling) 5.5x
    (`tools/bench_kernels.py --part convtranspose`)."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    def as_conv(orig, matched, transposed, bias):
        call = matched[transposed]
        one_d = _op_name(call) == "relax.nn.conv1d_transpose"
        attrs, weight = call.attrs, call.args[1].value.numpy()
        x_shape, shape = _static_shape(call.args[0]), _static_shape(call)
        out_shape = shape
        layouts = ("NCW", "IOW", "NCW") if one_d else ("NCHW", "IOHW", "NCHW")
        if (x_shape is None or out_shape is None or weight.dtype != np.float32 or int(attrs.groups) != 1
                or any(int(v) != 1 for v in attrs.dilation)
                or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != layouts):
            return orig
        x, strides, padding = call.args[0], [int(v) for v in attrs.strides], [int(v) for v in attrs.padding]
        if one_d:  # [N, C, L] as [N, C, 1, L]
            x_shape, out_shape = [*x_shape[:2], 1, x_shape[2]], [*out_shape[:2], 1, out_shape[2]]
            weight = weight[:, :, None]
            x, strides, padding = relax.op.reshape(x, x_shape), [1, *strides], [0, padding[0]]
        c_out, (kh, kw), (sh, sw) = weight.shape[1], weight.shape[2:], strides
        n, _, h, w = x_shape
        top, left = padding[:2]
        taps_h, taps_w = -(-kh // sh), -(-kw // sw)
        rows = max(h, -(-(out_shape[2] + top) // sh))  # of each phase: enough for the output and the top crop
        cols = max(w, -(-(out_shape[3] + left) // sw))
        y = relax.op.nn.conv2d(x, relax.const(_phase_weight(weight, (sh, sw))),
                               padding=(taps_h - 1, taps_w - 1, rows - h, cols - w))
        if bias in matched:
            per_channel = _channel_bias(matched[bias].value.numpy(), c_out, spatial=1 if one_d else 2)
            if per_channel is None:
                return orig
            y = relax.op.add(y, relax.const(np.repeat(per_channel, sh * sw).reshape(1, -1, 1, 1)))
        y = relax.op.permute_dims(relax.op.reshape(y, [n, c_out, sh, sw, rows, cols]), [0, 1, 4, 2, 5, 3])
        y = relax.op.reshape(y, [n, c_out, rows * sh, cols * sw])
        if (top, left, rows * sh, cols * sw) != (0, 0, *out_shape[2:]):
            y = relax.op.strided_slice(y, axes=[2, 3], begin=[top, left], end=[top + out_shape[2], left + out_shape[3]])
        return relax.op.reshape(y, shape) if one_d else y

    for op in ("relax.nn.conv2d_transpose", "relax.nn.conv1d_transpose"):
        transposed, bias = is_op(op)(wildcard(), is_const()), is_const()
        # with its bias first: the plain pattern would take the ConvTranspose and leave the bias after it
        for pattern in (is_op("relax.add")(transposed, bias), transposed):
            mod = _rewrite_main(mod, pattern, functools.partial(as_conv, transposed=transposed, bias=bias),
                                lambda expr, op=op: _op_name(expr) == op)
    return mod


def _phase_weight(weight: np.ndarray, strides: tuple[int, int]) -> np.ndarray:
    """A ConvTranspose's weight `[Cin, Cout, kh, kw]` as the stride-1 conv weight `[Cout * sh * sw, Cin, Th, Tw]`
    of its output phases (`_transposed_convs_as_convs`): channel `(co, rh, rw)` holds taps `(t * sh + rh, u * sw
    + rw)`, flipped (`Th - 1 - t`, `Tw - 1 - u`), zero past the kernel."""
    c_in, c_out, kh, kw = weight.shape
    sh, sw = strides
    taps_h, taps_w = -(-kh // sh), -(-kw // sw)
    padded = np.zeros((c_in, c_out, taps_h * sh, taps_w * sw), np.float32)
    padded[:, :, :kh, :kw] = weight
    phases = padded.reshape(c_in, c_out, taps_h, sh, taps_w, sw)[:, :, ::-1, :, ::-1, :]
    return np.ascontiguousarray(phases.transpose(1, 3, 5, 0, 2, 4).reshape(c_out * sh * sw, c_in, taps_h, taps_w))


def _norms_from_parts(mod):
    """Each layer norm and RMS norm exported as its parts, over the last axis, as one `layer_norm` or
    `rms_norm`, which `_rewrite_cpu_ops` then runs in our row kernel. A layer norm: torch below opset 17
    exports ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, then Mul by the weight and Add the bias
    where it has them; an RMS norm (T5's, LLaMA's: no RMSNormalization op before opset 23): Pow 2, ReduceMean,
    Add eps, Sqrt, then Div, or Reciprocal and Mul, then Mul by the weight. A square may be a Mul of x by x.
    TVM ran the parts as several passes over X: a model of one [128, 768] layer norm in parts ran 162 µs
    against 84 µs for the op (onnxruntime fuses the parts too)."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, eps, gamma, beta = wildcard(), is_const(), is_const(), is_const()
    fixed = {is_const(): 2.0, is_const(): 2.0, is_const(): 1.0}  # the constants of the parts: two exponents, a 1 / x
    two_centred, two, one = fixed
    mean = is_op("relax.mean")(x)
    centred = is_op("relax.subtract")(x, mean)
    variance = is_op("relax.mean")(is_op("relax.power")(centred, two_centred)
                                   | is_op("relax.multiply")(centred, centred))
    mean_square = is_op("relax.mean")(is_op("relax.power")(x, two) | is_op("relax.multiply")(x, x))
    root = is_op("relax.sqrt")(is_op("relax.add")(variance | mean_square, eps))
    inverse = is_op("relax.divide")(one, root)
    numerator = centred | x
    normalised = (is_op("relax.divide")(numerator, root) | is_op("relax.multiply")(numerator, inverse)
                  | is_op("relax.multiply")(inverse, numerator))
    scaled = is_op("relax.multiply")(normalised, gamma) | is_op("relax.multiply")(gamma, normalised)
    pattern = is_op("relax.add")(scaled, beta) | scaled | normalised

    def fused(orig, matched):
        call = matched[pattern]
        shape = _static_shape(call)
        if (shape is None or call.ty.dtype != "float32" or (centred in matched) != (variance in matched)
                or any([int(a) % len(shape) for a in matched[m].attrs.axis] != [len(shape) - 1]
                       or not matched[m].attrs.keepdims for m in (mean, variance, mean_square) if m in matched)
                or any(_scalar(matched[c]) != value for c, value in fixed.items() if c in matched)
                or _scalar(matched[eps]) is None
                or any(list(matched[v].value.numpy().shape) != shape[-1:] for v in (gamma, beta) if v in matched)):
            return orig
        cols, epsilon = shape[-1], _scalar(matched[eps])
        scale = matched[gamma] if gamma in matched else relax.const(np.ones(cols, np.float32))
        if variance in matched:
            shift = matched[beta] if beta in matched else relax.const(np.zeros(cols, np.float32))
            return relax.op.nn.layer_norm(matched[x], scale, shift, axes=[-1], epsilon=epsilon)
        if beta in matched:
            return orig  # an RMS norm with a shift: left as parts
        return relax.op.nn.rms_norm(matched[x], scale, axes=[-1], epsilon=epsilon)

    return _rewrite_main(mod, pattern, fused, lambda value: _op_name(value) == "relax.sqrt")


# terms of log(1 + t) = 2 atanh(u) = 2u (1 + u^2/3 + u^4/5 + ...), u = t / (2 + t) <= 1/3 for t in [0, 1]: seven keep
# the series' own error at 1.5e-8 relative, below float32's rounding (2.3e-7 in all, against float64's log1p)
LOG1P_TERMS = 7

# constant exponents whose power TVM lowers to libm's powf per element, 50x the time of the products over 128x3072
# (`tools/bench_kernels.py --part elementwise`; GPT-2's tanh GELU cubes); TVM's own lowering already makes a
# square a product and a power of 0.5 a square root
POWERS = (3, 4)


def _vectorisable_math(mod):
    """Ops that TVM lowers to a libm call per element (a scalar call in every vector loop), as ops that LLVM
    vectorises: each float32 sigmoid as 1 / (1 + exp(-x)), whose exp `FastMathTransform` makes TVM's
    fast_exp (15% of an unrolled LSTM's time, `codegen/recurrent.py`, and every SiLU's in a CNN); each
    power with a constant exponent of `POWERS` as products (`tools/bench_kernels.py --part elementwise`);
    and each log(1 + exp(y)), the softplus of TVM's Softplus and Mish (YOLOv4's activation), by
    `_softplus`, whose only transcendental is an exp."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    sigmoid = is_op("relax.sigmoid")(wildcard())
    power = is_op("relax.power")(wildcard(), is_const())
    unit, exp_y = is_const(), is_op("relax.exp")(wildcard())
    softplus = is_op("relax.log")(is_op("relax.add")(unit, exp_y) | is_op("relax.add")(exp_y, unit))

    def vectorisable(orig, matched):
        call = next(matched[p] for p in (sigmoid, power, softplus) if p in matched)
        if call.ty.dtype != "float32":
            return orig
        x = call.args[0]
        if sigmoid in matched:
            return relax.op.divide(_float32(1.0), relax.op.add(_float32(1.0), relax.op.exp(relax.op.negative(x))))
        if softplus in matched:
            if _scalar(matched[unit]) != 1.0 or _static_shape(call) != _static_shape(matched[exp_y]):
                return orig
            return _softplus(matched[exp_y].args[0])
        exponent = _scalar(call.args[1])
        if exponent not in POWERS or _static_shape(call) != _static_shape(x):
            return orig  # (a [1, 1] exponent would broadcast a vector x to a matrix)
        product = x
        for _ in range(int(exponent) - 1):
            product = relax.op.multiply(product, x)
        return product

    ops = ("relax.sigmoid", "relax.power", "relax.log")
    return _rewrite_main(mod, sigmoid | power | softplus, vectorisable, lambda value: _op_name(value) in ops)


def _softplus(y):
    """log(1 + exp(y)) as max(y, 0) + log1p(exp(-|y|)), stable for any y, with log1p over [0, 1] by its
    atanh series (`LOG1P_TERMS`): no log, which TVM lowers to libm's logf per element."""
    from tvm.relax import op

    t = op.exp(op.negative(op.abs(y)))
    u = op.divide(t, op.add(_float32(2.0), t))
    w = op.multiply(u, u)
    series = _float32(1.0 / (2 * LOG1P_TERMS - 1))
    for k in reversed(range(LOG1P_TERMS - 1)):
        series = op.add(op.multiply(series, w), _float32(1.0 / (2 * k + 1)))
    return op.add(op.maximum(y, _float32(0.0)), op.multiply(op.multiply(_float32(2.0), u), series))


def _prim_value(value) -> float | None:
    """A Relax op's scalar attribute argument (clip's bounds: a PrimValue, or the IntImm or FloatImm it
    holds) as a float; None if it is not a constant."""
    value = getattr(value, "value", value)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None


def _scalar(constant) -> float | None:
    """A Relax constant's one value, or None where it holds more than one."""
    value = constant.value.numpy()
    return float(value.item()) if value.size == 1 else None


def _float32(value: float):
    """A scalar constant for the float32 rewrites: an op of a float32 tensor and a constant of another dtype
    does not type-check."""
    from tvm import relax

    return relax.const(value, "float32")


def _rewrite_main(mod, pattern, rewrite: Callable, may_match: Callable[[object], bool]):
    """`mod` with `rewrite` applied to `main`'s matches of `pattern`, only where some binding of `main` passes
    `may_match`: a pattern pass costs BERT-base ~0.8 s however little it rewrites (`_rewrite_cpu_ops`)."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    if not any(may_match(binding.value) for block in mod["main"].body.blocks for binding in block.bindings):
        return mod
    out = relax.BlockBuilder(mod).get()
    out["main"] = rewrite_call(pattern, rewrite, mod["main"])
    return out


def _op_name(expr) -> str | None:
    """The name of the op a Relax call calls (None for anything else)."""
    return getattr(getattr(expr, "op", None), "name", None)


def _is_grouped_conv(expr) -> bool:
    return _op_name(expr) == "relax.nn.conv2d" and int(expr.attrs.groups) > 1


def _conv_input_shape(call, found: _Match, layouts: tuple[str, str, str]) -> list[int] | None:
    """The conv's static input shape where it has our kernels' (data, kernel, out) `layouts` and a weight of
    their rank; else None (the conv stays TVM's)."""
    attrs = call.attrs
    x_shape = _static_shape(found.x)
    if x_shape is None or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != layouts:
        return None
    return x_shape if found.weight.ndim == len(layouts[1]) else None


def _static_shape(expr) -> list[int] | None:
    """The expression's shape if fully static, else None."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except TypeError:
        return None


def _vector_bias(bias: np.ndarray | None, out_dim: int, ndim: int) -> np.ndarray | None:
    """A bias broadcasting along the last axis only ([N], [1, N], ...) as a vector [N]; else None."""
    if bias is None or bias.ndim > ndim or bias.shape[-1:] != (out_dim,) or bias.size != out_dim:
        return None
    return np.ascontiguousarray(bias.reshape(out_dim), np.float32)


def _channel_bias(bias: np.ndarray | None, c_out: int, spatial: int = 2) -> np.ndarray | None:
    """A per-output-channel bias of a conv with `spatial` axes ([1, C, 1, 1] or [C, 1, 1] for 2-D,
    [1, C, 1] for 1-D) as a vector [C]; else None."""
    channel_axes = (c_out, *(1,) * spatial)
    if (bias is None or bias.size != c_out or bias.ndim < len(channel_axes)
            or bias.shape[-len(channel_axes):] != channel_axes):
        return None
    return np.ascontiguousarray(bias.reshape(c_out), np.float32)


# ---------------------------------------------------------------------------------------------------------
# Compile pipeline and schedules for what is not ours


def _pipeline(target: TargetProfile):
    """TVM's Relax pipeline for the target; on CPUs with schedules applied to every PrimFunc after fusion.

    TVM's CUDA pipeline already schedules with DLight's GPU rules (`_cuda_pipeline` puts one rule
    before them); its CPU pipeline schedules nothing.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight

    if target.kind == "cuda":
        return _cuda_pipeline(target)
    tvm_target = target.tvm()
    rules = [
        dlight.cpu.GEMV(),
        _LoopNestRule(target),
        _LargeReductionRule(target, dlight.cpu.Reduction()),
        _InjectiveRule(target),
        _ParallelFallback(target),
    ]

    @tvm.transform.module_pass(opt_level=0, name="PruneaugCPUPipeline")
    def _run(mod, _ctx):
        with tvm_target:
            passes = (
                cpu.library_dispatch_passes(tvm_target)
                + [relax.transform.FastMathTransform()]  # vectorisable exp/erf/tanh: libm's are scalar calls
                + cpu.legalize_passes(tvm_target)
                + [dlight.ApplyDefaultSchedule(*rules)]
                + cpu.dataflow_lower_passes(tvm_target)
                + _with_workspace_lifted(cpu.finalize_passes(tvm_target))
            )
            return tvm.transform.Sequential(passes)(mod)

    return _run


SERIAL_REDUCTION_MAX = 32  # CUDA: reductions up to this length per output run serially in one thread


def _cuda_pipeline(target: TargetProfile):
    """TVM's CUDA pipeline with `_SmallReductionRule` scheduling before its DLight rules, which skip
    what is scheduled already. The last of TVM's legalize passes is its DLight schedule."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight

    tvm_target = target.tvm()

    @tvm.transform.module_pass(opt_level=0, name="PruneaugCUDAPipeline")
    def _run(mod, _ctx):
        with tvm_target:
            legalize = cuda.legalize_passes(tvm_target)
            passes = (
                cuda.library_dispatch_passes(tvm_target)
                + legalize[:-1]
                + [dlight.ApplyDefaultSchedule(_SmallReductionRule(dlight.gpu.Fallback())), legalize[-1]]
                + cuda.dataflow_lower_passes(tvm_target)
                + cuda.finalize_passes(tvm_target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _run


class _SmallReductionRule:
    """DLight's GPU Fallback (one thread per output, its reduction serial) for functions with one
    reduction, at most `SERIAL_REDUCTION_MAX` long. DLight's reduction rules give each output a
    thread block that splits its reduction across 256 threads: a 3x3 depthwise conv then ran 9 of
    each block's 256 threads (the CNN's 64-channel 8x8 one at batch 32: 113 µs on an H100). Chained
    reductions (softmax, layer norm) stay DLight's: Fallback would launch a kernel per reduction."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = _blocks(sch, inline=False) or []
        lengths = [_reduction_length(sch.get(info.block_rv)) for info in infos if "R" in info.dom_kind()]
        if len(lengths) != 1 or lengths[0] > SERIAL_REDUCTION_MAX:
            return None
        return self.rule.apply(func, target, tunable)


def _reduction_length(block) -> int:
    """How many terms each output of `block` adds up: the product of its reduction axes' extents."""
    from tvm import tirx

    return math.prod(int(v.dom.extent) for v in block.iter_vars if v.iter_type == tirx.IterVar.CommReduce)


def _with_workspace_lifted(finalize: list) -> list:
    """TVM's finalisation passes with `workspace.lift_workspace_pass` right after the memory planner."""
    planner = next(i for i, p in enumerate(finalize) if p.info.name == "StaticPlanBlockMemory")
    return [*finalize[:planner + 1], lift_workspace_pass(), *finalize[planner + 1:]]


def _pass_context(target: TargetProfile) -> contextlib.AbstractContextManager:
    """On CUDA, TVM's pipeline captures the kernels between the first (reading the inputs) and the last
    (writing the output) into a CUDA graph, replayed on every later run: at batch 1 a model of small
    kernels is bound by their launches (the bundled encoder on an H100: 181 -> 126 us, at batch 8
    215 -> 149 us). The kernels that read the caller's tensors stay outside the graph, so a run with
    other input tensors is still correct."""
    if target.kind != "cuda":
        return contextlib.nullcontext()
    import tvm

    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=current.opt_level,
                                     config={**current.config, "relax.backend.use_cuda_graph": True})


def _exec_mode(target: TargetProfile) -> str:
    """How the model's Relax function runs: on CPUs lowered to native code ("compiled"), where TVM's VM
    otherwise interprets ~30 bytecode instructions per run around a small model's few microseconds of
    kernels; on CUDA as bytecode, the form the runtime-only TVM that ships CUDA artifacts was tried with."""
    return "bytecode" if target.kind == "cuda" else "compiled"


def _vector_lanes(target: TargetProfile) -> int:
    """float32 lanes of one SIMD register."""
    return max(target.simd_bytes // 4, 4)


def _iterations(sch, block) -> int:
    """How many times `block` runs: the product of its loops' extents."""
    return math.prod(int(sch.get(loop).extent) for loop in sch.get_loops(block))


def _parallel_outer(sch, block, loops, cores: int):
    """Fuse leading loops of `block` until there is enough parallel work for the cores; parallelise the
    fused loop where the block's iterations (the product of its loops' extents) are worth a fork and
    join of the thread pool (`threads.worth_parallel`)."""
    work = _iterations(sch, block)
    fused_extent, count = 1, 0
    for loop in loops:
        count += 1
        fused_extent *= int(sch.get(loop).extent)
        if fused_extent >= 4 * cores:
            break
    outer = sch.fuse(*loops[:count]) if count > 1 else loops[0]
    if worth_parallel(work, cores):
        sch.parallel(outer)
    return outer


class _CPURule:
    """A DLight-style schedule rule: `schedule(sch)` says whether it applies; one that does not fit (a
    ScheduleError half-way) leaves the function to the next rule instead of failing the compile."""

    def __init__(self, target: TargetProfile):
        self.lanes = _vector_lanes(target)
        self.cores = target.cores

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        try:
            return sch if self.schedule(sch) else None
        except s_tir.ScheduleError:
            return None

    def schedule(self, sch) -> bool:
        raise NotImplementedError


def _blocks(sch, inline: bool = True):
    """The function's blocks (DLight's analysis), with injective ones inlined where they can be."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial

    infos = normalize_prim_func(sch)
    return try_inline_contiguous_spatial(sch, infos) if inline and infos else infos


PAD_CHUNK_BYTES = 4096  # a padded copy at least this large per chunk (`_pad_chunks`): about the store buffer's size
TILE_VECTORS = 8  # vector accumulators of one register tile: half of AVX2's 16 registers, a quarter of AVX-512's


class _LoopNestRule(_CPURule):
    """One reduction over two operands (a matmul between activations, a depthwise or grouped conv), plus
    injective epilogues.

    Schedule: the last two spatial axes tiled into a register tile (rows unrolled, columns vectorised)
    with an accumulator of the tile's size; reductions inside the tile loop; the outer spatial axes
    parallel; producers inlined, except padding, which is materialised per parallel chunk; the epilogue
    (bias, relu) applied where the accumulator is written back, else per parallel chunk. The tile is as
    many rows (up to 8) as keep it within TILE_VECTORS registers: the CNN's 64x8x8 depthwise conv took
    2.2 µs in 8x8 tiles, 2.4 µs in 4x8 and 3.4 µs in 4x4 (half-register vectors on a 16-lane host).
    """

    def schedule(self, sch, padded: bool = False) -> bool:
        from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial

        infos = _blocks(sch, inline=False)
        if not infos:
            return False
        padding = [info for info in infos if info.is_injective() and _has_if_then_else(sch.get(info.block_rv))]
        infos = try_inline_contiguous_spatial(sch, [info for info in infos if info not in padding])
        reductions = [i for i, info in enumerate(infos) if not info.is_injective()]
        if len(reductions) != 1 or any(not info.is_injective() for info in infos[reductions[0] + 1 :]):
            return False
        main = infos[reductions[0]]
        kinds = main.dom_kind()
        n_spatial = len(kinds) - len(kinds.lstrip("S"))
        if n_spatial < 2 or set(kinds[n_spatial:]) != {"R"}:
            return False
        if len({region.source for region in sch.get(main.block_rv).reads}) < 2:
            return False  # a plain reduction (layer norm, pooling): DLight's Reduction rule takes it
        loops = sch.get_loops(main.block_rv)[-len(kinds) :]
        factors = _tile_padding([int(sch.get(loop).extent) for loop in loops], n_spatial, self.lanes)
        if factors is not None and not padded and _try(sch.pad_einsum, main.block_rv, factors):
            return self.schedule(sch, padded=True)
        spatial, reduce_loops = loops[:n_spatial], loops[n_spatial:]
        rows, cols = spatial[-2], spatial[-1]
        col_tile = _column_tile(int(sch.get(cols).extent), self.lanes)
        row_tile = largest_divisor(int(sch.get(rows).extent), _tile_heights(col_tile, self.lanes))
        row_out, row_in = sch.split(rows, [None, row_tile])
        col_out, col_in = sch.split(cols, [None, col_tile])
        sch.reorder(*spatial[:-2], row_out, col_out, *reduce_loops, row_in, col_in)
        # "global" scope: TVM 0.27 makes a small one a stack array; a "local" one a heap workspace.
        accumulator = sch.cache_write(main.block_rv, 0, "global")
        # The epilogue (bias, relu) applied as the tile leaves its accumulator, not in a pass of its own; but
        # not one that writes less than its producer (a slice, the copy out of a padded result): TVM 0.27
        # inlines that without its bounds, and the tile wrote past the output.
        shapes = [_written_shape(sch, info.block_rv) for info in infos[reductions[0] :]]
        epilogues = [info.block_rv for info, shape, produced in zip(infos[reductions[0] + 1 :], shapes[1:], shapes)
                     if shape != produced or not _try(sch.reverse_compute_inline, info.block_rv)]
        sch.reverse_compute_at(accumulator, col_out, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(accumulator)[-1])
        sch.unroll(row_in)
        sch.vectorize(col_in)
        outer = _parallel_outer(sch, main.block_rv, [*spatial[:-2], row_out], self.cores)
        for producer in infos[: reductions[0]]:
            sch.compute_at(producer.block_rv, outer, preserve_unit_loops=True)
            _vectorize_innermost(sch, sch.get_loops(producer.block_rv)[-1], self.lanes)
        pad_loop, outer = _pad_chunks(sch, outer, padding, main.block_rv, n_spatial, self.cores)
        for pad in padding:
            # Materialised, not inlined (inlined, every load would test the bounds); per parallel chunk
            # where the chunk's window is a box, so that it stays in cache; else once, whole.
            if _try(sch.compute_at, pad.block_rv, pad_loop, preserve_unit_loops=True):
                _fill_then_copy(sch, pad.block_rv, pad_loop, self.lanes)
            else:
                _schedule_injective(sch, pad.block_rv, self.lanes, self.cores)
        for epilogue in epilogues:
            sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
            _vectorize_innermost(sch, sch.get_loops(epilogue)[-1], self.lanes)
        sch.decompose_reduction(main.block_rv, reduce_loops[0])
        return True


def _pad_chunks(sch, outer, padding, main, n_spatial: int, cores: int):
    """(pad loop, outer loop): `outer` split so that each padded copy, made once per iteration of the pad
    loop, is at least PAD_CHUNK_BYTES (`outer` itself where one iteration's already is, or where the loop
    nest `main` reads a copy along its columns at a stride). A small copy read right after it is written
    waits on its own stores (they have not left the store buffer: a load over two of them cannot be
    forwarded): the CNN's 64x8x8 depthwise conv, padded per channel, spent a quarter of its time on one
    such load; 16 channels at a time it ran 1.27x faster, MobileNetV2's 576x14x14 1.20x, a 96x4x4 one 1.95x
    (PAD_CHUNK_BYTES against 0, side by side in one process; attention's padded matmuls alike). A stride-2
    depthwise conv, whose reads are gathers, ran up to 2.7x slower so."""
    from tvm import tirx

    if not padding or not all(_read_at_unit_stride(sch, main, pad.block_rv, n_spatial) for pad in padding):
        return outer, outer
    extent = int(sch.get(outer).extent)
    padded = max(_written_bytes(sch, pad.block_rv) for pad in padding) // extent
    parallel = sch.get(outer).kind == tirx.ForKind.PARALLEL
    most = extent // cores if parallel else extent  # chunks enough for every core
    chunk = next((d for d in range(1, most + 1) if extent % d == 0 and d * padded >= PAD_CHUNK_BYTES), None)
    if chunk is None or chunk == 1:
        return outer, outer
    pad_loop, inner = sch.split(outer, [None, chunk])
    if parallel:
        sch.parallel(pad_loop)
    return pad_loop, inner


def _read_at_unit_stride(sch, main, producer, n_spatial: int) -> bool:
    """Whether block `main` reads what `producer` writes at consecutive columns for consecutive output
    columns (its last spatial iterator's coefficient in the last index is 1)."""
    from tvm.sym import detect_linear_equation

    block = sch.get(main)
    written = sch.get(producer).writes[0].source
    column = block.iter_vars[n_spatial - 1].var
    for read in block.reads:
        if read.source.same_as(written):
            coefficients = detect_linear_equation(read.region[-1].min, [column])
            return len(coefficients) == 2 and int(coefficients[0]) == 1
    return False


def _written_shape(sch, block) -> list[int]:
    """The shape of the buffer `block` writes."""
    return [int(d) for d in sch.get(block).writes[0].source.shape]


def _written_bytes(sch, block) -> int:
    """The size of the buffer `block` writes."""
    import tvm

    return math.prod(_written_shape(sch, block)) * tvm.DataType(sch.get(block).writes[0].source.dtype).bits // 8


def _tile_padding(extents: list[int], n_spatial: int, lanes: int) -> list[int] | None:
    """`pad_einsum`'s factors (one per block iter) that round the last two spatial axes of a loop nest up to
    its register tile (`_tile_factors`), or None where none is needed. Only an einsum-shaped block can be
    padded so (a matmul between activations; not a conv, whose input index is a sum): the zero rows and
    columns cost a copy of each operand and of the result."""
    row_factor, col_factor = _tile_factors(extents[n_spatial - 2], extents[n_spatial - 1], lanes)
    if row_factor == col_factor == 1:
        return None
    factors = [1] * len(extents)
    factors[n_spatial - 2], factors[n_spatial - 1] = row_factor, col_factor
    return factors


def _tile_factors(rows: int, cols: int, lanes: int) -> tuple[int, int]:
    """What the rows and columns of a loop nest's output are best rounded up to a multiple of (1: left as
    they are): columns to whole vectors, rows to the register tile's height (`_LoopNestRule`), wherever
    that takes fewer tiles than the largest tile dividing them. A 197-token attention's 197 columns ran
    one lane at a time, 20x slower than onnxruntime; 50 and 100 tokens in 2- and 4-lane vectors, 5x and
    2x slower."""
    col_factor = _fewer_tiles_factor(cols, min(lanes, 1 << max(cols - 1, 1).bit_length()), _vector_widths(lanes))
    heights = _tile_heights(_column_tile(-(-cols // col_factor) * col_factor, lanes), lanes)
    return _fewer_tiles_factor(rows, heights[0], heights), col_factor


def _column_tile(cols: int, lanes: int) -> int:
    """The register tile's width along a loop nest's columns: up to two vectors, the widest that divides them."""
    return largest_divisor(cols, (2 * lanes, *_vector_widths(lanes)))


def _tile_heights(col_tile: int, lanes: int) -> list[int]:
    """The register tile's heights, tallest first, that keep a tile `col_tile` wide within TILE_VECTORS."""
    return [t for t in (8, 4, 2) if t * -(-col_tile // lanes) <= TILE_VECTORS]


def _fewer_tiles_factor(extent: int, tile: int, dividing: Sequence[int]) -> int:
    """`tile` if rounding `extent` up to its multiple takes fewer tiles than the largest of `dividing` that
    divides it, else 1."""
    return tile if -(-extent // tile) < extent // largest_divisor(extent, dividing) else 1


def _fill_then_copy(sch, pad, outer, lanes: int) -> None:
    """Write a padding block as zeros over its whole window, then the interior as a plain copy, both
    vectorised: one select per element, at the 2 lanes that divide a padded row, cost the CNN's 64x8x8
    depthwise conv 2 of its 3.3 µs (`decompose_padding`)."""
    loops = sch.get_loops(pad)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(outer)))
    own = loops[depth + 1 :]
    if own and sch.can_decompose_padding(pad, own[0]):
        fill = sch.decompose_padding(pad, own[0])
        _vectorize_innermost(sch, sch.fuse(*sch.get_loops(fill)[depth + 1 :]), lanes)
    _vectorize_innermost(sch, sch.get_loops(pad)[-1], lanes)


def _try(primitive, *args, **kwargs) -> bool:
    """Apply a schedule primitive if it fits; whether it did (a failed primitive leaves the schedule as it was)."""
    from tvm import s_tir

    try:
        primitive(*args, **kwargs)
    except s_tir.ScheduleError:
        return False
    return True


class _InjectiveRule(_CPURule):
    """Elementwise, transpose and reshape functions: one parallel outer loop, the innermost axis vectorised."""

    def schedule(self, sch) -> bool:
        infos = _blocks(sch)
        if not infos or any(not info.is_injective() for info in infos):
            return False
        for info in infos:
            _schedule_injective(sch, info.block_rv, self.lanes, self.cores)
        return True


class _LargeReductionRule:
    """DLight's CPU Reduction rule (`rule`), for reductions whose work pays for a fork and join of the
    thread pool (`threads.worth_parallel`): it runs every one in parallel. A smaller one is left to
    `_ParallelFallback`, which runs it serially: the bundled encoder's mean over 16 tokens of 128
    features took 2.4 µs on the pool, 0.06 µs alone."""

    def __init__(self, target: TargetProfile, rule):
        self.rule = rule
        self.cores = target.cores

    def apply(self, func, target, tunable):
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = _blocks(sch, inline=False) or []
        work = max((_iterations(sch, info.block_rv) for info in infos), default=0)
        return self.rule.apply(func, target, tunable) if worth_parallel(work, self.cores) else None


class _ParallelFallback(_CPURule):
    """Anything else (pooling, reductions DLight declines): each block's leading spatial loops in parallel."""

    def schedule(self, sch) -> bool:
        infos = _blocks(sch)
        if not infos:
            return False
        for info in infos:
            kinds = info.dom_kind()
            n_spatial = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(info.block_rv)
            if n_spatial and len(loops) == len(kinds):
                _parallel_outer(sch, info.block_rv, loops[:n_spatial], self.cores)
        return True


def _schedule_injective(sch, block, lanes: int, cores: int) -> None:
    """Vectorise a spatial block's innermost loop and run the loops above it in parallel. Where no whole
    vector divides the innermost loop (a 7x7 or 14x14 feature map's rows), it is first fused with the
    loops above it, up to the first product a whole vector divides: a ReLU over 960x7x7 ran one lane at a
    time."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [int(sch.get(loop).extent) for loop in loops]
    count = next((n for n in range(1, len(loops) + 1) if math.prod(extents[-n:]) % lanes == 0), 1)
    if count > 1:
        loops = [*loops[:-count], sch.fuse(*loops[-count:])]
    vector = _vectorize_innermost(sch, loops[-1], lanes)
    outer = sch.get_loops(block)
    outer = outer[:-1] if vector is not None else outer
    if outer:
        _parallel_outer(sch, block, outer, cores)


def _has_if_then_else(block) -> bool:
    """Whether a block selects with if_then_else (padding does): such a block is not worth inlining.

    Read off the block's printed TIR: TVM 0.27's Python API exposes no TIR expression visitor."""
    return "if_then_else" in str(block)


def _vector_widths(lanes: int) -> tuple[int, ...]:
    """Vector widths from a full register down to 2 lanes, halving: an 8-wide row on a 16-lane machine
    takes half a register, not a quarter."""
    return tuple(lanes >> shift for shift in range(lanes.bit_length() - 1) if lanes >> shift >= 2)


def _vectorize_innermost(sch, loop, lanes: int):
    """Vectorise `loop` by the largest lane count dividing its extent; return the vector loop (None if none)."""
    extent = int(sch.get(loop).extent)
    width = largest_divisor(extent, _vector_widths(lanes))
    if width == 1:
        return None
    if width == extent:
        sch.vectorize(loop)
        return loop
    _, inner = sch.split(loop, [None, width])
    sch.vectorize(inner)
    return inner

"""Shape computations folded to constants for the static shapes a model is compiled for, before TVM imports it
and before the IR reads its layers' sizes (`inferred_shapes`).

Why: torch exports sizes it computed from `x.size()` as those computations: ShuffleNetV2's
`x.chunk(2, dim=1)` is two Slices whose bounds come from Shape, Gather, Add, Div and Mul. TVM's ONNX
frontend kept such a Slice's result symbolic, and the next conv then failed to lower ("emit_te now only
supports Tensor that has ShapeExpr shape"): torchvision's ShuffleNetV2 compiled to no artifact. With
every input's shape fixed, those values are constants: each node whose inputs are all known small
constants, or whose input's shape is all it reads (Shape, Size), is evaluated here (onnx's reference
evaluator) and its outputs that other nodes read become initializers. Only small tensors
(`MAX_FOLDED_ELEMENTS`: shapes, indices, scalars) are folded; nothing a weight flows through is.

    >>> folded(model, {"input": [1, 3, 224, 224]})     # ShuffleNetV2's Slices now read constant bounds

Folding repeats while it finds more: Swin-T pads its maps to whole windows by pads computed from a Shape
(Mod, Sub) and takes the Shape of the padded map, which is static only once the pads are constants.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pruneaug.ir.shapes import static_shapes

MAX_FOLDED_ELEMENTS = 64  # the most elements a folded tensor holds: a shape or an index list, not a weight
# ops evaluated where their inputs are known: the arithmetic torch's exporter writes around x.size()
FOLDED_OPS = frozenset({
    "Constant", "Identity", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape", "Transpose",
    "Tile", "Add", "Sub", "Mul", "Div", "Mod", "Pow", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Neg", "Abs",
    "Sign", "Min", "Max", "Clip", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or",
    "Where", "Range", "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax", "ConstantOfShape", "Expand",
})


def folded(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """`model` with its main graph's shape computations replaced by initializers of their values at
    `input_shapes` (every graph input's shape); `model` itself where there is nothing to fold. Folded again
    while a pass folds something: a Pad whose pads came from a Shape has a static output only once they are
    constants, and Swin-T's windows take the Shape of such a Pad."""
    while any(node.op_type in ("Shape", "Size") for node in model.graph.node):
        folded_once = _folded_once(model, input_shapes)
        if folded_once is model:
            break
        model = folded_once
    return model


def inferred_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Every tensor's static shape at `input_shapes`, with the shape computations folded first (`folded`): in
    Swin-T the attention's rows are a Reshape by a size computed from a Shape, which inference alone leaves
    unknown. The IR's layer sizes (`m`) and the recurrent nodes' unrolling (`codegen.recurrent`) read them."""
    return static_shapes(folded(model, input_shapes), input_shapes)


def _folded_once(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """One pass of `folded` over the nodes in order, with the shapes inferred before it."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}  # inference leaves constants out
    shapes.update(static_shapes(model, input_shapes))
    known = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
             if int(np.prod(init.dims)) <= MAX_FOLDED_ELEMENTS}
    kept, computed = [], {}
    for node in model.graph.node:
        values = _values(node, known, shapes, model.opset_import)
        if values is None:
            kept.append(node)
            continue
        computed.update(zip(node.output, values))
        known.update(zip(node.output, values))
    if not computed:
        return model
    read = {name for node in kept for name in _inputs(node)} | {output.name for output in model.graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in computed.items()
                                 if name in read)
    return out


def _values(node: onnx.NodeProto, known: Mapping[str, np.ndarray], shapes: Mapping[str, list[int]],
            opsets: Sequence[onnx.OperatorSetIdProto]) -> list[np.ndarray] | None:
    """The node's outputs where it can be folded (small, computed from known values or static shapes), evaluated
    at the model's opsets (Squeeze's axes, for one, moved from an attribute to an input in opset 13)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), np.int64)]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return [np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)]
    inputs = [name for name in node.input if name]
    if node.op_type not in FOLDED_OPS or not all(name in known for name in inputs):
        return None
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
                                                   for name in node.output if name],
                              [numpy_helper.from_array(np.asarray(known[name]), name) for name in set(inputs)])
    values = ReferenceEvaluator(helper.make_model(graph, opset_imports=opsets)).run(None, {})
    if any(np.asarray(value).size > MAX_FOLDED_ELEMENTS for value in values):
        return None
    return [np.asarray(value) for value in values]


def _inputs(node: onnx.NodeProto) -> Iterator[str]:
    """The names the node reads, those of its subgraphs (an If's branches) included."""
    yield from node.input
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in graph.node:
                yield from _inputs(inner)

"""Latency annotations from the cost model, and the cost model as the search needs it.

Needs: prunable nodes with `block`. Leaves on each: `dense_latency_s` (the layer run dense),
`predicted_latency_s` (at its block and sparsity), `latency_source` (measured, fitted or
analytical: where the chosen figure came from), `kernel` ("block-sparse" or "dense": what the artifact
runs it with) and `dense_block` (the block shape its dense kernel is built in).

    >>> annotate(ir, cost_model(resolve_target("x86"))).graph.nodes[node]["predicted_latency_s"]
    4.1e-05
"""
from __future__ import annotations

from pruneaug.cost_model.conv_shape import ConvShape
from pruneaug.cost_model.model import DEFAULT_DENSITIES, SOURCES, Prediction, faster_dense
from pruneaug.errors import CodegenError
from pruneaug.ir.graph import IRModel
from pruneaug.ir.layer import PrunableLayer
from pruneaug.passes.activations import resolve_pads

MAX_SPARSITY = 0.999  # a layer at sparsity 1 (every block zero, as tools/bench_plans.py's floor) is costed at this


def _m(layer: PrunableLayer) -> int:
    return layer.m or 1  # shape inference could not tell: cost one row, as for a batch-1 vector


def conv_shape(layer: PrunableLayer) -> ConvShape | None:
    """A Conv layer's geometry as the artifact's kernels run it, None for other layers and for a Conv
    whose input shape is unknown (the cost model then predicts its im2col matmul). As TVM's ONNX
    frontend imports it: a SAME_UPPER/SAME_LOWER conv is a pad op, then an unpadded conv of the padded
    input (the pad op is outside the layer's cost, like the model's other ops). A Conv1d is the 2-D
    conv of one-row images that `codegen.relax_build` runs it as."""
    if layer.conv is None or layer.input_shape is None or len(layer.input_shape) not in (3, 4):
        return None
    n, c, *spatial = layer.input_shape
    pads = resolve_pads(layer.conv, tuple(spatial))
    if layer.conv.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = [size + pads[i] + pads[i + len(spatial)] for i, size in enumerate(spatial)]
        pads = (0,) * len(pads)
    kernel, strides, dilations = layer.conv.kernel, layer.conv.strides, layer.conv.dilations
    if len(spatial) == 1:  # one-row images: H = 1, kernel 1 x k, no padding along H
        spatial, kernel, strides, dilations = [1, *spatial], (1, *kernel), (1, *strides), (1, *dilations)
        pads = (0, pads[0], 0, pads[1])
    return ConvShape(layer.shape[0], (n, c, *spatial), kernel, strides, pads, dilations)


def predict_layer(costs, layer: PrunableLayer, block: tuple[int, int], sparsity: float) -> Prediction:
    """The cost model's `Prediction` for one layer: a Conv from its own kernels' times, the rest as a
    matmul; a shared weight's, summed over its readers (its source the least sure of theirs). Sparsity 0
    is the dense kernel in the block shape `dense_kernel` builds it in."""
    if sparsity == 0:
        return dense_kernel(costs, layer)[1]
    return _summed([_predict_read(costs, read, block, sparsity) for read in layer.reads()])


def dense_kernel(costs, layer: PrunableLayer) -> tuple[tuple[int, int], Prediction]:
    """The block shape of the layer's dense kernel (`schedule.dense_blocks`) and its time: the faster where
    measured (`faster_dense`), for all of a shared weight's readers together (the artifact builds one
    kernel per weight)."""
    per_read = [_dense_read(costs, read) for read in layer.reads()]
    shared = [block for block in per_read[0] if all(block in options for options in per_read)]
    return faster_dense({block: _summed([options[block] for options in per_read]) for block in shared})


def _summed(predictions: list[Prediction]) -> Prediction:
    if len(predictions) == 1:
        return predictions[0]
    least_sure = max((p.source for p in predictions), key=SOURCES.index)
    return Prediction(sum(p.seconds for p in predictions), least_sure)


def _predict_read(costs, layer: PrunableLayer, block: tuple[int, int], sparsity: float) -> Prediction:
    conv = conv_shape(layer)
    if conv is not None:
        return costs.predict_conv(conv, block, sparsity)
    return costs.predict(layer.shape[0], layer.shape[1], _m(layer), block, sparsity)


def _dense_read(costs, layer: PrunableLayer) -> dict[tuple[int, int], Prediction]:
    conv = conv_shape(layer)
    if conv is not None:
        return costs.dense_conv_options(conv)
    return costs.dense_options(layer.shape[0], layer.shape[1], _m(layer))


def _read_key(layer: PrunableLayer):
    """What one read's prediction depends on besides (block, sparsity)."""
    conv = conv_shape(layer)
    return conv.key if conv is not None else (layer.shape, _m(layer))


def layer_latency(costs):
    """The search's latency function: seconds of one layer at (block, sparsity); sparsity 0 is the dense kernel.

    Memoised by what the prediction reads and (block, sparsity): the search and its baselines ask for
    the same points of every layer again and again, and a model repeats a few layer shapes many times
    (BERT: 3 shapes, 72 layers).
    """
    known: dict[tuple, float] = {}

    def latency(layer: PrunableLayer, block: tuple[int, int], sparsity: float) -> float:
        key = (tuple(_read_key(read) for read in layer.reads()), tuple(block), sparsity)
        if key not in known:
            known[key] = float(predict_layer(costs, layer, block, sparsity).seconds)
        return known[key]

    return latency


def measured_shapes(layers) -> tuple[set[tuple[int, int, int]], set[ConvShape]]:
    """What the cost model times for these layers: (out, in, m) of the matmul-like ones, the Convs' geometries."""
    shapes, convs = set(), set()
    for layer in (read for layer in layers for read in layer.reads()):
        conv = conv_shape(layer)
        if conv is not None:
            convs.add(conv)
        else:
            shapes.add((layer.shape[0], layer.shape[1], _m(layer)))
    return shapes, convs


def measure_search_kernels(costs, profile, layers, blocks) -> int:
    """Time the kernels a search of `layers` over `blocks` needs into `costs` (where it measures, `costs.runner`):
    the dense kernel in each of its block shapes, and a few densities per block shape the target serves, the
    fitted model answering the rest of the grid. Returns how many were timed (0 where `costs` only predicts,
    or the cache held them)."""
    return _measure(costs, layers, [b for b in blocks if target_serves(profile, b)])


def measure_plan_kernels(costs, profile, ir: IRModel) -> int:
    """Time into `costs` (where it measures) what the artifact of a given plan `ir` may run for each prunable
    layer: its dense kernel in each of its block shapes and, for a pruned layer, its block-sparse kernel at its
    own block and density. `annotate` then picks between the two on times: on the analytical model alone,
    ConvNeXt-tiny's 768x3072 layers at m=49 (16x1, 70%) were predicted at 2766 µs block-sparse against
    2087 µs dense and ran dense, where they measure 338 µs against 1065 µs. Returns how many were timed."""
    planned: dict[tuple, list[PrunableLayer]] = {}
    for node in ir.prunable_nodes():
        spec = ir.graph.nodes[node]["block"]
        sparse = spec.sparsity > 0 and target_serves(profile, spec.shape)
        point = ((spec.shape,), (1.0 - min(spec.sparsity, MAX_SPARSITY),)) if sparse else ((), ())
        planned.setdefault(point, []).append(ir.layer(node))
    return sum(_measure(costs, layers, list(blocks), densities) for (blocks, densities), layers in planned.items())


def _measure(costs, layers, blocks, densities=DEFAULT_DENSITIES) -> int:
    if costs.runner is None:
        return 0
    shapes, convs = measured_shapes(layers)
    return costs.fill(shapes, blocks=blocks, densities=densities, convs=convs)


def target_serves(profile, block: tuple[int, int]) -> bool:
    """Whether the target's kernels can serve `block` (whatever the layer)."""
    from pruneaug.codegen.bsr import check_block_supported

    try:
        check_block_supported(profile, block)
    except CodegenError:
        return False
    return True


def block_supported(profile):
    """The search's filter: block shapes the target's kernels can serve."""

    def supported(layer: PrunableLayer, block: tuple[int, int]) -> bool:
        return target_serves(profile, block)

    return supported


def runs_block_sparse(data) -> bool:
    """Whether the artifact runs a prunable node (its graph attributes) with a block-sparse kernel: it is
    pruned, and `annotate` did not find the dense kernel faster."""
    return data["block"].sparsity > 0 and data.get("kernel") != "dense"


def annotate(ir: IRModel, costs, dense_where_faster: bool = False) -> IRModel:
    """Each layer's predicted latency with its planned kernel and with the dense one.

    `dense_where_faster` (for a plan that was given, not searched): a pruned layer whose block-sparse
    kernel is predicted no faster than the dense kernel runs dense (`kernel`: "dense"). Its zeros stay in
    the weights (pruned.onnx, masks.npz); the artifact multiplies them with the faster of two kernels that
    compute the same: random zeros of a fine-tuned model read back by --keep-sparsity as 1x1 blocks ran
    slower than the dense model. A search never plans such a layer: dense has no proxy loss and runs
    faster, so it dominates the option.
    """
    result = ir.copy()
    for node in ir.prunable_nodes():
        layer = ir.layer(node)
        data = result.graph.nodes[node]
        spec = data["block"]
        chosen = predict_layer(costs, layer, spec.shape, min(spec.sparsity, MAX_SPARSITY))
        data["dense_block"], dense = dense_kernel(costs, layer)
        data["kernel"] = "block-sparse" if spec.sparsity > 0 else "dense"
        data["block_sparse_latency_s"] = None
        if dense_where_faster and spec.sparsity > 0 and chosen.seconds >= dense.seconds:
            data["kernel"], data["block_sparse_latency_s"], chosen = "dense", float(chosen.seconds), dense
        data["dense_latency_s"] = float(dense.seconds)
        data["predicted_latency_s"] = float(chosen.seconds)
        data["latency_source"] = chosen.source
    return result

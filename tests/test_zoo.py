"""The test zoo itself: every model is valid ONNX, runs in onnxruntime and holds the pattern it is named for."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import zoo


def _run(model: onnx.ModelProto | str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _declared_shape(value: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim)


@pytest.mark.parametrize("name", sorted(zoo.ALL))
def test_model_is_valid_and_runs_with_declared_output_shapes(name: str) -> None:
    model = zoo.ALL[name]()
    onnx.checker.check_model(model, full_check=True)
    outputs = _run(model, zoo.random_inputs(model, batch=3))
    assert [o.shape for o in outputs] == [_declared_shape(v, batch=3) for v in model.graph.output]
    assert all(np.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("name", sorted(zoo.ALL))
def test_builders_are_deterministic(name: str) -> None:
    assert zoo.ALL[name]().SerializeToString() == zoo.ALL[name]().SerializeToString()


@pytest.mark.parametrize("version", [13, 17, 21])
@pytest.mark.parametrize("builder", [zoo.mlp, zoo.cnn, zoo.with_subgraph])
def test_opset_keeps_outputs(builder, version: int) -> None:
    model = builder()
    converted = zoo.opset(model, version)
    assert [(o.domain, o.version) for o in converted.opset_import] == [("", version)]
    inputs = zoo.random_inputs(model)
    for expected, got in zip(_run(model, inputs), _run(converted, inputs), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_opset_refuses_an_op_the_opset_lacks() -> None:
    with pytest.raises(onnx.checker.ValidationError, match="LayerNormalization"):
        zoo.opset(zoo.transformer_block(), 13)


def test_zoo_has_the_mlp_at_opsets_13_17_21() -> None:
    versions = {zoo.ALL[name]().opset_import[0].version for name in zoo.ALL if name.startswith("mlp")}
    assert versions >= {13, 17, 21}


def test_random_inputs_give_dynamic_dims_the_batch() -> None:
    inputs = zoo.random_inputs(zoo.gemm_variants(), batch=5, seed=1)
    assert {k: (v.shape, v.dtype) for k, v in inputs.items()} == {"a": ((32, 5), np.float32)}
    np.testing.assert_array_equal(inputs["a"], zoo.random_inputs(zoo.gemm_variants(), batch=5, seed=1)["a"])


def test_external_data_round_trip(tmp_path) -> None:
    model = zoo.mlp()
    path = tmp_path / "mlp.onnx"
    data = zoo.save_with_external_data(model, path)
    assert data.exists() and data.stat().st_size > path.stat().st_size
    stored = onnx.load(path, load_external_data=False).graph.initializer
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in stored)
    inputs = zoo.random_inputs(model)
    np.testing.assert_array_equal(_run(str(path), inputs)[0], _run(model, inputs)[0])


def _initializer_uses(graph: onnx.GraphProto) -> Counter[str]:
    names = {init.name for init in graph.initializer}
    return Counter(i for node in graph.node for i in node.input if i in names)


def test_patterns_are_present() -> None:
    """The zoo's models hold the structures their docstrings promise, so tests using them test those."""
    gemms = [n for n in zoo.gemm_variants().graph.node if n.op_type == "Gemm"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gemms]
    assert {(a.get("transA", 0), a.get("transB", 0)) for a in attrs} >= {(1, 0), (1, 1)}
    assert {len(n.input) for n in gemms} == {2, 3}

    transformer = zoo.transformer_block().graph
    transposed = {n.output[0] for n in transformer.node
                  if n.op_type == "Transpose" and n.input[0] in {i.name for i in transformer.initializer}}
    assert any(n.op_type == "MatMul" and n.input[1] in transposed for n in transformer.node)

    assert max(_initializer_uses(zoo.shared_weight().graph).values()) == 2

    (if_node,) = [n for n in zoo.with_subgraph().graph.node if n.op_type == "If"]
    assert all(len(a.g.initializer) == 1 and a.g.node[0].op_type == "MatMul" for a in if_node.attribute)

    convs = [n for n in zoo.cnn().graph.node if n.op_type == "Conv"]
    groups = {onnx.helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "group"}
    assert groups == {1, 2, 32}

    assert not {n.op_type for n in zoo.no_prunable().graph.node} & {"MatMul", "Gemm", "Conv"}

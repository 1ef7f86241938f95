"""Whole-model compile through TVM Relax: block-sparse kernels for declared weights, dense for the rest,
outputs against onnxruntime, and the errors a user can meet."""
from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from devices import requires_cuda_gpu
from pruneaug.codegen import bsr, conv_lowering, relax_build, threads
from pruneaug.codegen.export import cuda_sources
from pruneaug.codegen.relax_build import build_model, canonical_views, check_against_onnxruntime
from pruneaug.cost_model.targets import resolve_target
from pruneaug.errors import CodegenError

RTOL = 1e-4


@pytest.fixture(scope="module")
def x86():
    return resolve_target("x86")


def prune_blocks(model: onnx.ModelProto, blocks: dict[str, tuple[int, int]], density: float = 0.3,
                 seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose named weights keep a random `density` of the r x c blocks of their canonical view."""
    rng = np.random.default_rng(seed)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    views = canonical_views(model, blocks)
    for init in pruned.graph.initializer:
        if init.name not in blocks:
            continue
        stored = numpy_helper.to_array(init)
        w = views[init.name].copy()
        r, c = blocks[init.name]
        keep = rng.random((-(-w.shape[0] // r), -(-w.shape[1] // c))) < density
        w *= np.kron(keep, np.ones((r, c), np.float32))[: w.shape[0], : w.shape[1]]
        if stored.ndim > 2:
            new = w.reshape(stored.shape)
        elif stored.shape == w.shape and np.array_equal(stored, views[init.name]):
            new = w
        else:
            new = w.T
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    return pruned


def ort_outputs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)


def assert_matches_onnxruntime(executable, model, inputs, target=None):
    ours = relax_build._run_compiled(executable, model, inputs, target)
    for a, b in zip(ours, ort_outputs(model, inputs), strict=True):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= RTOL * np.max(np.abs(b))


def recorded_calls(monkeypatch, module, name: str) -> list[tuple]:
    """The positional arguments of every call of `module.name` while the test runs, the calls passed on to it."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args) or real(*args))
    return calls


def test_mlp_sparse_and_dense_layers(x86):
    # fc1: MatMul; fc2: Gemm transB=1 with alpha/beta; fc3 (Gemm transB=0) stays dense.
    model = prune_blocks(zoo.mlp(), {"fc1.weight": (8, 8), "fc2.weight": (16, 1)})
    inputs = zoo.random_inputs(model, batch=3)
    ex = build_model(model, {"fc1.weight": (8, 8), "fc2.weight": (16, 1)}, x86, {"x": [3, 64]})
    assert_matches_onnxruntime(ex, model, inputs)
    check_against_onnxruntime(ex, model, inputs)


def test_gemm_variants_with_ragged_blocks(x86):
    blocks = {"g1.B": (4, 4), "g2.B": (3, 5), "g4.B": (8, 8)}  # 40 and 48 are not all multiples of the blocks
    model = prune_blocks(zoo.gemm_variants(), blocks)
    inputs = zoo.random_inputs(model, batch=5)
    ex = build_model(model, blocks, x86, {"a": [32, 5]})
    assert_matches_onnxruntime(ex, model, inputs)


def test_a_cpu_model_runs_its_relax_function_as_native_code_and_a_cuda_one_as_bytecode(x86):
    # "compiled": no bytecode interpreted around the kernels on CPUs (`_exec_mode`); the model still matches
    model = prune_blocks(zoo.mlp(), {"fc1.weight": (8, 8)})
    ex = build_model(model, {"fc1.weight": (8, 8)}, x86, {"x": [3, 64]})
    assert ex.mod.imports[0].implements_function("__vmtir__main")
    assert_matches_onnxruntime(ex, model, zoo.random_inputs(model, batch=3))
    assert relax_build._exec_mode(resolve_target("cuda")) == "bytecode"


def test_transformer_block_on_3d_activations(x86):
    blocks = {"q_proj.weight": (16, 16), "out_proj.weight": (8, 8), "ffn.up.weight": (4, 1)}
    model = prune_blocks(zoo.transformer_block(), blocks, density=0.4)
    inputs = zoo.random_inputs(model, batch=2)
    ex = build_model(model, blocks, x86, {"x": [2, 16, 64]})
    assert_matches_onnxruntime(ex, model, inputs)


def test_main_allocates_no_intermediate_and_makes_no_view_of_one(x86):
    """codegen/workspace.py: after TVM's CPU pipeline, main's intermediate tensors and the reshaped views of
    them come from `workspace`; main allocates only its output and reshapes only its input."""
    import re

    from pruneaug.codegen.workspace import WORKSPACE_FUNCTION

    blocks = {"q_proj.weight": (16, 16), "ffn.up.weight": (4, 1)}
    model = prune_blocks(zoo.transformer_block(), blocks, density=0.4)
    mod = relax_build.rewritten_model(model, blocks, x86, {"x": [2, 16, 64]})
    with x86.tvm():
        lowered = relax_build._pipeline(x86)(mod)
    main, workspace = lowered["main"].script(), lowered[WORKSPACE_FUNCTION].script()
    assert main.count("R.vm.alloc_storage(") == 1  # the output's
    assert re.findall(r'"vm\.builtin\.reshape", (\w+),', main) == ["x"]
    assert workspace.count("R.vm.alloc_storage(") >= 2 and workspace.count('"vm.builtin.reshape"') >= 2
    inputs = zoo.random_inputs(model, batch=2)
    assert_matches_onnxruntime(build_model(model, blocks, x86, {"x": [2, 16, 64]}), model, inputs)


@pytest.mark.slow
def test_cnn_convolutions(x86):
    # 1x1, 3x3 padded, strided, dilated and 1x3 sparse; depthwise and grouped stay dense (TVM's own conv).
    blocks = {"pointwise.weight": (4, 1), "conv3x3.weight": (8, 8), "strided.weight": (8, 4),
              "dilated.weight": (16, 16), "row1x3.weight": (4, 4), "fc.weight": (2, 8)}
    model = prune_blocks(zoo.cnn(), blocks, density=0.5)
    inputs = zoo.random_inputs(model, batch=2)
    ex = build_model(model, blocks, x86, {"x": [2, 3, 16, 16]})
    assert_matches_onnxruntime(ex, model, inputs)


@pytest.mark.parametrize("target", ["x86", "cuda"])
def test_no_reshape_is_left_reading_another(target):
    # our kernels read and write 2-D views: a kernel feeding the next left reshape pairs that cancel,
    # each a runtime call (`rewritten_model`); the transformer block had such pairs before
    from tvm import relax

    model = prune_blocks(zoo.transformer_block(), {"q_proj.weight": (16, 16), "ffn.up.weight": (4, 1)})
    mod = relax_build.rewritten_model(model, {"q_proj.weight": (16, 16), "ffn.up.weight": (4, 1)},
                                      resolve_target(target), {"x": [2, 16, 64]})
    bound = {binding.var: binding.value for block in mod["main"].body.blocks for binding in block.bindings}

    def is_reshape(value) -> bool:
        return isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.reshape"

    reshapes = [value for value in bound.values() if is_reshape(value)]
    assert reshapes  # the 2-D views are still there
    assert not [value for value in reshapes if is_reshape(bound.get(value.args[0]))]


CUDA_CASES = {  # model, its sparse weights, its input shapes: every layer kind the CUDA rewrite meets
    "mlp": (zoo.mlp, {"fc1.weight": (8, 8), "fc2.weight": (16, 1)}, {"x": [3, 64]}),
    "transformer": (zoo.transformer_block, {"q_proj.weight": (16, 16), "ffn.up.weight": (4, 1)}, {"x": [2, 16, 64]}),
    "cnn": (zoo.cnn, {"pointwise.weight": (4, 1), "conv3x3.weight": (8, 8), "strided.weight": (8, 4),
                      "dilated.weight": (16, 16), "row1x3.weight": (4, 4), "fc.weight": (2, 8)}, {"x": [2, 3, 16, 16]}),
}


def test_cuda_short_reductions_run_serially_in_one_thread_per_output():
    # DLight split a 3x3 depthwise conv's 9 terms over a 256-thread block per output; a longer
    # reduction (the grouped conv's 16 channels x 3x3 = 144 terms) keeps DLight's cross-thread sum
    model, blocks, shapes = cuda_case("cnn")
    source = "".join(cuda_sources(build_model(model, blocks, resolve_target("cuda"), shapes).mod))
    kernels = dict(re.findall(r'__global__ void __launch_bounds__\(\d+\) (\w+)\(.*?\)\s*\{(.*?)\n\}', source, re.S))
    serial_3x3 = [body for body in kernels.values()
                  if "for (int ax4 = 0; ax4 < 3; ++ax4)" in body and "__shared__" not in body]
    assert serial_3x3, "no serial 3x3 reduction among the CUDA kernels"
    assert any("__shared__" in body for name, body in kernels.items() if not name.startswith(("bsr_", "dense_")))


def cuda_case(name: str):
    make, blocks, shapes = CUDA_CASES[name]
    model = prune_blocks(make(), blocks, density=0.5)
    return model, blocks, shapes


@pytest.mark.parametrize("name", CUDA_CASES)
def test_whole_model_compiles_for_cuda(name):
    # TVM's CUDA codegen needs no GPU: every rewrite (a strided conv included) must compile anywhere.
    model, blocks, shapes = cuda_case(name)
    executable = build_model(model, blocks, resolve_target("cuda"), shapes)
    assert "bsr_" in "".join(cuda_sources(executable.mod))
    # the kernels between the input's and the output's replay from a CUDA graph (`_pass_context`)
    assert "vm.builtin.cuda_graph.run_or_capture" in executable.as_text()


@requires_cuda_gpu
@pytest.mark.parametrize("name", CUDA_CASES)
def test_whole_model_on_cuda_matches_onnxruntime(name):
    model, blocks, shapes = cuda_case(name)
    cuda = resolve_target("cuda")
    inputs = zoo.random_inputs(model, batch=shapes[next(iter(shapes))][0])
    assert_matches_onnxruntime(build_model(model, blocks, cuda, shapes), model, inputs, cuda)


@requires_cuda_gpu
def test_a_cuda_graph_replay_follows_new_inputs_in_new_tensors(tmp_path):
    # The graph captures the inner kernels on the first run; later runs with other data, in tensors
    # other than the first run's, must still give onnxruntime's outputs for that data.
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from pruneaug.codegen.export import export_artifact, model_signature
    from pruneaug.runtime import load

    model, blocks, shapes = cuda_case("transformer")
    path = export_artifact(build_model(model, blocks, resolve_target("cuda"), shapes), resolve_target("cuda"),
                           tmp_path / "model", model_signature(model, shapes))
    load(path, "cuda")  # serves the sidecar's CUDA binaries
    machine = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cuda(0))
    for seed in (1, 2, 3):
        inputs = zoo.random_inputs(model, batch=2, seed=seed)
        tensors = [tvm.runtime.tensor(array, tvm.cuda(0)) for array in inputs.values()]
        ours = machine["main"](*tensors).numpy()
        want = ort_outputs(model, inputs)[0]
        assert np.max(np.abs(ours - want)) <= RTOL * np.max(np.abs(want))


def single_conv(x_shape: list[int], c_out: int, kernel: tuple[int, int],
                after: str | tuple[float, float] | None = None, **attrs) -> onnx.ModelProto:
    """x -> Conv (with bias) [-> `after`: an op of one input (Relu, HardSwish) or a Clip(lo, hi)] -> y,
    weights seeded; y's shape inferred (the frontend wants it)."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((c_out, x_shape[1], *kernel)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if after else "y"], name="conv",
                              kernel_shape=list(kernel), **attrs)]
    clip = after if isinstance(after, tuple) else ()
    bounds = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in zip(("lo", "hi"), clip)]
    if isinstance(after, str):
        nodes.append(helper.make_node(after, ["c"], ["y"], name="after"))
    elif clip:
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"))
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [y], [weight, bias, *bounds])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("x_shape, kernel, attrs", [
    ([2, 5, 10, 9], (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),  # even padded size: phases fit exactly
    ([2, 5, 10, 9], (3, 3), {"strides": [3, 3], "pads": [1, 0, 2, 1]}),  # asymmetric pads; the phase grid crops a row
    ([2, 5, 10, 9], (3, 3), {"strides": [2, 1], "pads": [2, 2, 2, 2], "dilations": [2, 2]}),  # dilated taps, one phase
    ([2, 5, 10, 9], (1, 1), {"strides": [2, 2]}),  # one phase of the four: the only one a tap reads
    ([2, 5, 10, 9], (2, 2), {"strides": [3, 3], "pads": [1, 1, 1, 1], "dilations": [2, 2]}),  # phases 0 and 2 of 3
    ([2, 5, 10, 9], (3, 3), {"strides": [2, 2], "pads": [3, 3, 3, 3], "dilations": [3, 3]}),  # taps 0, 2 in phase 0
    ([1, 9, 61, 64], (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),  # a split big enough for the thread pool
    ([1, 3, 5, 1], (1, 1), {"strides": [2, 2]}),  # one input column: phase 1 has none (its copy loops are empty)
    ([1, 3, 5, 2], (3, 3), {"strides": [3, 3], "pads": [1, 1, 1, 1]}),
])
def test_strided_conv_runs_over_stride_phases(x86, x_shape, kernel, attrs):
    # The stride-1 rewrite over the input's stride phases (`conv_lowering.StridePhases`), sparse and with
    # ragged 8x8 blocks.
    model = prune_blocks(single_conv(x_shape, 12, kernel, **attrs), {"w": (8, 8)}, density=0.5)
    inputs = {"x": np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {"w": (8, 8)}, x86), model, inputs)


@pytest.mark.parametrize("kernel, attrs", [
    ((1, 1), {"strides": [2, 2]}), ((3, 3), {"strides": [2, 3]}),
    ((3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}), ((7, 7), {"strides": [2, 2], "pads": [3, 2, 1, 3]}),
])
def test_strided_conv_in_wide_blocks_reads_its_input_at_the_stride(x86, monkeypatch, kernel, attrs):
    # 32x32 blocks: the layout that loads X a scalar at a time, which reads it (or its padded copy) at the
    # stride (`conv_lowering.strided_in_place`), no phase split
    names = []
    real = conv_lowering.conv_calls

    def spy(*args, **kwargs):
        calls = real(*args, **kwargs)
        names.extend(call.kernel.name for call in calls)
        return calls

    monkeypatch.setattr(conv_lowering, "conv_calls", spy)
    model = prune_blocks(single_conv([2, 16, 14, 13], 64, kernel, **attrs), {"w": (32, 32)}, density=0.5)
    inputs = {"x": np.random.default_rng(3).standard_normal([2, 16, 14, 13]).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {"w": (32, 32)}, x86), model, inputs)
    assert names == ["bsr_conv2d"]


def test_sparse_layers_use_the_block_sparse_kernel(x86, monkeypatch):
    calls = []
    real = bsr.bsr_matmul_kernel

    def spy(target, m, weight, bias=None, name="bsr_matmul", activation=None):
        calls.append((name, weight.shape, weight.block, bias is not None, activation))
        return real(target, m, weight, bias, name, activation)

    monkeypatch.setattr(bsr, "bsr_matmul_kernel", spy)
    model = prune_blocks(zoo.mlp(), {"fc1.weight": (8, 8), "fc3.weight": (2, 2)})
    build_model(model, {"fc1.weight": (8, 8), "fc3.weight": (2, 2)}, x86, {"x": [2, 64]})
    sparse = [call for call in calls if call[0] == "bsr_matmul"]
    # MatMul + Add + Relu: the bias add and the ReLU are fused in; the last Gemm has no ReLU after it
    assert sparse == [("bsr_matmul", (128, 64), (8, 8), True, "relu"), ("bsr_matmul", (10, 96), (2, 2), True, None)]


PADDED, STRIDED = {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}


@pytest.mark.parametrize("after, attrs, fused", [
    ("Relu", PADDED, "relu"), ("Relu", STRIDED, "relu"),
    ((0.0, 6.0), PADDED, "relu6"), ((0.0, 6.0), STRIDED, "relu6"),  # MobileNets' Clip(0, 6)
    ((0.0, 5.0), PADDED, None), ((-1.0, 6.0), PADDED, None),  # other clips stay TVM's, after the kernel
    ("HardSwish", PADDED, "hardswish"), ("HardSwish", STRIDED, "hardswish"),  # MobileNetV3's
    ("HardSigmoid", PADDED, None),
])
def test_an_activation_after_a_conv_is_fused_into_its_kernel(x86, monkeypatch, after, attrs, fused):
    activations = []
    real = bsr.bsr_conv2d_kernel

    def spy(*args, activation=None, **kwargs):
        activations.append(activation)
        return real(*args, activation=activation, **kwargs)

    monkeypatch.setattr(bsr, "bsr_conv2d_kernel", spy)
    model = prune_blocks(single_conv([1, 8, 8, 8], 16, (3, 3), after, **attrs), {"w": (8, 8)}, density=0.5)
    inputs = {"x": 3 * np.random.default_rng(3).standard_normal((1, 8, 8, 8)).astype(np.float32)}
    executable = build_model(model, {"w": (8, 8)}, x86)
    assert activations == [fused]
    expected = ort_outputs(model, inputs)[0]
    if isinstance(after, tuple):
        assert expected.min() == after[0] and expected.max() == after[1]  # both bounds bite
    if after == "HardSwish":  # its three pieces bite: zero below -3, the quadratic between, identity above 3
        assert (expected == 0).any() and ((expected < 0) & (expected > -0.375)).any() and (expected > 3).any()
    assert_matches_onnxruntime(executable, model, inputs)


@pytest.mark.parametrize("attrs, relu", [
    ({"pads": [2, 2]}, True),
    ({"strides": [2], "pads": [1, 0]}, False),  # asymmetric pads, strided: the stride-phase split of 1-row images
    ({"dilations": [2], "pads": [2, 2]}, True),
])
def test_conv1d_runs_as_a_2d_conv_of_one_row_images(x86, monkeypatch, attrs, relu):
    """An audio-style Conv1d ([N, C, L], kernel k) runs our block-sparse conv kernel, not TVM's conv1d."""
    geometries = []
    real = bsr.bsr_conv2d_kernel

    def spy(target, x_shape, weight, kernel_hw, *args, **kwargs):
        geometries.append((tuple(x_shape), tuple(kernel_hw)))
        return real(target, x_shape, weight, kernel_hw, *args, **kwargs)

    monkeypatch.setattr(bsr, "bsr_conv2d_kernel", spy)
    model = prune_blocks(single_conv([2, 6, 37], 12, (5,), "Relu" if relu else None, **attrs), {"w": (4, 1)},
                         density=0.5)
    inputs = {"x": np.random.default_rng(4).standard_normal((2, 6, 37)).astype(np.float32)}
    module = relax_build.rewritten_model(model, {"w": (4, 1)}, x86)
    assert "conv1d" not in module.script()
    assert_matches_onnxruntime(build_model(model, {"w": (4, 1)}, x86), model, inputs)
    assert all(x_shape[2] == 1 and kernel_hw[0] == 1 for x_shape, kernel_hw in geometries)  # one-row images


def test_a_matmul_of_a_vector_runs_our_kernel(x86):
    """x [K] @ W [K, N] (a 1-D activation) is one row of our kernel: a weight planned sparse there is served."""
    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.standard_normal((24, 16)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [24])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16])], [weight])
    model = prune_blocks(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"w": (4, 4)})
    inputs = {"x": rng.standard_normal(24).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {"w": (4, 4)}, x86), model, inputs)


def test_both_readers_of_a_weight_behind_an_identity_run_the_sparse_kernel(x86, monkeypatch):
    rows = []
    real = bsr.bsr_matmul_kernel

    def spy(target, m, weight, *args, **kwargs):
        rows.append((kwargs.get("name"), m))
        return real(target, m, weight, *args, **kwargs)

    monkeypatch.setattr(bsr, "bsr_matmul_kernel", spy)
    model = prune_blocks(zoo.aliased_weight(), {"tied.weight": (4, 4)}, density=0.5)
    shapes = {"x": [2, 16], "z": [2, 3, 16]}
    executable = build_model(model, {"tied.weight": (4, 4)}, x86, shapes)
    assert sorted(rows) == [("bsr_matmul", 2), ("bsr_matmul", 6)]
    assert_matches_onnxruntime(executable, model, zoo.random_inputs(model, batch=2))


def test_weights_equal_in_value_are_all_served(x86):
    """Layers emptied to all zeros (the bench's floor plan) hash alike: each still runs the sparse kernel."""
    model = onnx.ModelProto()
    model.CopyFrom(zoo.transformer_block())
    sparse = {"q_proj.weight": (8, 8), "k_proj.weight": (8, 8), "v_proj.weight": (4, 4)}  # all [64, 64]
    for init in model.graph.initializer:
        if init.name in sparse:
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    executable = build_model(model, sparse, x86, {"x": [2, 16, 64]})
    assert_matches_onnxruntime(executable, model, zoo.random_inputs(model, batch=2))


def test_a_weight_planned_sparse_that_no_kernel_serves_is_an_error(x86):
    """A 3-D conv stays TVM's: its weight, if planned sparse, would run dense against the plan's figures."""
    model = single_conv([1, 2, 4, 5, 6], 4, (3, 3, 3))
    with pytest.raises(CodegenError, match=r"planned for our block-sparse kernels .* \(TVM would run them\): w$"):
        build_model(model, {"w": (4, 1)}, x86)


def test_unsupported_block_fails_before_compiling(x86, monkeypatch):
    monkeypatch.setattr(relax_build, "import_onnx", lambda *a, **k: pytest.fail("imported before the check"))
    with pytest.raises(CodegenError, match="block 128x4"):
        build_model(zoo.mlp(), {"fc1.weight": (128, 4)}, x86, {"x": [2, 64]})


def test_op_the_frontend_cannot_import_is_named(x86):
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(CodegenError, match="'fancy'.*com.example.FancyOp"):
        build_model(model, {}, x86)


def test_an_unnamed_node_the_frontend_cannot_import_is_named_by_its_op_and_place(x86):
    # neither a name nor, for a node without outputs in use, anything else to show: its op and its place
    det = helper.make_node("Det", ["r"], ["d"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"), det], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("d", onnx.TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CodegenError, match=r"^node 'Det_1': op Det is not supported by TVM's ONNX frontend$"):
        build_model(model, {}, x86)


def test_dynamic_input_needs_a_static_shape(x86):
    with pytest.raises(CodegenError, match="input 'x' has a dynamic shape"):
        build_model(zoo.mlp(), {}, x86)


def test_unknown_sparse_weight_is_named(x86):
    with pytest.raises(CodegenError, match="'nope' is not an initializer"):
        build_model(zoo.mlp(), {"nope": (4, 4)}, x86, {"x": [2, 64]})


@pytest.mark.slow
def test_gate_names_the_first_layer_that_differs(x86, monkeypatch):
    real = bsr.bsr_matmul_kernel

    def broken(target, m, weight, bias=None, name="bsr_matmul", activation=None):
        kernel = real(target, m, weight, bias, name, activation)
        if name != "bsr_matmul":  # the dense kernel is this function too
            return kernel
        return bsr.Kernel(kernel.primfunc, kernel.name, [kernel.constants[0] * 1.01, *kernel.constants[1:]])

    monkeypatch.setattr(bsr, "bsr_matmul_kernel", broken)
    blocks = {"fc2.weight": (8, 8)}
    model = prune_blocks(zoo.mlp(), blocks)
    inputs = zoo.random_inputs(model, batch=2)
    ex = build_model(model, blocks, x86, {"x": [2, 64]})
    with pytest.raises(CodegenError, match="layer 'fc2/Gemm'"):
        check_against_onnxruntime(ex, model, inputs, sparse_weights=blocks, target=x86)
    with pytest.raises(CodegenError, match="output 'y'"):
        check_against_onnxruntime(ex, model, inputs)


def test_the_frontend_does_not_check_the_model_again(monkeypatch):
    # pruneaug checks models from their files; TVM's frontend re-checked in memory (1.1 s on BERT-base)
    calls = []
    monkeypatch.setattr(onnx.checker, "check_model", lambda *args, **kwargs: calls.append(args))
    relax_build.import_onnx(zoo.mlp(), {"x": [1, 64]})
    assert calls == []
    onnx.checker.check_model(zoo.mlp())  # and the checker is back afterwards
    assert len(calls) == 1


def test_a_file_checked_while_the_frontend_imports_is_still_checked(tmp_path):
    """pruned.onnx is checked on the writer thread while the build imports the model (`compile._write_pruned`):
    the frontend's checker-off switch must not reach that check."""
    from test_cli import checker_failing_model

    from pruneaug.errors import ModelError
    from pruneaug.ir import onnx_io

    onnx.save(checker_failing_model(), tmp_path / "bad.onnx")
    with relax_build._without_onnx_checker(), pytest.raises(ModelError, match="bad.onnx: fails onnx.checker"):
        onnx_io.check_model(tmp_path / "bad.onnx", "bad.onnx")


@pytest.mark.parametrize("rule, shapes", [
    ("_InjectiveRule", {"small": [16, 128], "large": [256, 512]}),
    ("_LoopNestRule", {"small": [4, 16, 8], "large": [4, 64, 64]}),
])
def test_only_blocks_worth_a_fork_run_in_parallel(x86, rule, shapes):
    from tvm import te

    def prim_func(shape):
        if rule == "_InjectiveRule":
            a = te.placeholder(shape, name="a")
            return te.create_prim_func([a, te.compute(shape, lambda i, j: a[i, j] * 2.0 + 1.0, name="y")])
        heads, rows, depth = shape
        a, b = te.placeholder(shape, name="a"), te.placeholder(shape, name="b")
        k = te.reduce_axis((0, depth), name="k")
        y = te.compute((heads, rows, rows), lambda h, i, j: te.sum(a[h, i, k] * b[h, j, k], axis=k), name="y")
        return te.create_prim_func([a, b, y])

    scheduled = {size: getattr(relax_build, rule)(x86).apply(prim_func(shape), None, False).mod.script()
                 for size, shape in shapes.items()}
    assert "T.parallel" not in scheduled["small"]
    assert "T.parallel" in scheduled["large"]


def test_a_padded_depthwise_conv_fills_its_border_then_copies_its_interior(x86):
    """The padding of a conv TVM schedules (depthwise here) is zeros, then a vectorised copy: no select per
    element (`_fill_then_copy`); the model still matches onnxruntime."""
    from tvm import te, topi

    x, w = te.placeholder((1, 16, 8, 8), name="x"), te.placeholder((16, 1, 3, 3), name="w")
    conv = topi.nn.depthwise_conv2d_nchw(x, te.compute((16, 1, 3, 3), lambda *i: w(*i)), 1, 1, 1)
    scheduled = relax_build._LoopNestRule(x86).apply(te.create_prim_func([x, w, conv]), None, False)
    assert "if_then_else" not in scheduled.mod.script() and "pad_const" in scheduled.mod.script()

    rng = np.random.default_rng(5)
    channels = 16
    weight = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, channels, 9, 7])
    graph = helper.make_graph([node], "dw", [x], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = {"x": rng.standard_normal((2, channels, 9, 7)).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": [2, channels, 9, 7]}), model, inputs)


@pytest.mark.parametrize("simd_bytes, width, tile", [
    (64, 8, (8, 8)),    # 16 lanes: the 8 columns take half a register, 8 rows of it
    (32, 16, (4, 16)),  # 8 lanes: 16 columns are 2 registers, so 4 rows keep the tile within 8
    (32, 8, (8, 8)),
])
def test_a_loop_nests_register_tile_covers_its_columns_and_as_many_rows_as_registers_allow(
        x86, simd_bytes, width, tile):
    """An 8-wide output row on a 16-lane host was cut into 4-wide vectors (the widths tried skipped 8),
    in 4-row tiles: the CNN's 64x8x8 depthwise conv took 3.4 µs, 2.2 µs in one 8x8 tile."""
    from tvm import te, topi

    x, w = te.placeholder((1, 16, 8, width), name="x"), te.placeholder((16, 1, 3, 3), name="w")
    conv = topi.nn.depthwise_conv2d_nchw(x, te.compute((16, 1, 3, 3), lambda *i: w(*i)), 1, 1, 1)
    profile = dataclasses.replace(x86, simd_bytes=simd_bytes)
    script = relax_build._LoopNestRule(profile).apply(te.create_prim_func([x, w, conv]), None, False).mod.script()
    rows, cols = tile
    assert f"T.unroll({rows})" in script and f"T.vectorized({cols})" in script
    assert rows * -(-cols // (simd_bytes // 4)) <= relax_build.TILE_VECTORS


def run_guarded(kernel, inputs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
    """`kernel(*inputs, out)` with `out` the front of a larger buffer: fails if the kernel writes past `out`."""
    import tvm

    size = int(np.prod(out_shape))
    guarded = tvm.runtime.tensor(np.full(size + 4096, 7.0, np.float32))
    kernel(*(tvm.runtime.tensor(v) for v in inputs), guarded._create_view(out_shape))
    written = guarded.numpy()
    assert np.all(written[size:] == 7.0), "wrote past its output"
    return written[:size].reshape(out_shape)


@pytest.mark.parametrize("rows", [37, 197, 64])
def test_a_matmul_between_activations_is_padded_to_whole_vectors_and_writes_only_its_output(x86, rows):
    """A 197-token attention's 197 columns ran one lane at a time, 20x slower than onnxruntime: the loop
    nest is padded to whole vectors (`_tile_padding`), and the copy out of the padded result writes no
    element past the output (TVM 0.27 inlined that copy without its bounds)."""
    import tvm
    from tvm import te

    heads, depth = 2, 16
    a, b = te.placeholder((heads, rows, depth), name="a"), te.placeholder((heads, depth, rows), name="b")
    k = te.reduce_axis((0, depth), name="k")
    y = te.compute((heads, rows, rows), lambda h, i, j: te.sum(a[h, i, k] * b[h, k, j], axis=k), name="y")
    scheduled = relax_build._LoopNestRule(x86).apply(te.create_prim_func([a, b, y]), None, False)
    assert ("b_pad" in scheduled.mod.script()) == (rows != 64)
    widths = {int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", scheduled.mod.script())}
    assert any(w % (x86.simd_bytes // 4) == 0 for w in widths), widths  # whole registers

    rng = np.random.default_rng(6)
    a_np = rng.standard_normal((heads, rows, depth)).astype(np.float32)
    b_np = rng.standard_normal((heads, depth, rows)).astype(np.float32)
    out = run_guarded(tvm.compile(scheduled.mod, target=x86.tvm()), [a_np, b_np], (heads, rows, rows))
    np.testing.assert_allclose(out, a_np @ b_np, rtol=1e-4, atol=1e-4)


def test_a_loop_nest_followed_by_a_slice_writes_only_the_slice(x86):
    """FuseOps puts a slice after a depthwise conv into the conv's function; inlined into the tile's
    write-back, TVM 0.27 dropped its bounds and wrote the whole conv output into the smaller slice."""
    import tvm
    from tvm import te, topi

    x, w = te.placeholder((1, 16, 12, 28), name="x"), te.placeholder((16, 1, 3, 3), name="w")
    conv = topi.nn.depthwise_conv2d_nchw(x, te.compute((16, 1, 3, 3), lambda *i: w(*i)), 1, 1, 1)
    sliced = te.compute((1, 16, 12, 20), lambda n, c, i, j: conv[n, c, i, j], name="slice")
    y = te.compute(sliced.shape, lambda *i: te.max(sliced(*i), 0.0), name="relu")
    scheduled = relax_build._LoopNestRule(x86).apply(te.create_prim_func([x, w, y]), None, False)
    rng = np.random.default_rng(8)
    x_np, w_np = rng.standard_normal((1, 16, 12, 28)).astype(np.float32), rng.standard_normal((16, 1, 3, 3))
    out = run_guarded(tvm.compile(scheduled.mod, target=x86.tvm()), [x_np, w_np.astype(np.float32)], (1, 16, 12, 20))
    padded = np.pad(x_np, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv_np = sum(padded[:, :, dy:dy + 12, dx:dx + 28] * w_np[None, :, 0, dy, dx, None, None]
                  for dy in range(3) for dx in range(3))
    np.testing.assert_allclose(out, np.maximum(conv_np[..., :20], 0), rtol=1e-4, atol=1e-4)


def test_attention_over_an_odd_number_of_tokens_matches_onnxruntime(x86):
    """Scaled scores, softmax and the weighted sum over 37 tokens: both matmuls padded, in a whole model."""
    rng = np.random.default_rng(7)
    tokens, depth = 37, 16
    inits = [numpy_helper.from_array(np.float32(0.25), "scale")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "scale"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "k"], ["y"])]
    shape = [2, tokens, depth]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
                                                   for name in ("q", "k")],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = {name: rng.standard_normal(shape).astype(np.float32) for name in ("q", "k")}
    assert_matches_onnxruntime(build_model(model, {}, x86, {"q": shape, "k": shape}), model, inputs)


def test_an_elementwise_op_over_rows_no_vector_divides_runs_in_whole_vectors_of_its_fused_loops(x86):
    """A ReLU over 960x7x7 ran one lane at a time (7 columns), 8.9x the time it takes over the fused loops."""
    import tvm
    from tvm import te

    a = te.placeholder((1, 32, 7, 7), name="a")
    b = te.placeholder((1, 32, 1, 1), name="b")
    y = te.compute(a.shape, lambda n, c, i, j: te.max(a[n, c, i, j] + b[n, c, 0, 0], 0.0), name="y")
    scheduled = relax_build._InjectiveRule(x86).apply(te.create_prim_func([a, b, y]), None, False)
    assert f"T.vectorized({x86.simd_bytes // 4})" in scheduled.mod.script()
    rng = np.random.default_rng(11)
    a_np, b_np = rng.standard_normal((1, 32, 7, 7)).astype(np.float32), rng.standard_normal((1, 32, 1, 1))
    out = run_guarded(tvm.compile(scheduled.mod, target=x86.tvm()), [a_np, b_np.astype(np.float32)], (1, 32, 7, 7))
    np.testing.assert_allclose(out, np.maximum(a_np + b_np.astype(np.float32), 0), rtol=1e-6)


def depthwise_chain_model(channels: int, side: int) -> onnx.ModelProto:
    """Depthwise 3x3 convs with bias: stride 1 over `side`, ReLU, stride 2, stride 1 over the halved map."""
    rng = np.random.default_rng(9)
    inits, nodes, x = [], [], "x"
    for i, stride in enumerate((1, 2, 1)):
        inits += [numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], group=channels, pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        x = f"c{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["r0"]))
            x = "r0"
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [1, channels, side, side])], [helper.make_tensor_value_info(
            x, onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def grouped_conv_model(channels: int, per_group: int, side: int, stride: int) -> onnx.ModelProto:
    """x -> grouped 3x3 Conv (bias) -> Relu: RegNet's and ResNeXt's."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, per_group, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=channels // per_group, pads=[1, 1, 1, 1],
                              strides=[stride, stride], name="grouped"), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [1, channels, side, side])], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_transpose_model(x_shape: list[int], c_out: int, kernel: tuple[int, int], bias: bool, group: int = 1,
                         **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array(rng.standard_normal((x_shape[1], c_out // group, *kernel)).astype(np.float32),
                                     "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
    node = helper.make_node("ConvTranspose", ["x", "w", *(["b"] if bias else [])], ["y"], group=group, **attrs)
    graph = helper.make_graph([node], "convt", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("x_shape, c_out, kernel, bias, group, attrs, ours", [
    ([1, 16, 7, 9], 8, (2, 2), True, 1, {"strides": [2, 2]}, True),  # U-Net's upsampling: a 1x1 conv
    ([2, 6, 5, 4], 12, (3, 2), False, 1, {"strides": [3, 2]}, True),  # a batch, a kernel of two sides
    ([1, 16, 7, 9], 8, (4, 4), True, 1, {"strides": [2, 2], "pads": [1, 1, 1, 1]}, True),  # DCGAN's: taps overlap
    ([1, 5, 6, 7], 4, (3, 3), True, 1, {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, True),
    ([1, 5, 6, 7], 4, (5, 3), False, 1, {"strides": [3, 2], "pads": [2, 0, 1, 2]}, True),  # asymmetric pads
    ([1, 5, 6, 7], 4, (3, 3), False, 1, {"strides": [1, 1], "pads": [1, 1, 1, 1]}, True),  # stride 1: a flipped conv
    ([1, 16, 7, 9], 8, (2, 2), False, 2, {"strides": [2, 2]}, False),  # grouped: TVM's
    ([1, 5, 6, 7], 4, (3, 3), False, 1, {"strides": [2, 2], "dilations": [2, 2]}, False),  # dilated: TVM's
    ([2, 6, 9], 4, (16,), True, 1, {"strides": [8], "pads": [4, 4]}, True),  # 1-D: HiFi-GAN's upsampling
    ([1, 6, 9], 4, (3,), False, 1, {"strides": [2], "pads": [1, 0], "output_padding": [1]}, True),
])
def test_a_conv_transpose_runs_as_one_conv_of_its_output_phases_and_depth_to_space(
        x86, monkeypatch, x_shape, c_out, kernel, bias, group, attrs, ours):
    convs = []
    real = bsr.bsr_conv2d_kernel

    def spy(target, x_shape, weight, kernel_hw, *args, bias=None, **kwargs):
        convs.append((tuple(weight.shape), tuple(kernel_hw), bias is not None))
        return real(target, x_shape, weight, kernel_hw, *args, bias=bias, **kwargs)

    monkeypatch.setattr(bsr, "bsr_conv2d_kernel", spy)
    model = conv_transpose_model(x_shape, c_out, kernel, bias, group, **attrs)
    script = relax_build.rewritten_model(model, {}, x86, {"x": x_shape}).script()
    assert ("conv2d_transpose" in script) == (not ours)
    # every output phase of every channel one row of the conv's weight, ceil(k / s) taps a side, the bias in its stores
    strides = [1] * (2 - len(kernel)) + attrs["strides"]  # a 1-D one as a 2-D one of one-row images
    taps = tuple(-(-k // s) for k, s in zip([1] * (2 - len(kernel)) + list(kernel), strides))
    assert convs == ([((c_out * strides[0] * strides[1], x_shape[1] * taps[0] * taps[1]), taps, bias)] if ours else [])
    x = np.random.default_rng(14).standard_normal(x_shape).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": x_shape}), model, {"x": x})


@pytest.mark.parametrize("simd_bytes, per_group, strides, block", [
    (64, 8, (1, 1), (8, 1)), (64, 24, (1, 1), (8, 1)), (64, 4, (1, 1), (4, 1)), (64, 32, (1, 1), (16, 1)),
    (64, 8, (2, 2), (16, 1)), (64, 4, (2, 1), (16, 1)),  # AVX-512, strided: 16 rows, a vector, read at the stride
    (32, 8, (2, 2), (8, 1)),  # AVX2: a group's 8 rows are a vector already
])
def test_a_grouped_convs_blocks_are_a_groups_rows_or_16_where_strided_rows_would_split(simd_bytes, per_group,
                                                                                        strides, block):
    host = dataclasses.replace(resolve_target("x86"), simd_bytes=simd_bytes)
    geometry = ((1, 64, 28, 28), (3, 3), strides, (1, 1, 1, 1), (1, 1))
    assert relax_build._grouped_block(host, per_group, *geometry) == block


@pytest.mark.parametrize("channels, per_group, side, stride, ours", [
    (48, 8, 14, 1, True),    # RegNetY-400MF's 8 channels a group
    (104, 8, 15, 2, True),   # strided, an odd map: blocks of 16 rows, read at the stride
    (64, 16, 7, 1, True),    # 16 a group: blocks of 16 rows
    (48, 24, 9, 1, True),    # 24 a group: blocks of 8 rows
    (32, 4, 14, 1, True),    # ResNeXt's 4 a group, at stride 1: blocks of 4 rows
    (40, 4, 15, 2, True),    # ... strided: blocks of 16 rows (ragged: 40 rows), read at the stride
    (24, 2, 14, 1, False),   # 2 a group: TVM's
    (32, 1, 14, 1, False),   # depthwise: TVM's
])
def test_a_grouped_conv_runs_in_our_kernel_with_a_block_diagonal_weight(x86, channels, per_group, side, stride, ours):
    model = grouped_conv_model(channels, per_group, side, stride)
    shapes = {"x": [1, channels, side, side]}
    script = relax_build.rewritten_model(model, {}, x86, shapes).script()
    assert ("grouped_conv2d" in script) == ours and ("R.nn.conv2d" in script) == (not ours)
    x = np.random.default_rng(12).standard_normal(shapes["x"]).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, shapes), model, {"x": x})


def test_stride_1_depthwise_convs_are_widened_to_whole_vectors_and_sliced_back(x86):
    """On a 16-lane host the 14x14 conv computes 16x16 and slices; the stride-2 conv and the 7x7 one (half
    vectors) stay as they are. The model matches onnxruntime on this host, whatever its vector width."""
    from tvm import relax

    model = depthwise_chain_model(8, 14)
    mod = relax_build.import_onnx(model, {"x": [1, 8, 14, 14]})
    widened = relax_build._widen_grouped_convs(mod, lanes=16)
    calls = [binding.value for block in widened["main"].body.blocks for binding in block.bindings
             if isinstance(binding.value, relax.Call)]
    convs = [call for call in calls if relax_build._is_grouped_conv(call)]
    assert [[int(d) for d in call.ty.shape][2:] for call in convs] == [[16, 16], [7, 7], [7, 7]]
    assert [int(v) for v in convs[0].attrs.padding] == [1, 1, 3, 3]
    assert sum(getattr(call.op, "name", "") == "relax.strided_slice" for call in calls) == 1
    x = np.random.default_rng(10).standard_normal((1, 8, 14, 14)).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": [1, 8, 14, 14]}), model, {"x": x})


@pytest.mark.parametrize("side, shapes", [
    (28, [[28, 32], [14, 14], [16, 16]]),  # 28x28 and 14x14 maps widened
    (56, [[56, 56], [28, 28], [28, 32]]),  # a 56x56 map is not (WIDEN_MAX_PIXELS); its 28x28 successor is
])
def test_only_maps_up_to_the_limit_are_widened(side, shapes):
    from tvm import relax

    mod = relax_build.import_onnx(depthwise_chain_model(4, side), {"x": [1, 4, side, side]})
    widened = relax_build._widen_grouped_convs(mod, lanes=16)
    convs = [binding.value for block in widened["main"].body.blocks for binding in block.bindings
             if isinstance(binding.value, relax.Call) and relax_build._is_grouped_conv(binding.value)]
    assert [[int(d) for d in call.ty.shape][2:] for call in convs] == shapes


def test_a_small_padded_copy_is_made_for_several_channels_at_once_where_the_conv_reads_it_at_unit_stride(x86):
    """`_pad_chunks`: a 64x8x8 depthwise conv pads 16 channels (6.4 KB) per iteration when it reads the copy
    at consecutive columns, one channel per iteration when it reads it at stride 2; both match onnxruntime."""
    from tvm import relax, s_tir, tirx

    def pad_copy_loops(stride: int) -> list[int]:
        builder = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType([1, 64, 8, 8], "float32"))
        w = relax.const(np.ones((64, 1, 3, 3), np.float32))
        with builder.function("main", [x]):
            with builder.dataflow():
                y = builder.emit_output(relax.op.nn.conv2d(x, w, stride, 1, groups=64))
            builder.emit_func_output(y)
        with x86.tvm():
            mod = relax_build._pipeline(x86)(builder.get())
        [func] = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
        sch = s_tir.Schedule(func)
        return [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("pad_temp"))]

    assert pad_copy_loops(1) == [4, 16, 8, 8]
    assert pad_copy_loops(2) == [64, 1, 8, 8]
    model = depthwise_chain_model(64, 8)  # stride 1, 2, 1
    x = np.random.default_rng(11).standard_normal((1, 64, 8, 8)).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": [1, 64, 8, 8]}), model, {"x": x})


def layer_norm_model(x_shape: list[int], axis: int) -> onnx.ModelProto:
    """`LayerNormalization(x * 3 + 5, scale, bias)` over the axes from `axis` (a row far from zero: the
    two-pass variance must not cancel)."""
    rng = np.random.default_rng(4)
    normalized = x_shape[axis:]
    inits = [numpy_helper.from_array(rng.standard_normal(normalized).astype(np.float32), name) for name in ("g", "b")]
    inits += [numpy_helper.from_array(np.float32(3), "three"), numpy_helper.from_array(np.float32(5), "five")]
    nodes = [helper.make_node("Mul", ["x", "three"], ["x3"]), helper.make_node("Add", ["x3", "five"], ["shifted"]),
             helper.make_node("LayerNormalization", ["shifted", "g", "b"], ["y"], axis=axis, epsilon=1e-5)]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("x_shape,axis,ours", [
    ([2, 5, 37], -1, True),    # the last axis, 37 = 4 vectors of 8 (or 2 of 16) and 5 left over
    ([256, 300], 1, True),     # 256 rows: on the thread pool
    ([4, 12], -1, True),       # fewer columns than the accumulators take: one by one
    ([37], -1, True),          # one row: the scale and shift have the input's own shape
    ([3, 4, 6], 1, False),     # two axes: TVM's own
])
def test_layer_norm_over_the_last_axis_is_our_kernel(x86, monkeypatch, x_shape, axis, ours):
    from pruneaug.codegen import norm

    built = recorded_calls(monkeypatch, norm, "layer_norm_primfunc")
    model = layer_norm_model(x_shape, axis)
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": x_shape}), model, {"x": x})
    rows = int(np.prod(x_shape[:-1]))
    parallel = int(x86.cores > 1 and rows * x_shape[-1] >= threads.PARALLEL_MIN_WORK)
    assert parallel or x_shape != [256, 300] or x86.cores == 1
    assert built == ([(rows, x_shape[-1], pytest.approx(1e-5), relax_build._vector_lanes(x86), parallel, False, True)]
                     if ours else [])


def test_an_rms_normalization_op_runs_as_our_row_kernel(x86, monkeypatch):
    """ONNX's RMSNormalization (opset 23), which TVM imports as `rms_norm`: our kernel, not centred."""
    from pruneaug.codegen import norm

    built = recorded_calls(monkeypatch, norm, "layer_norm_primfunc")
    shape = [2, 5, 37]
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(37).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-5)], "rms",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    x = (np.random.default_rng(1).standard_normal(shape) * 3 + 2).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": shape}), model, {"x": x})
    assert [args[5:] for args in built] == [(False, False)]


def residual_layer_norm_model(shape: list[int], other_shape: list[int], add_also_out: bool) -> onnx.ModelProto:
    """`LayerNormalization(x + r)` over the last axis, `r` of `other_shape` (the model's shape, or one that
    broadcasts); with `add_also_out` the sum is an output too (a pre-norm residual stream reads it again)."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal(shape[-1:]).astype(np.float32), name) for name in ("g", "b")]
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    if add_also_out:
        outputs.append(helper.make_tensor_value_info("sum", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "residual_ln", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape),
                                                     helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, other_shape)],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape,other_shape,add_also_out,residual", [
    ([2, 5, 37], [2, 5, 37], False, True),   # the add read in our kernel, 3-D and ragged
    ([16, 128], [16, 128], True, True),      # the sum is an output too: still right
    ([2, 5, 37], [37], False, False),        # an add that broadcasts: TVM's, then our plain layer norm
])
def test_a_residual_add_before_a_layer_norm_is_read_in_its_kernel(x86, monkeypatch, shape, other_shape, add_also_out,
                                                                  residual):
    from pruneaug.codegen import norm

    built = recorded_calls(monkeypatch, norm, "layer_norm_primfunc")
    model = residual_layer_norm_model(shape, other_shape, add_also_out)
    rng = np.random.default_rng(8)
    inputs = {"x": (rng.standard_normal(shape) * 3 + 5).astype(np.float32),
              "r": rng.standard_normal(other_shape).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": shape, "r": other_shape}), model, inputs)
    assert len(built) == 1 and built[0][5:] == (residual, True)


@pytest.mark.parametrize("shape, parallel", [((1, 16, 128), False), ((8, 128, 256), True)])
def test_a_reduction_runs_on_the_thread_pool_only_where_its_work_pays_for_it(x86, shape, parallel):
    """DLight's Reduction rule parallelises every reduction; a small one (the encoder's mean over 16
    tokens) is left to run serially (`_LargeReductionRule`). Both match onnxruntime."""
    from tvm import te, topi
    from tvm.s_tir import dlight

    x = te.placeholder(shape, name="x")
    total = topi.sum(x, axis=1)
    func = te.create_prim_func([x, te.compute(total.shape, lambda *i: total(*i) / shape[1])])  # a mean
    scheduled = relax_build._LargeReductionRule(x86, dlight.cpu.Reduction()).apply(func, x86.tvm(), False)
    assert (scheduled is not None) == parallel
    if parallel:
        assert "T.parallel" in scheduled.mod.script()
    else:
        assert "T.parallel" not in relax_build._ParallelFallback(x86).apply(func, None, False).mod.script()

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)
    graph = helper.make_graph([node], "mean", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inputs = {"x": np.random.default_rng(6).standard_normal(shape).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {}, x86, {"x": list(shape)}), model, inputs)


def test_unnamed_nodes_each_serve_their_own_sparse_weight(x86):
    """onnx.helper and some converters leave node names empty: every such node is still told apart."""
    rng = np.random.default_rng(6)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), name) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])], weights)
    model = prune_blocks(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"a": (4, 4), "b": (4, 1)})
    assert set(canonical_views(model, ["a", "b"])) == {"a", "b"}
    inputs = {"x": rng.standard_normal((2, 16)).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {"a": (4, 4), "b": (4, 1)}, x86), model, inputs)


def test_sigmoid_and_cubes_run_vectorised_and_match_onnxruntime(x86):
    """SiLU (x * sigmoid(x)), a sigmoid of inputs from -80 to 80, and GPT-2's tanh GELU (its cube) and a
    fourth power: TVM's own sigmoid and powf call libm per element (`_vectorisable_math`). The rewrite keeps
    float64's values to 1e-6 relative, saturating ends included (onnxruntime's own logistic is only close in
    absolute terms: 6e-8 for 1.9e-8 at x = -17.8)."""
    gelu_tanh = [helper.make_node("Pow", ["x", "three"], ["cube"]),
                 helper.make_node("Mul", ["cube", "c"], ["cubic"]), helper.make_node("Add", ["x", "cubic"], ["inner"]),
                 helper.make_node("Mul", ["inner", "k"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["t"]),
                 helper.make_node("Add", ["t", "one"], ["t1"]), helper.make_node("Mul", ["x", "t1"], ["xt"]),
                 helper.make_node("Mul", ["xt", "half"], ["gelu"])]
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["silu"]),
             helper.make_node("Sigmoid", ["wide"], ["probability"]), *gelu_tanh,
             helper.make_node("Pow", ["x", "four"], ["fourth"])]
    constants = [numpy_helper.from_array(np.array(value, np.float32), name) for name, value in
                 (("three", 3.0), ("four", 4.0), ("c", 0.044715), ("k", np.sqrt(2 / np.pi)), ("one", 1.0),
                  ("half", 0.5))]
    outputs = ("silu", "probability", "gelu", "fourth")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8, 9, 9]),
                                           helper.make_tensor_value_info("wide", onnx.TensorProto.FLOAT, [321])],
                              [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shapes = {"x": [2, 8, 9, 9], "wide": [321]}
    script = relax_build.rewritten_model(model, {}, x86, shapes)["main"].script()
    assert "R.sigmoid(" not in script and "R.power(" not in script
    x = (np.random.default_rng(0).standard_normal([2, 8, 9, 9]) * 6).astype(np.float32)
    wide = np.linspace(-80, 80, 321, dtype=np.float32)
    ours = relax_build._run_compiled(build_model(model, {}, x86, shapes), model, {"x": x, "wide": wide}, x86)
    x64, wide64 = x.astype(np.float64), wide.astype(np.float64)
    exact = [x64 / (1 + np.exp(-x64)), 1 / (1 + np.exp(-wide64)),
             0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3))), x64 ** 4]
    for index, (got, want, ort) in enumerate(zip(ours, exact, ort_outputs(model, {"x": x, "wide": wide}), strict=True)):
        relative_only = index == 1  # the probabilities, down to 1e-35
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0 if relative_only else 1e-6 * float(np.abs(want).max()))
        np.testing.assert_allclose(got, ort, rtol=0, atol=2e-7 * float(np.abs(ort).max()))


def softplus_and_mish_model(shape: list[int]) -> onnx.ModelProto:
    """x -> Softplus, Mish (opset 18) and Mish as torch exports it below opset 18 (Softplus, Tanh, Mul)."""
    nodes = [helper.make_node("Softplus", ["x"], ["softplus"]), helper.make_node("Mish", ["x"], ["mish"]),
             helper.make_node("Softplus", ["x"], ["sp"]), helper.make_node("Tanh", ["sp"], ["t"]),
             helper.make_node("Mul", ["x", "t"], ["torch_mish"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                               for name in ("softplus", "mish", "torch_mish")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_softplus_and_mish_run_without_log_and_match_float64(x86):
    """Softplus, Mish (opset 18) and Mish as torch exports it below (Softplus, Tanh, Mul), from -100 to 100:
    TVM lowers each log(1 + exp(x)) to libm's logf per element; `_softplus` needs only an exp. Saturating ends
    included: softplus to 1e-6 relative down to float32's least normal number (below it, as softplus(-100) =
    3.7e-44, exp gives 0), mish(100) is 100 (no inf or nan from the exp)."""
    shape = [2, 3, 41, 41]
    model = softplus_and_mish_model(shape)
    script = relax_build.rewritten_model(model, {}, x86, {"x": shape})["main"].script()
    assert "R.log(" not in script
    spread = np.random.default_rng(1).standard_normal(int(np.prod(shape)) - 4001) * 4
    x = np.concatenate([np.linspace(-100, 100, 4001), spread]).astype(np.float32).reshape(shape)
    ours = relax_build._run_compiled(build_model(model, {}, x86, {"x": shape}), model, {"x": x}, x86)
    x64 = x.astype(np.float64)
    softplus = np.logaddexp(0, x64)
    exact = [softplus, x64 * np.tanh(softplus), x64 * np.tanh(softplus)]
    for index, (got, want, ort) in enumerate(zip(ours, exact, ort_outputs(model, {"x": x}), strict=True)):
        assert np.isfinite(got).all()
        if index == 0:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=np.finfo(np.float32).tiny)
        else:  # mish: tanh is TVM's fast_tanh, as for every Tanh, and mish(x) passes through 0
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got, ort, rtol=2e-6, atol=1e-6)


# the parts of a norm as exporters write them (torch below opset 17 for a layer norm; T5's and LLaMA's RMS
# norms, which have no op before opset 23): ReduceMean's axes are filled in per test
NORM_PARTS = {
    "layer norm": [("ReduceMean", ["x"], "mu"), ("Sub", ["x", "mu"], "d"), ("Pow", ["d", "two"], "d2"),
                   ("ReduceMean", ["d2"], "var"), ("Add", ["var", "eps"], "ve"), ("Sqrt", ["ve"], "sd"),
                   ("Div", ["d", "sd"], "n"), ("Mul", ["n", "g"], "ng"), ("Add", ["ng", "b"], "y")],
    "layer norm, no affine": [("ReduceMean", ["x"], "mu"), ("Sub", ["x", "mu"], "d"), ("Pow", ["d", "two"], "d2"),
                              ("ReduceMean", ["d2"], "var"), ("Add", ["var", "eps"], "ve"), ("Sqrt", ["ve"], "sd"),
                              ("Div", ["d", "sd"], "y")],
    "RMS norm (T5)": [("Add", ["x", "skip"], "h"), ("Pow", ["h", "two"], "sq"), ("ReduceMean", ["sq"], "ms"),
                      ("Add", ["ms", "eps"], "v"), ("Sqrt", ["v"], "r"), ("Reciprocal", ["r"], "ir"),
                      ("Mul", ["h", "ir"], "n"), ("Mul", ["g", "n"], "y")],
    "RMS norm, Div, no weight": [("Pow", ["x", "two"], "sq"), ("ReduceMean", ["sq"], "ms"), ("Add", ["ms", "eps"], "v"),
                                 ("Sqrt", ["v"], "r"), ("Div", ["x", "r"], "y")],
    "layer norm, squares as Mul": [("ReduceMean", ["x"], "mu"), ("Sub", ["x", "mu"], "d"), ("Mul", ["d", "d"], "d2"),
                                   ("ReduceMean", ["d2"], "var"), ("Add", ["var", "eps"], "ve"), ("Sqrt", ["ve"], "sd"),
                                   ("Div", ["d", "sd"], "n"), ("Mul", ["g", "n"], "y")],
    "RMS norm, squares as Mul": [("Mul", ["x", "x"], "sq"), ("ReduceMean", ["sq"], "ms"), ("Add", ["ms", "eps"], "v"),
                                 ("Sqrt", ["v"], "r"), ("Reciprocal", ["r"], "ir"), ("Mul", ["ir", "x"], "n"),
                                 ("Mul", ["n", "g"], "y")],
}


def _norm_in_parts(kind: str, axis: int, shape: list[int]) -> onnx.ModelProto:
    """A norm over `axis` as its parts (`NORM_PARTS`), its weights broadcast along `axis`."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node(op, inputs, [out], **({"axes": [axis]} if op == "ReduceMean" else {}))
             for op, inputs, out in NORM_PARTS[kind]]
    weight_shape = [shape[axis]] + [1] * (len(shape) - 1 - axis % len(shape))
    constants = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                 numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
                 numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "g"),
                 numpy_helper.from_array(rng.standard_normal(weight_shape).astype(np.float32), "b"),
                 numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "skip")]
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
                              [c for c in constants if c.name in used])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("kind", NORM_PARTS)
@pytest.mark.parametrize("axis, fused", [(-1, True), (1, False)])
def test_a_norm_in_parts_runs_as_our_row_kernel_and_matches_onnxruntime(x86, kind, axis, fused):
    """`_norms_from_parts`: over the last axis it is one call of our norm kernel (a T5 RMS norm's residual
    add read in it too); over another axis the parts stay TVM's."""
    shape = [2, 5, 7]
    model = _norm_in_parts(kind, axis, shape)
    script = relax_build.rewritten_model(model, {}, x86, {"x": shape})["main"].script()
    assert ("R.sqrt(" not in script and "R.call_tir(layer_norm" in script) == fused
    assert ("R.add(" not in script) == fused  # the epsilon's, a shift's, T5's residual add: all in the kernel
    x = (np.random.default_rng(4).standard_normal(shape) * 3 + 2).astype(np.float32)
    [ours] = relax_build._run_compiled(build_model(model, {}, x86, {"x": shape}), model, {"x": x}, x86)
    np.testing.assert_allclose(ours, ort_outputs(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def batch_norm_model(x_shape: list[int], conv_first: bool) -> onnx.ModelProto:
    """An inference BatchNormalization and a Relu over x (rank 2 to 4), after a 1x1 conv (sparse) or on x itself."""
    rng = np.random.default_rng(0)
    channels = x_shape[1]
    params = [rng.random(channels).astype(np.float32) + 0.5 for _ in range(4)]  # scale, B, mean, var
    params[2] -= 1.0
    inits = [numpy_helper.from_array(value, name) for value, name in zip(params, ("g", "b", "m", "v"))]
    nodes, source = [], "x"
    if conv_first:
        inits.append(numpy_helper.from_array(rng.standard_normal((channels, channels, 1, 1)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], name="conv"))
        source = "c"
    nodes += [helper.make_node("BatchNormalization", [source, "g", "b", "m", "v"], ["bn"], epsilon=1e-3),
              helper.make_node("Relu", ["bn"], ["y"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("x_shape, conv_first", [([2, 16], False), ([1, 16, 10], False), ([1, 16, 6, 6], False),
                                                 ([1, 16, 6, 6], True)])
def test_a_batch_norm_runs_as_one_multiply_and_add_per_element(x86, x_shape, conv_first):
    """Its channel's scale and shift folded at compile time, not TVM's divide by each channel's root."""
    sparse = {"w": (16, 1)} if conv_first else {}
    model = prune_blocks(batch_norm_model(x_shape, conv_first), sparse)
    shapes = {"x": x_shape}
    ops = [relax_build._op_name(binding.value)
           for binding in relax_build.rewritten_model(model, sparse, x86, shapes)["main"].body.blocks[0].bindings]
    assert "relax.divide" not in ops and "relax.subtract" not in ops and ops.count("relax.multiply") == 1, ops
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    assert_matches_onnxruntime(build_model(model, sparse, x86, shapes), model, {"x": x})


GELU_FORMS = {  # GELU's nodes after `pre`, as torch exports it and as the bundled encoder (and HF's BERT) writes it
    "torch": [("Div", ["pre", "root"], "scaled"), ("Erf", ["scaled"], "e"), ("Add", ["e", "one"], "e1"),
              ("Mul", ["pre", "e1"], "g2"), ("Mul", ["g2", "half"], "y")],
    "written out": [("Mul", ["pre", "inverse_root"], "scaled"), ("Erf", ["scaled"], "e"), ("Add", ["one", "e"], "e1"),
                    ("Mul", ["pre", "half"], "halved"), ("Mul", ["halved", "e1"], "y")],
}


def with_gelu(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """`model` with its output y put through GELU in one of its exported forms (`GELU_FORMS`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.output[:] = ["pre" if name == "y" else name for name in node.output]
    out.graph.node.extend(helper.make_node(op, inputs, [output]) for op, inputs, output in GELU_FORMS[form])
    out.graph.initializer.extend(numpy_helper.from_array(np.array(value, np.float32), name) for name, value in
                                 (("root", 2 ** 0.5), ("inverse_root", 2 ** -0.5), ("one", 1.0), ("half", 0.5)))
    del out.graph.value_info[:]
    return out


@pytest.mark.parametrize("form", GELU_FORMS)
@pytest.mark.parametrize("layer", ["matmul", "conv"])
def test_a_gelu_after_a_linear_layer_is_applied_by_its_kernel(x86, monkeypatch, layer, form):
    """BERT's, ViT's and ConvNeXt's GELU, as torch exports it or written out, in the kernel's stores (its erf TVM's
    fast_erf): no erf is left to TVM, and the model matches onnxruntime's exact erf."""
    activations = []
    name = "bsr_matmul_kernel" if layer == "matmul" else "bsr_conv2d_kernel"
    real = getattr(bsr, name)

    def spy(*args, **kwargs):
        activations.append(inspect.signature(real).bind(*args, **kwargs).arguments.get("activation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bsr, name, spy)
    if layer == "matmul":
        base, weight, shapes = zoo.mlp(), "fc3.weight", {"x": [3, 64]}
    else:
        base, weight, shapes = single_conv([1, 8, 8, 8], 16, (3, 3), pads=[1, 1, 1, 1]), "w", {"x": [1, 8, 8, 8]}
    model = prune_blocks(with_gelu(base, form), {weight: (4, 1)}, density=0.5)
    assert "R.erf(" not in relax_build.rewritten_model(model, {weight: (4, 1)}, x86, shapes)["main"].script()
    assert "gelu" in activations
    inputs = {"x": 2 * np.random.default_rng(7).standard_normal(shapes["x"]).astype(np.float32)}
    assert_matches_onnxruntime(build_model(model, {weight: (4, 1)}, x86, shapes), model, inputs)

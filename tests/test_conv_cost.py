"""A Conv layer is costed by the kernels the artifact calls for it (`codegen.conv_lowering`), timed and
cached under its whole geometry (`cost_model.conv_shape`), not by its im2col matmul's kernel."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm

import zoo
from pruneaug.codegen import bsr, conv_lowering, schedule
from pruneaug.codegen.schedule import conv_schedule
from pruneaug.cost_model import CostModel
from pruneaug.cost_model.cache import DENSE_BLOCK, ConvMeasurement, LatencyCache
from pruneaug.cost_model.conv_shape import ConvShape
from pruneaug.cost_model.measured import LocalRunner, build_conv_calls
from pruneaug.cost_model.targets import resolve_target
from pruneaug.ir.graph import lift
from pruneaug.ir.layer import ConvGeometry
from pruneaug.passes import latency
from reference import im2col
from test_relax_build import single_conv

X86 = resolve_target("x86")
STRIDED = ConvShape(24, (2, 8, 11, 10), (3, 3), (2, 2), (1, 0, 2, 1), (1, 1))


def _run_calls(calls, x: np.ndarray) -> np.ndarray:
    """The calls compiled one by one and chained, as the artifact chains them."""
    y = x
    for call in calls:
        module = bsr.compile_kernel(call.kernel, X86)
        args = bsr.kernel_arguments(call.kernel, y, tvm.cpu())
        module[call.kernel.name](*args)
        y = args[-1].numpy()
    return y


def _reference_conv(conv: ConvShape, x: np.ndarray, w2d: np.ndarray) -> np.ndarray:
    """The conv in numpy: its im2col matrix [N*Ho*Wo, C*kh*kw] times the canonical weight, as NCHW."""
    cols = im2col(x, conv.kernel, conv.strides, conv.pads, conv.dilations)
    return (cols @ w2d.T).reshape(conv.x_shape[0], *conv.out_hw, conv.out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("conv, names", [
    (STRIDED, ["stride_phases", "bsr_conv2d"]),
    (dataclasses.replace(STRIDED, strides=(1, 1)), ["bsr_conv2d"]),
])
def test_conv_calls_compute_the_conv(conv, names):
    rng = np.random.default_rng(0)
    out, in_, m = conv.matmul
    w2d = bsr.random_bsr_weight(out, in_, (8, 4), 0.4, seed=1).to_dense()
    calls = conv_lowering.conv_calls(X86, conv.x_shape, w2d, (8, 4), conv.kernel, conv.strides, conv.pads,
                                     conv.dilations)
    assert [c.kernel.name for c in calls] == names
    x = rng.standard_normal(conv.x_shape).astype(np.float32)
    y, expected = _run_calls(calls, x), _reference_conv(conv, x, w2d)
    assert y.shape == expected.shape and m == conv.x_shape[0] * conv.out_hw[0] * conv.out_hw[1]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape, cores, parallel", [
    ((1, 64, 8, 8), 2, False),  # the bundled CNN's stride-2 input: 9.2 µs on the pool, 1.3 µs serial
    ((1, 64, 56, 56), 2, True),
    ((1, 64, 56, 56), 1, False),
])
def test_the_phase_split_uses_the_thread_pool_only_for_enough_work(x_shape, cores, parallel):
    out_hw = [(size + 2 - 3) // 2 + 1 for size in x_shape[2:]]
    phases = conv_lowering.StridePhases(x_shape, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), out_hw)
    assert ("T.parallel" in phases.primfunc(cores).script()) == parallel


def test_the_phase_split_copies_without_a_select_per_element():
    phases = conv_lowering.StridePhases((1, 8, 9, 11), (3, 3), (2, 3), (1, 2, 0, 1), (1, 1), [4, 4])
    script = phases.primfunc(2).script()
    assert "if_then_else" not in script and "T.vectorized" in script


@pytest.mark.parametrize("x_shape, kernel, strides, pads", [
    ((1, 64, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1)),  # the bundled CNN's
    ((2, 3, 9, 11), (3, 3), (2, 3), (1, 2, 0, 1)),  # asymmetric pads and strides
    ((1, 4, 7, 6), (1, 1), (2, 2), (0, 0, 0, 0)),  # no padding: every phase lies inside X
    ((1, 2, 5, 40), (3, 3), (2, 2), (2, 2, 2, 2)),  # two padding rows and columns, a row longer than a piece
])
def test_the_phase_split_writes_every_element_of_the_phases(x_shape, kernel, strides, pads):
    """P against numpy's, its buffer filled with NaN first: each phase is zeroed only where it lies outside X
    (its rows above and below X, and its columns left and right of X in the rows inside), so an element
    that neither that nor the copy writes would stay NaN."""
    out_hw = [(size + pads[i] + pads[i + 2] - k) // s + 1 for i, (size, k, s) in enumerate(zip(x_shape[2:], kernel,
                                                                                                  strides))]
    phases = conv_lowering.StridePhases(x_shape, kernel, strides, pads, (1, 1), out_hw)
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    module = tvm.compile(phases.primfunc(X86.cores), target=X86.tvm())
    p = tvm.runtime.tensor(np.full(phases.shape, np.nan, np.float32))
    module["main"](tvm.runtime.tensor(x), p)
    (sh, sw), (hq, wq) = strides, phases.phase_hw
    padded = np.zeros((x_shape[0], x_shape[1], hq * sh + sh, wq * sw + sw), np.float32)  # past Xp: zeros too
    padded[:, :, pads[0]:pads[0] + x_shape[2], pads[1]:pads[1] + x_shape[3]] = x
    cy, cx = phases.phase_counts  # every phase a tap reads: for 3x3 all sh * sw of them, for 1x1 one
    assert (cy, cx) == ((1, 1) if kernel == (1, 1) else strides)
    expected = np.concatenate([padded[:, :, py:py + hq * sh:sh, px:px + wq * sw:sw]
                               for py in range(cy) for px in range(cx)], axis=1)
    np.testing.assert_array_equal(p.numpy(), expected)


def test_the_phase_split_of_a_long_row_is_vectorised_in_pieces_and_computes_the_conv():
    """A stride-2 Conv1d over 2000 samples: no vector wider than a piece's input columns (a row vectorised
    whole took 14 s to compile), and the conv still matches numpy."""
    conv = ConvShape(8, (1, 4, 1, 2000), (1, 3), (1, 2), (0, 1, 0, 1), (1, 1))
    phases = conv_lowering.StridePhases(conv.x_shape, conv.kernel, conv.strides, conv.pads, conv.dilations,
                                        [1, 1000])
    widths = [int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", phases.primfunc(2).script())]
    assert widths and max(widths) <= 2 * conv_lowering.SPLIT_PIECE + 1
    out, in_, _ = conv.matmul
    w2d = bsr.random_bsr_weight(out, in_, (4, 1), 0.5, seed=4).to_dense()
    calls = conv_lowering.conv_calls(X86, conv.x_shape, w2d, (4, 1), conv.kernel, conv.strides, conv.pads,
                                     conv.dilations)
    x = np.random.default_rng(5).standard_normal(conv.x_shape).astype(np.float32)
    np.testing.assert_allclose(_run_calls(calls, x), _reference_conv(conv, x, w2d), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv, block, names", [
    # in the layout that loads X a scalar at a time: the conv reads X (or its padded copy) at the stride, no split
    (ConvShape(64, (1, 16, 14, 13), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)), (32, 32), ["bsr_conv2d"]),
    (ConvShape(64, (2, 8, 11, 12), (3, 3), (2, 3), (0, 0, 0, 0), (2, 1)), (32, 32), ["bsr_conv2d"]),
    (ConvShape(64, (1, 16, 14, 13), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), (32, 32), ["bsr_conv2d"]),
    # the layout that loads X as vectors along a row: the split first
    (ConvShape(64, (1, 16, 14, 13), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)), (4, 1), ["stride_phases", "bsr_conv2d"]),
    (ConvShape(64, (1, 16, 14, 13), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)), (4, 1), ["stride_phases", "bsr_conv2d"]),
])
def test_a_strided_conv_reads_x_in_place_where_its_layout_loads_scalars(conv, block, names):
    out, in_, _ = conv.matmul
    w2d = bsr.random_bsr_weight(out, in_, block, 0.4, seed=6).to_dense()
    calls = conv_lowering.conv_calls(X86, conv.x_shape, w2d, block, conv.kernel, conv.strides, conv.pads,
                                     conv.dilations)
    assert [c.kernel.name for c in calls] == names
    x = np.random.default_rng(7).standard_normal(conv.x_shape).astype(np.float32)
    np.testing.assert_allclose(_run_calls(calls, x), _reference_conv(conv, x, w2d), rtol=1e-4, atol=1e-4)


def test_a_split_on_the_thread_pool_computes_the_conv():
    conv = ConvShape(16, (1, 16, 64, 63), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    out, in_, _ = conv.matmul
    w2d = bsr.random_bsr_weight(out, in_, (4, 4), 0.3, seed=2).to_dense()
    calls = conv_lowering.conv_calls(X86, conv.x_shape, w2d, (4, 4), conv.kernel, conv.strides, conv.pads,
                                     conv.dilations)
    assert X86.cores > 1 and "T.parallel" in calls[0].kernel.primfunc.script()
    x = np.random.default_rng(3).standard_normal(conv.x_shape).astype(np.float32)
    np.testing.assert_allclose(_run_calls(calls, x), _reference_conv(conv, x, w2d), rtol=1e-4, atol=1e-4)


def test_lift_records_each_convs_input_shape():
    ir = lift(zoo.cnn(), {"x": [2, 3, 16, 16]})
    shapes = {layer.weight: layer.input_shape for layer in ir.layers()}
    assert shapes["pointwise.weight"] == (2, 3, 16, 16)
    assert shapes["strided.weight"] == (2, 16, 16, 16)
    assert shapes["dilated.weight"] == (2, 32, 8, 8)
    assert shapes["fc.weight"] is None  # not a Conv


def test_conv_shape_of_a_layer_resolves_auto_pad_and_agrees_with_its_m():
    ir = lift(zoo.cnn(), {"x": [2, 3, 16, 16]})
    for layer in ir.layers():
        conv = latency.conv_shape(layer)
        if layer.op_type != "Conv":
            assert conv is None
            continue
        assert conv.matmul == (*layer.shape, layer.m)
    strided = next(layer for layer in ir.layers() if layer.weight == "strided.weight")
    assert latency.conv_shape(strided).key == "32x2x16x16x16_k3x3_s2x2_p1x1x1x1_d1x1"
    same = dataclasses.replace(strided, conv=ConvGeometry((3, 3), (2, 2), (0, 0, 0, 0), (1, 1), "SAME_UPPER"))
    # TVM's frontend pads the input (ONNX: the odd pad at the end), then runs an unpadded conv
    assert latency.conv_shape(same).key == "32x2x16x17x17_k3x3_s2x2_p0x0x0x0_d1x1"
    assert latency.conv_shape(dataclasses.replace(strided, input_shape=None)) is None


def _model_with(tmp_path, rows) -> CostModel:
    cache = LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c1")
    cache.put_conv(X86.cache_key, rows)
    return CostModel(X86, cache=cache)


def test_a_conv_is_predicted_from_its_own_times(tmp_path):
    key = STRIDED.key
    model = _model_with(tmp_path, [ConvMeasurement(key, DENSE_BLOCK, 1.0, 9e-6),
                                   ConvMeasurement(key, (8, 8), 0.1, 2e-6), ConvMeasurement(key, (8, 8), 0.5, 4e-6),
                                   ConvMeasurement(key, (8, 8), 0.75, 7e-6), ConvMeasurement(key, (4, 1), 0.5, 5e-6)])
    assert model.predict_conv(STRIDED, (8, 8), 0.5).seconds == pytest.approx(4e-6)
    assert model.predict_conv(STRIDED, (8, 8), 0.5).source == "measured"
    assert model.predict_conv(STRIDED, (16, 16), 0.0).seconds == pytest.approx(9e-6)  # sparsity 0: the dense conv
    between = model.predict_conv(STRIDED, (8, 8), 0.7)  # density 0.3: halfway from 0.1 to 0.5
    assert between.source == "fitted" and between.seconds == pytest.approx(3e-6)
    assert model.predict_conv(STRIDED, (8, 8), 0.05).seconds == pytest.approx(7e-6 + 12e-6 * 0.2)  # the last line on
    assert model.predict_conv(STRIDED, (8, 8), 0.95).seconds == pytest.approx(2e-6)  # below the sparsest: its time
    # one timed point of 4x1 is no line: the im2col matmul's prediction, as with nothing timed
    assert model.predict_conv(STRIDED, (4, 1), 0.7) == model.predict(*STRIDED.matmul, (4, 1), 0.7)
    assert model.predict_conv(STRIDED, (4, 1), 0.5).seconds == pytest.approx(5e-6)


def test_interpolation_keeps_to_the_timed_points_that_run_the_way_the_query_does(tmp_path):
    """The CNN's conv1 at batch 1 with 8x8 blocks runs on the calling thread up to 31 kept blocks of 288
    and on the thread pool from 32 (`schedule.runs_parallel`): its time steps down there, and a line
    drawn across the step predicts neither side."""
    from pruneaug.cost_model import model as model_module

    conv1 = ConvShape(64, (1, 32, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    two_cores = dataclasses.replace(X86, cores=2)
    assert [model_module._conv_runs_parallel(two_cores, conv1, (8, 8), d)
            for d in (0.05, 0.09, 0.1, 0.108, 0.11, 0.15, 0.2, 0.75)] == [0, 0, 0, 0, 1, 1, 1, 1]
    serial = {0.05: 2e-6, 0.1: 3e-6}  # 1 + 20 d µs on the calling thread
    pooled = {0.2: 1.5e-6, 0.35: 2.25e-6, 0.5: 3e-6, 0.75: 4.25e-6}  # 0.5 + 5 d µs on the pool
    cache = LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c1")
    cache.put_conv(two_cores.cache_key, [ConvMeasurement(conv1.key, (8, 8), d, t) for d, t in {**serial, **pooled}.items()])
    model = CostModel(two_cores, cache=cache)
    assert model.predict_conv(conv1, (8, 8), 1 - 0.15).seconds == pytest.approx(1.5e-6)  # not 2.25e-6 across the step
    assert model.predict_conv(conv1, (8, 8), 1 - 0.108).seconds == pytest.approx(3.16e-6)  # the serial line, not 2.88e-6
    assert model.predict_conv(conv1, (8, 8), 1 - 0.6).seconds == pytest.approx(3.5e-6)
    assert model.predict_conv(conv1, (8, 8), 1 - 0.6).source == "fitted"

    cache.put_conv(two_cores.cache_key, [ConvMeasurement(conv1.key, (4, 4), d, t) for d, t in ((0.1, 3e-6), (0.2, 1.5e-6),
                                                                                             (0.5, 3e-6))])
    one_serial = CostModel(two_cores, cache=cache)  # (4x4: 1152 blocks, serial up to 127 kept)
    assert [model_module._conv_runs_parallel(two_cores, conv1, (4, 4), d) for d in (0.09, 0.105)] == [0, 0]
    assert one_serial.predict_conv(conv1, (4, 4), 1 - 0.105).seconds == pytest.approx(3.15e-6)  # 0.1's, scaled up
    assert one_serial.predict_conv(conv1, (4, 4), 1 - 0.09).seconds == pytest.approx(3e-6)  # below it: its time


@pytest.mark.parametrize("batch, block, layout", [(1, (8, 8), "cuda_split"), (64, (16, 16), "cuda_split"),
                                                  (64, (1, 4), "cuda")])
def test_an_untimed_cuda_conv_is_costed_in_the_layout_its_kernel_takes(tmp_path, batch, block, layout):
    """At batch 1 the CNN's 3x3 conv (64 channels x 64 pixels) cannot fill a GPU with a thread per output,
    and at batch 64 its 16x16 blocks share each im2col read over 16 rows: its kernel splits each block row's
    columns over a warp (`bsr_conv2d_split`), where at batch 64 its im2col matmul (m = 4096) would thread
    along m. Untimed, the conv is costed as the split product of its pixels; with 1x4 blocks at batch 64
    it runs, and is costed as, a thread per output channel and pixel."""
    from pruneaug.cost_model import analytical

    gpu = resolve_target("cuda:sm_90")
    conv = ConvShape(64, (batch, 32, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    density = 0.3
    out, in_, pixels = conv.matmul
    kept = int(analytical.kept_blocks(out, in_, block, density))
    assert conv_schedule(gpu, conv.out_hw, block, pixels, kept, out_c=out,
                         kernel_hw=conv.kernel).layout == layout  # what codegen builds
    model = CostModel(gpu, cache=LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c1"))
    params, _ = model.params(block)
    # a thread per (output channel, pixel) is costed as such, not as the matmul's threads along m
    costed_as = {"cuda": analytical.CUDA_CONV_LAYOUT}.get(layout, layout)
    expected = analytical.latency_from_features(params, analytical.features(gpu, out, in_, pixels, block, density,
                                                                            costed_as))
    assert model.predict_conv(conv, block, 1 - density).seconds == pytest.approx(float(expected))
    threads = analytical.latency_from_features(params, analytical.features(gpu, out, in_, pixels, block, density,
                                                                          analytical.CUDA_CONV_LAYOUT))
    assert (float(expected) < float(threads)) == (layout == "cuda_split")


def test_an_untimed_cuda_1x1_conv_is_costed_without_a_gather():
    # its im2col matrix is X: a thread's step is a plain load, as in the matmul (the gather's cost had
    # put a 256->64 1x1 conv on 56x56 maps up to 5x slower than it ran on an H100)
    from pruneaug.cost_model import analytical
    from pruneaug.cost_model import model as model_module

    gpu = resolve_target("cuda:sm_90")
    pointwise = ConvShape(64, (1, 256, 56, 56), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1))
    padded = ConvShape(64, (1, 256, 56, 56), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert model_module._conv_matmul_layout(gpu, pointwise, (4, 4), 0.1) == analytical.CUDA_POINTWISE_CONV_LAYOUT
    assert model_module._conv_matmul_layout(gpu, padded, (1, 1), 0.1) == analytical.CUDA_CONV_LAYOUT
    params = analytical.default_params(gpu)
    out, in_, pixels = pointwise.matmul
    plain, gathered = (float(analytical.latency_from_features(params, analytical.features(
        gpu, out, in_, pixels, (4, 4), 0.1, layout)))
        for layout in (analytical.CUDA_POINTWISE_CONV_LAYOUT, analytical.CUDA_CONV_LAYOUT))
    assert plain < gathered


@pytest.mark.parametrize("conv", [ConvShape(64, (1, 32, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
                                  ConvShape(64, (1, 64, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))],
                         ids=["stride 1", "stride 2 (phase split)"])
def test_the_cost_models_thread_pool_rule_is_the_conv_kernels(conv):
    """`_conv_runs_parallel` against the parallel loop of the conv kernel the artifact builds, across the step."""
    from pruneaug.cost_model import model as model_module

    two_cores = dataclasses.replace(X86, cores=2)
    ways = []
    for density in (0.05, 0.1, 0.11, 0.12, 0.2, 0.3, 0.5):
        *_, conv_step = build_conv_calls(two_cores, conv, (8, 8), density)
        built = "T.parallel" in conv_step.kernel.primfunc.script()
        assert model_module._conv_runs_parallel(two_cores, conv, (8, 8), density) == built, density
        ways.append(built)
    assert ways[0] is False and ways[-1] is True  # the step lies inside the range


def test_conv_times_are_kept_per_conv_kernel_version(tmp_path):
    rows = [ConvMeasurement(STRIDED.key, (8, 8), 0.5, 4e-6)]
    _model_with(tmp_path, rows)
    same = LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c1")
    assert same.all_conv(X86.cache_key) == rows
    assert LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c2").all_conv(
        X86.cache_key) == []  # the conv lowering changed: its times are stale
    assert same.all(X86.cache_key) == []  # the matmul table is another one


class _ConvRunner:
    """Conv times from the kept blocks, the first timing of `slow_point` 3x slow; counts what it is asked to time."""

    device = "fake"

    def __init__(self, slow_point=None):
        self.convs, self.layers, self.slow_point = [], [], slow_point

    def time_conv(self, conv, block, density):
        self.convs.append((conv, block, density))
        slow = (conv, block, density) == self.slow_point and self.convs.count(self.slow_point) == 1
        return (3 if slow else 1) * (1e-6 + 1e-5 * density)

    def time_layer(self, out, in_, m, block, density):
        self.layers.append((out, in_, m, block, density))
        return 1e-6


def test_a_dense_conv_runs_in_the_block_shape_its_own_kernels_measured_faster(tmp_path):
    wide = schedule.WIDE_DENSE_BLOCK
    model = _model_with(tmp_path, [ConvMeasurement(STRIDED.key, DENSE_BLOCK, 1.0, 9e-6),
                                   ConvMeasurement(STRIDED.key, wide, 1.0, 6e-6),
                                   ConvMeasurement(STRIDED.key, wide, 0.5, 1e-6)])  # a 32x16 sparse time: not dense
    assert {block: p.seconds for block, p in model.dense_conv_options(STRIDED).items()} == \
        {schedule.DENSE_BLOCK: pytest.approx(9e-6), wide: pytest.approx(6e-6)}
    assert model.predict_conv(STRIDED, (8, 8), 0.0).seconds == pytest.approx(6e-6)
    unmeasured = dataclasses.replace(STRIDED, strides=(1, 1))  # nothing timed: the default's prediction alone
    assert set(model.dense_conv_options(unmeasured)) == {schedule.DENSE_BLOCK}


def test_fill_times_the_convs_grid_once(tmp_path):
    model = _model_with(tmp_path, [])
    model.runner = _ConvRunner()
    timed = model.fill([], blocks=[(8, 8), (1, 4)], densities=[0.2, 0.5], progress=False, convs=[STRIDED, STRIDED])
    assert timed == 2 + 2 * 2 and model.runner.layers == []  # the dense kernel in each of its block shapes
    assert sorted(model.runner.convs, key=str)[0] == (STRIDED, DENSE_BLOCK, 1.0)
    assert model.fill([], blocks=[(8, 8), (1, 4)], densities=[0.2, 0.5], progress=False, convs=[STRIDED]) == 0
    again = CostModel(X86, cache=LatencyCache(tmp_path / "c.sqlite", kernel_version="k1", conv_kernel_version="c1"))
    assert again.predict_conv(STRIDED, (1, 4), 0.8) == model.predict_conv(STRIDED, (1, 4), 0.8)
    assert again.predict_conv(STRIDED, (1, 4), 0.8).seconds == pytest.approx(1e-6 + 2e-6)


def test_a_convs_time_sums_its_calls(monkeypatch):
    runner = LocalRunner(X86)
    per_kernel = {"stride_phases": 1e-6, "bsr_conv2d": 3e-6}
    seen = []
    monkeypatch.setattr(runner, "time_kernel", lambda kernel, x_shape: seen.append(x_shape) or per_kernel[kernel.name])
    assert runner.time_conv(STRIDED, (8, 8), 0.5) == pytest.approx(4e-6)
    assert seen[0] == STRIDED.x_shape and seen[1][1] == 4 * STRIDED.x_shape[1]  # the conv reads the 4 phases
    assert runner.time_conv(dataclasses.replace(STRIDED, strides=(1, 1)), DENSE_BLOCK, 1.0) == pytest.approx(3e-6)
    dense = build_conv_calls(X86, STRIDED, DENSE_BLOCK, 1.0)[-1].kernel
    assert sorted(dense.constants[0].shape[1:]) == sorted(bsr.DENSE_BLOCK)  # the dense conv: the dense kernel's blocks


def test_the_search_costs_convs_by_their_own_kernels():
    class Costs:
        def predict(self, out, in_, m, block, sparsity):
            return dataclasses.make_dataclass("P", ["seconds", "source"])(1.0, "analytical")

        def predict_conv(self, conv, block, sparsity):
            return dataclasses.make_dataclass("P", ["seconds", "source"])(conv.out * (1 - sparsity), "measured")

    ir = lift(zoo.cnn(), {"x": [1, 3, 16, 16]})
    fn = latency.layer_latency(Costs())
    by_weight = {layer.weight: layer for layer in ir.layers()}
    assert fn(by_weight["strided.weight"], (8, 8), 0.5) == pytest.approx(16.0)
    assert fn(by_weight["fc.weight"], (8, 8), 0.5) == 1.0
    shapes, convs = latency.measured_shapes(ir.layers())
    assert shapes == {(10, 48, 1)} and len(convs) == sum(layer.op_type == "Conv" for layer in ir.layers())


def test_the_cost_models_conv_geometry_is_what_the_artifact_builds(monkeypatch):
    # every Conv the artifact lowers through conv_lowering is, argument for argument, the ConvShape
    # that the cost model times for its layer
    from pruneaug.codegen import relax_build

    built = []
    real = conv_lowering.conv_calls

    def spy(target, x_shape, w2d, block, kernel_hw, strides, pads, dilations, **kwargs):
        if kwargs.get("name") == "grouped_conv2d":  # a grouped conv: not a prunable layer, nothing to predict
            return real(target, x_shape, w2d, block, kernel_hw, strides, pads, dilations, **kwargs)
        built.append(ConvShape(w2d.shape[0], tuple(x_shape), tuple(kernel_hw), tuple(strides), tuple(pads),
                               tuple(dilations)))
        return real(target, x_shape, w2d, block, kernel_hw, strides, pads, dilations, **kwargs)

    monkeypatch.setattr(conv_lowering, "conv_calls", spy)
    for model, shape in [(zoo.cnn(), [2, 3, 16, 16]),
                         (single_conv([1, 5, 11, 10], 8, (3, 3), strides=[2, 2], auto_pad="SAME_LOWER"), [1, 5, 11, 10])]:
        built.clear()
        relax_build.build_model(model, {}, X86, {"x": shape})
        ir = lift(model, {"x": shape})
        assert sorted(built, key=str) == sorted((latency.conv_shape(layer) for layer in ir.layers()
                                                 if layer.op_type == "Conv"), key=str)


def test_a_conv_timed_slower_than_a_denser_one_is_timed_again(tmp_path):
    model = _model_with(tmp_path, [])
    slow = (STRIDED, (8, 8), 0.2)  # read 3x slow once: slower than density 0.5 of the same block
    model.runner = _ConvRunner(slow_point=slow)
    assert model.fill([], blocks=[(8, 8)], densities=[0.2, 0.5], progress=False, convs=[STRIDED]) == 4
    assert model.runner.convs.count(slow) == 2 and len(model.runner.convs) == 5  # only the outlier again
    assert model.predict_conv(STRIDED, (8, 8), 0.8).seconds == pytest.approx(1e-6 + 2e-6)  # the faster time kept

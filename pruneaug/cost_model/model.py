"""The combined latency predictor: measured where cached, fitted where measured nearby, else analytical.

    >>> model = CostModel("x86", measure="local")
    >>> model.fill([(768, 768, 128), (3072, 768, 128)])        # measure what the cache lacks
    >>> model.predict(768, 768, 128, (8, 8), 0.9)
    Prediction(seconds=3.1e-05, source='fitted')
    >>> model.predict_grid(768, 768, 128, [(1, 1), (8, 8)], [0.0, 0.5, 0.9]).shape
    (2, 3)

Sparsity 0 means the layer stays dense, so its figure is the dense kernel's, whatever the block.
A Conv is predicted by `predict_conv` from the times of its own kernels at its own geometry
(`conv_shape.ConvShape`, filled like the matmul grid), piecewise linear between the timed densities
at which its kernel runs the way it would at the asked one (on the thread pool or not): its im2col
matmul's kernel had ranked the bundled CNN's plans in the wrong order.
Each prediction says where it came from: `measured` (this exact kernel is in the cache), `fitted`
(the analytical model with parameters fitted to this target's and block shape's measurements; for a
Conv, the line between its own timed densities) or `analytical` (datasheet parameters only). Once
the cache is warm nothing here compiles anything: a
prediction is a dictionary lookup or a few numpy operations. On the host, figures are for the
threads TVM runs with (TVM_NUM_THREADS, else every core): the profile's `cores` say so, and they
are part of the cache key (`measured.running_profile`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from pruneaug.codegen import schedule
from pruneaug.cost_model import analytical
from pruneaug.cost_model.cache import (DENSE_BLOCK, ConvMeasurement, LatencyCache, Measurement, density_key, open_cache,
                                       record_key)
from pruneaug.cost_model.conv_shape import ConvShape
from pruneaug.cost_model.measured import STABLE_SPREAD, DeviceLost, make_runner, running_profile
from pruneaug.cost_model.targets import TargetProfile, resolve_target
from pruneaug import options
from pruneaug.errors import OptionError
from pruneaug.options import parse_blocks

DEFAULT_BLOCKS = tuple(parse_blocks(options.DEFAULT_BLOCKS))
DEFAULT_DENSITIES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
MIN_FIT_POINTS = 6  # fewer measurements than this for a block shape: stay analytical
RECHECK_ERROR = 0.25  # a new time this far from the fit is timed again
FIT_RECORD = "fit"  # the cache's records of fitted parameters
SOURCES = ("measured", "fitted", "analytical")
DENSE_SWITCH_GAIN = 0.95  # a dense kernel in another block shape serves a layer where it measured at most this
# share of the default's time: a few percent is run-to-run noise here, and a plan should not turn on it


@dataclass(frozen=True)
class Prediction:
    """A latency in seconds and where it came from (one of SOURCES)."""

    seconds: float
    source: str

    def __float__(self) -> float:
        return self.seconds


def as_block(block) -> tuple[int, int]:
    """(rows, cols) from a tuple, a `BlockSpec` or text like "8x8"."""
    if isinstance(block, str):
        from pruneaug.ir.layer import BlockSpec

        return BlockSpec.parse(block).shape
    if hasattr(block, "shape") and hasattr(block, "rows"):
        return tuple(block.shape)
    rows, cols = block
    return int(rows), int(cols)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise OptionError(f"sparsity {sparsity}: must be in [0, 1)")


class CostModel:
    """Latency predictions for one target, backed by the latency cache and (optionally) a runner."""

    def __init__(self, target: TargetProfile | str, measure: str = "none", cache: LatencyCache | None = None):
        self.target = running_profile(resolve_target(target) if isinstance(target, str) else target)
        self.cache = cache or open_cache()
        self.runner = make_runner(self.target, measure, self.cache)
        self._measured: dict[tuple, float] = {}
        self._by_block: dict[tuple[int, int], dict[tuple, Measurement]] = {}
        self._fitted: dict[tuple[int, int], analytical.Params | None] = {}
        self._defaults: dict[bool, analytical.Params] = {}
        self._conv_measured: dict[tuple[str, tuple[int, int]], dict[float, float]] = {}
        for row in self.cache.all(self.target.cache_key):
            self._remember(row)
        for conv_row in self.cache.all_conv(self.target.cache_key):
            self._remember_conv(conv_row)

    @classmethod
    def from_measurements(cls, target: TargetProfile, rows: Iterable[Measurement]) -> "CostModel":
        """A model that knows only `rows`, kept in memory: for held-out evaluation of the fit."""
        cache = LatencyCache(":memory:")
        cache.put_many(target.cache_key, list(rows))
        return cls(target, cache=cache)

    # --- what is known --------------------------------------------------------------------

    def _remember(self, row: Measurement) -> None:
        block = tuple(row.block)
        key = (row.out, row.in_, row.m, block, density_key(row.density))
        self._measured[key] = row.seconds
        self._by_block.setdefault(block, {})[key] = row
        self._fitted.pop(block, None)

    def _remember_conv(self, row: ConvMeasurement) -> None:
        self._conv_measured.setdefault((row.conv, tuple(row.block)), {})[density_key(row.density)] = row.seconds

    def params(self, block: tuple[int, int]) -> tuple[analytical.Params, str]:
        """The parameters used for `block` ((0, 0): dense) and their source."""
        block = tuple(block)
        if block not in self._fitted:
            # in one order however they came (timed now, or read back from the cache): the same fit to the
            # last bit, so a warm compile ranks near-equal plans as the cold one did
            rows = sorted(self._by_block.get(block, {}).values(), key=lambda r: (r.out, r.in_, r.m, r.density))
            fitted = None
            if len(rows) >= MIN_FIT_POINTS:
                out, in_, m, density, seconds = (np.array(column, dtype=np.float64) for column in
                                                 zip(*[(r.out, r.in_, r.m, r.density, r.seconds) for r in rows]))
                feats = analytical.features(self.target, out, in_, m, block, density)
                fitted = self._fit(feats, seconds, self._default(block))
            self._fitted[block] = fitted
        fitted = self._fitted[block]
        return (fitted, "fitted") if fitted is not None else (self._default(block), "analytical")

    def _fit(self, feats: np.ndarray, seconds: np.ndarray, start: analytical.Params) -> analytical.Params:
        """`analytical.fit`, kept in the cache file (table `records`) under a key of its inputs and of
        the model's source: a warm compile of BERT-base spent 1.6 s re-fitting the same measurements.
        A damaged record is fitted again and replaced."""
        key = record_key([Path(analytical.__file__).read_bytes(), np.ascontiguousarray(feats, np.float64).data,
                          np.ascontiguousarray(seconds, np.float64).data, start.array().data])
        stored = self.cache.get_record(FIT_RECORD, key)
        if stored is not None:
            try:
                return analytical.Params.from_array(np.array(json.loads(stored), dtype=np.float64))
            except (TypeError, ValueError):  # not a list of the parameters: fit again and replace it
                pass
        fitted = analytical.fit(feats, seconds, start)
        self.cache.put_record(FIT_RECORD, key, json.dumps(fitted.array().tolist()))
        return fitted

    def _default(self, block: tuple[int, int]) -> analytical.Params:
        dense = tuple(block) == DENSE_BLOCK
        if dense not in self._defaults:
            self._defaults[dense] = analytical.default_params(self.target, dense)
        return self._defaults[dense]

    # --- predicting ---------------------------------------------------------------------------

    def predict(self, out: int, in_: int, m: int, block, sparsity: float, layout: str | None = None) -> Prediction:
        """Seconds for one layer; sparsity 0 is the dense kernel (in its faster block shape, `faster_dense`).
        `layout` forces a matmul layout of the target (`analytical.features`); a time measured in the layout
        the shape gets by itself is not used then."""
        _check_sparsity(sparsity)
        if sparsity == 0 and layout is None:
            return faster_dense(self.dense_options(out, in_, m))[1]
        block, density = (DENSE_BLOCK, 1.0) if sparsity == 0 else (as_block(block), 1.0 - sparsity)
        return self._predict_point(out, in_, m, block, density, layout)

    def _predict_point(self, out: int, in_: int, m: int, block: tuple[int, int], density: float,
                       layout: str | None = None) -> Prediction:
        hit = None if layout is not None else self._measured.get((out, in_, m, block, density_key(density)))
        if hit is not None:
            return Prediction(hit, "measured")
        params, source = self.params(block)
        feats = analytical.features(self.target, out, in_, m, block, density, layout)
        return Prediction(float(analytical.latency_from_features(params, feats)), source)

    def dense_options(self, out: int, in_: int, m: int) -> dict[tuple[int, int], Prediction]:
        """The dense kernel's time in each block shape it may be built in (`schedule.dense_blocks`), keyed by
        that shape: the default's as any kernel's, the others' where measured only (the analytical model
        cannot tell such near twins apart)."""
        return self._dense_options(self._predict_point(out, in_, m, DENSE_BLOCK, 1.0),
                                   lambda block: self._measured.get((out, in_, m, block, density_key(1.0))))

    def _dense_options(self, default: Prediction,
                       measured: Callable[[tuple[int, int]], float | None]) -> dict[tuple[int, int], Prediction]:
        options = {schedule.DENSE_BLOCK: default}
        for block in schedule.dense_blocks(self.target)[1:]:
            seconds = measured(block)
            if seconds is not None:
                options[block] = Prediction(seconds, "measured")
        return options

    def predict_conv(self, conv: ConvShape, block, sparsity: float) -> Prediction:
        """Seconds of one Conv layer from its own kernels' times (`conv_shape`): `measured` at a timed
        density, `fitted` between timed densities (piecewise linear in the density: a conv kernel's
        work is its kept blocks; `_interpolate_conv`), else its im2col matmul's prediction (nothing of
        this conv timed: in the conv kernel's own layout where that is a matmul layout too, as CUDA's split
        layout, which convs whose threads cannot fill the GPU take at far more than the matmul's 16 rows).
        Sparsity 0 is the dense kernel in its faster block shape (`faster_dense`)."""
        _check_sparsity(sparsity)
        if sparsity == 0:
            return faster_dense(self.dense_conv_options(conv))[1]
        return self._predict_conv_point(conv, as_block(block), 1.0 - sparsity)

    def _predict_conv_point(self, conv: ConvShape, block: tuple[int, int], density: float) -> Prediction:
        timed = self._conv_measured.get((conv.key, block), {})
        if density_key(density) in timed:
            return Prediction(timed[density_key(density)], "measured")
        if len(timed) >= 2:
            return Prediction(self._interpolate_conv(conv, block, timed, density), "fitted")
        return self._predict_point(*conv.matmul, block, density, _conv_matmul_layout(self.target, conv, block, density))

    def dense_conv_options(self, conv: ConvShape) -> dict[tuple[int, int], Prediction]:
        """`dense_options` of one Conv, from its own kernels' times."""
        return self._dense_options(self._predict_conv_point(conv, DENSE_BLOCK, 1.0),
                                   lambda block: self._conv_measured.get((conv.key, block), {}).get(density_key(1.0)))

    def _interpolate_conv(self, conv: ConvShape, block: tuple[int, int], timed: dict[float, float],
                          density: float) -> float:
        """`_piecewise_linear` among the timed densities at which the conv kernel runs as it would at
        `density`: on the thread pool or on the calling thread (`schedule.runs_parallel`, from its kept
        blocks). Its time steps where that changes, and a line between points on either side of the
        step missed by up to 40% (the bundled CNN's convs at batch 1 change between 0.1 and 0.3).
        Where one timed density runs that way: its time, scaled by the kept blocks above it (a strided conv's
        phase split does not shrink, so this errs high); none: every point."""
        if self.target.kind == "cuda":
            return _piecewise_linear(timed, density)
        way = _conv_runs_parallel(self.target, conv, block, density)
        alike = {d: t for d, t in timed.items() if _conv_runs_parallel(self.target, conv, block, d) == way}
        if len(alike) == 1:
            [(d, seconds)] = alike.items()
            return seconds * max(density / d, 1.0)
        return _piecewise_linear(alike or timed, density)

    def predict_grid(self, out: int, in_: int, m: int, blocks: Iterable, sparsities: Iterable[float]) -> np.ndarray:
        """Seconds for every (block, sparsity) of one layer, shape (len(blocks), len(sparsities)).

        Cached measurements take precedence over the model, as in `predict`.
        """
        sparsities = np.asarray(list(sparsities), dtype=np.float64)
        for sparsity in sparsities:
            _check_sparsity(float(sparsity))
        blocks = [as_block(b) for b in blocks]
        dense = self.predict(out, in_, m, DENSE_BLOCK, 0.0).seconds
        grid = np.empty((len(blocks), len(sparsities)))
        for i, block in enumerate(blocks):
            params, _ = self.params(block)
            grid[i] = analytical.latency_from_features(
                params, analytical.features(self.target, out, in_, m, block, 1.0 - sparsities))
            for j, sparsity in enumerate(sparsities):
                hit = self._measured.get((out, in_, m, block, density_key(1.0 - sparsity)))
                if hit is not None:
                    grid[i, j] = hit
        grid[:, sparsities == 0] = dense
        return grid

    # --- measuring ----------------------------------------------------------------------------

    def _require_runner(self):
        if self.runner is None:
            raise OptionError(f"--measure none: target {self.target.name} has no runner to measure with")
        return self.runner

    def measure(self, out: int, in_: int, m: int, block, sparsity: float) -> float:
        """Measured seconds for one layer (from the cache, or timed now and cached)."""
        _check_sparsity(sparsity)
        block, density = (DENSE_BLOCK, 1.0) if sparsity == 0 else (as_block(block), 1.0 - sparsity)
        hit = self._measured.get((out, in_, m, block, density_key(density)))
        if hit is not None:
            return hit
        return self._time_point(self._require_runner(), out, in_, m, block, density)

    def _time_point(self, runner, out: int, in_: int, m: int, block: tuple[int, int], density: float,
                    keep_faster: bool = False) -> float:
        """Time one kernel and cache it; `keep_faster` keeps an earlier, faster time of it."""
        seconds = runner.time_layer(out, in_, m, block, density)
        if keep_faster:
            seconds = min(seconds, self._measured.get((out, in_, m, block, density_key(density)), seconds))
        row = Measurement(out, in_, m, block, density_key(density), seconds)  # as the cache keeps it
        self.cache.put_many(self.target.cache_key, [row], device=runner.device)
        self._remember(row)
        return seconds

    def missing(self, shapes: Iterable[tuple[int, int, int]], blocks=DEFAULT_BLOCKS,
                densities=DEFAULT_DENSITIES) -> list[tuple[int, int, int, tuple[int, int], float]]:
        """The (out, in, m, block, density) points of the grid (plus each dense kernel) not yet cached."""
        points, grid = [], _grid(self.target, blocks, densities)
        for out, in_, m in dict.fromkeys(tuple(s) for s in shapes):
            for block, density in grid:
                if (out, in_, m, block, density_key(density)) not in self._measured:
                    points.append((out, in_, m, block, density))
        return points

    def missing_convs(self, convs: Iterable[ConvShape], blocks=DEFAULT_BLOCKS,
                      densities=DEFAULT_DENSITIES) -> list[tuple[ConvShape, tuple[int, int], float]]:
        """The (conv, block, density) points of the grid (plus each dense conv) not yet cached."""
        points, grid = [], _grid(self.target, blocks, densities)
        for conv in dict.fromkeys(convs):
            for block, density in grid:
                if density_key(density) not in self._conv_measured.get((conv.key, block), {}):
                    points.append((conv, block, density))
        return points

    def fill(self, shapes: Iterable[tuple[int, int, int]], blocks=DEFAULT_BLOCKS, densities=DEFAULT_DENSITIES,
             progress: bool = True, recheck: bool = True, convs: Iterable[ConvShape] = ()) -> int:
        """Measure every grid point the cache lacks for these layer shapes and Convs (their own kernels,
        `predict_conv`); returns how many were timed.

        With `recheck`, the new times that the fitted model misses by more than RECHECK_ERROR are
        timed once more and the faster time kept: a kernel timed while another process held a core
        reads slow, and the fit (robust to a few such points) singles it out.
        A device lost mid-way ends the filling with a warning naming it; predictions then come
        from what was measured so far and the analytical model.
        """
        todo = self.missing(shapes, blocks, densities)
        conv_todo = self.missing_convs(convs, blocks, densities)
        if not todo and not conv_todo:
            return 0
        unsettled_before = getattr(self._require_runner(), "unsettled", 0)
        done = self._time_points(todo, "measuring", progress, lambda point: self._time_point(self.runner, *point),
                                 _matmul_label)
        if recheck and self.runner is not None:
            self._time_points(self._suspects(todo), "re-measuring outliers", progress,
                              lambda point: self._time_point(self.runner, *point, keep_faster=True), _matmul_label)
        if self.runner is not None:
            done += self._time_points(conv_todo, "measuring conv", progress,
                                      lambda point: self._time_conv_point(self.runner, *point), _conv_label)
        if recheck and self.runner is not None:
            self._time_points(self._conv_suspects(conv_todo), "re-measuring conv outliers", progress,
                              lambda point: self._time_conv_point(self.runner, *point, keep_faster=True), _conv_label)
        unsettled = getattr(self.runner, "unsettled", 0) - unsettled_before
        if unsettled > 0:
            warnings.warn(f"{unsettled} kernels' samples never agreed within {STABLE_SPREAD:.0%} (a loaded or "
                          f"noisy machine): their figures are fallbacks, less repeatable than the rest "
                          f"(cache {self.cache.path})",
                          RuntimeWarning, stacklevel=2)
        return done

    def _time_conv_point(self, runner, conv: ConvShape, block: tuple[int, int], density: float,
                         keep_faster: bool = False) -> float:
        """Time one Conv's kernels and cache the sum; `keep_faster` keeps an earlier, faster time of it."""
        seconds = runner.time_conv(conv, block, density)
        if keep_faster:
            seconds = min(seconds, self._conv_measured.get((conv.key, block), {}).get(density_key(density), seconds))
        row = ConvMeasurement(conv.key, block, density, seconds)
        self.cache.put_conv(self.target.cache_key, [row], device=runner.device)
        self._remember_conv(row)
        return row.seconds

    def _time_points(self, points: list, what: str, progress: bool, time_one: Callable[[tuple], float],
                     label: Callable[[tuple], str]) -> int:
        """`time_one` each of `points` with a progress bar; a lost device ends it with a warning."""
        done = 0
        bar = tqdm(points, desc=f"{what} {self.target.name} kernels", unit="kernel", disable=not progress or not points)
        try:
            for point in bar:
                bar.set_postfix_str(label(point), refresh=False)
                time_one(point)
                done += 1
        except DeviceLost as err:
            warnings.warn(f"device {err.device} stopped answering after {done} of {len(points)} measurements "
                          f"({err}); using predictions for the rest", RuntimeWarning, stacklevel=3)
            self.runner = None
        finally:
            bar.close()
        return done

    def _conv_suspects(self, points: list) -> list:
        """The timed Conv points slower by more than RECHECK_ERROR than a denser point of the same conv and
        block: more kept blocks never make a conv's kernels faster, so the sparser one read slow under load
        (there is no fitted model to single it out, as `_suspects` does for matmuls)."""
        suspects = []
        for conv, block, density in points:
            timed = self._conv_measured.get((conv.key, block), {})
            seconds = timed.get(density_key(density))
            denser = [t for d, t in timed.items() if d > density_key(density)]
            if seconds is not None and denser and seconds > (1 + RECHECK_ERROR) * min(denser):
                suspects.append((conv, block, density))
        return suspects

    def _suspects(self, points: list) -> list:
        """The measured points that their block shape's fitted model misses by more than RECHECK_ERROR."""
        suspects = []
        for out, in_, m, block, density in points:
            params, source = self.params(block)
            seconds = self._measured.get((out, in_, m, block, density_key(density)))
            if source != "fitted" or seconds is None:
                continue
            feats = analytical.features(self.target, out, in_, m, block, density)
            if abs(seconds / float(analytical.latency_from_features(params, feats)) - 1.0) > RECHECK_ERROR:
                suspects.append((out, in_, m, block, density))
        return suspects


def _grid(target: TargetProfile, blocks, densities) -> list[tuple[tuple[int, int], float]]:
    """The (block, density) points `fill` times for a layer: the dense kernel in each of its block shapes
    (`schedule.dense_blocks`; the default's key is block (0, 0), another's its shape at density 1), then
    every block at every density."""
    dense = [(DENSE_BLOCK, 1.0)] + [(block, 1.0) for block in schedule.dense_blocks(target)[1:]]
    return list(dict.fromkeys(dense + [(as_block(b), float(d)) for b in blocks for d in densities]))


def faster_dense(options: Mapping[tuple[int, int], Prediction]) -> tuple[tuple[int, int], Prediction]:
    """The dense kernel's block shape for a layer and its time, from `dense_options` (summed over a shared
    weight's readers): another shape than the default only where it took at most DENSE_SWITCH_GAIN of its time."""
    default = options[schedule.DENSE_BLOCK]
    block, fastest = min(options.items(), key=lambda item: item[1].seconds)
    if fastest.seconds <= DENSE_SWITCH_GAIN * default.seconds:
        return block, fastest
    return schedule.DENSE_BLOCK, default


def _matmul_label(point: tuple) -> str:
    out, in_, m, block, density = point
    return f"{out}x{in_} m={m} {block[0]}x{block[1]} d={density:g}"


def _conv_label(point: tuple) -> str:
    conv, block, density = point
    return f"conv {conv.key} {block[0]}x{block[1]} d={density:g}"


def _conv_runs_parallel(target: TargetProfile, conv: ConvShape, block: tuple[int, int], density: float) -> int:
    """Whether the conv's kernel takes the thread pool at `density` (as `codegen.conv` decides it: its output
    pixels and the kept blocks of its im2col weight, which the stride-phase split keeps as they are)."""
    out, in_, pixels = conv.matmul
    return schedule.runs_parallel(target, pixels, block, int(analytical.kept_blocks(out, in_, block, density)))


def _conv_matmul_layout(target: TargetProfile, conv: ConvShape, block: tuple[int, int], density: float) -> str | None:
    """The layout the conv's kernel runs its im2col product in, where that is a matmul layout other than
    the one its im2col matmul would get by itself (else None)."""
    out, in_, pixels = conv.matmul
    block = schedule.DENSE_BLOCK if tuple(block) == DENSE_BLOCK else tuple(block)
    kept = int(analytical.kept_blocks(out, in_, block, density))
    own = schedule.conv_schedule(target, conv.out_hw, block, pixels, kept, out_c=out, kernel_hw=conv.kernel).layout
    if own == "cuda":  # a thread per (output channel, pixel): not the matmul's threads along m
        pointwise = tuple(conv.kernel) == (1, 1) and not any(conv.pads)
        return analytical.CUDA_POINTWISE_CONV_LAYOUT if pointwise else analytical.CUDA_CONV_LAYOUT
    as_matmul = schedule.kernel_schedule(target, pixels, out, in_, block, kept).layout
    return own if own in analytical.MATMUL_LAYOUTS and own != as_matmul else None


def _piecewise_linear(timed: dict[float, float], density: float) -> float:
    """Seconds at `density` from the times at other densities: linear between the nearest two; above
    the densest, the line through the last two (more kept blocks, more work); below the sparsest, its
    time (nothing says a sparser conv gets faster than that)."""
    xs = sorted(timed)
    ys = [timed[x] for x in xs]
    if density <= xs[0]:
        return ys[0]
    if density <= xs[-1]:
        return float(np.interp(density, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + max(slope, 0.0) * (density - xs[-1])


_MODELS: dict[tuple, CostModel] = {}


def cost_model(target: TargetProfile | str, measure: str = "none") -> CostModel:
    """One shared `CostModel` per (target, measure, cache file) in this process."""
    profile = running_profile(resolve_target(target) if isinstance(target, str) else target)
    cache = open_cache()
    key = (profile.cache_key, measure, str(cache.path))
    if key not in _MODELS:
        _MODELS[key] = CostModel(profile, measure, cache)
    return _MODELS[key]


def predict(target: TargetProfile | str, out: int, in_: int, m: int, block, sparsity: float,
            measure: str = "none") -> Prediction:
    """Predicted seconds of one layer on `target` (see `CostModel.predict`)."""
    return cost_model(target, measure).predict(out, in_, m, block, sparsity)


def measure(target: TargetProfile | str, out: int, in_: int, m: int, block, sparsity: float,
            measure: str = "local") -> float:
    """Measured seconds of one layer on `target` (cached; see `CostModel.measure`)."""
    return cost_model(target, measure).measure(out, in_, m, block, sparsity)

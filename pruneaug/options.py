"""Parsing and checking what a user asks for, shared by the CLI and the Python API.

Every check raises OptionError naming the option, so `--block 4x` and `compile(block="4x")`
fail the same way.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from pruneaug.errors import OptionError
from pruneaug.ir.layer import BlockSpec

# 16x1: a column of 16 output rows, one AVX-512 vector (the kernels' "chanvec" and "rowvec" layouts). At 90%
# (`tools/bench_kernels.py --part conv`, two runs) it ran ResNet-like convs 1.0-2.6x faster than 4x1, and
# 0.4-1.3x as fast as 16x16 (faster on 1x1 convs, slower on 3x3 ones on small maps); finer than 16x16, it keeps
# more of the weights that matter at one sparsity: a shape to mix with the others. The bundled encoder's chosen
# plan mixes it with 16x16 and 8x8: 24.6 µs at 92.6% sparsity, against 31.3 µs at 87.2% with 16x16 alone before
# (`tools/bench_plans.py`, two runs, floors 18.0 and 17.8 µs)
DEFAULT_BLOCKS = "1x1,1x4,4x1,16x1,8x8,16x16,32x32"
DEFAULT_SPARSITIES = "0:0.95:0.05"
DEFAULT_BUDGET = 0.01  # largest metric loss: 1% top-1 accuracy by default
PRUNERS = ("magnitude", "activation")
METRICS = ("top1", "cosine", "relerr")


def parse_block(text: str) -> tuple[int, int]:
    return BlockSpec.parse(text).shape


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """`--blocks 1x1,8x8,...`: a non-empty list of block shapes, duplicates dropped, order kept."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise OptionError(f"--blocks {text!r}: give at least one block shape, e.g. 1x1,8x8")
    try:
        return list(dict.fromkeys(parse_block(item) for item in items))
    except OptionError as err:
        raise OptionError(f"--blocks {text!r}: {err}") from None


def parse_sparsity(value: float | str, option: str = "--sparsity") -> float:
    try:
        sparsity = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{option} {value!r}: not a number") from None
    if not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
        raise OptionError(f"{option} {value!r}: must be in [0, 1)")
    return sparsity


def parse_sparsities(text: str) -> list[float]:
    """`--sparsities`: a comma list whose items are sparsities or `start:stop:step` ranges (stop included when
    the step reaches it), e.g. `0:0.9:0.1,0.95,0.97,0.99` for a finer grid where a layer has weight to spare."""
    option = "--sparsities"
    values = [value for item in text.split(",") if item.strip() for value in _sparsity_item(item.strip(), text)]
    if not values:
        raise OptionError(f"{option} {text!r}: no sparsity given")
    return sorted(set(values))


def _sparsity_item(item: str, text: str) -> list[float]:
    """One item of `--sparsities` `text`: a sparsity, or the sparsities of a `start:stop:step` range."""
    option = "--sparsities"
    if ":" not in item:
        return [parse_sparsity(item, option)]
    parts = item.split(":")
    if len(parts) != 3:
        raise OptionError(f"{option} {text!r}: {item!r} is not START:STOP:STEP; expected ranges and sparsities, "
                          "comma-separated")
    start, stop = parse_sparsity(parts[0], option), parse_sparsity(parts[1], option)
    try:
        step = float(parts[2])
    except ValueError:
        raise OptionError(f"{option} {text!r}: step {parts[2]!r} is not a number") from None
    if not step > 0 or stop < start:
        raise OptionError(f"{option} {text!r}: {item!r} needs STEP > 0 and STOP >= START")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_budget(value: float | str) -> float:
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"--budget {value!r}: not a number") from None
    if not (0.0 < budget < 1.0):
        raise OptionError(f"--budget {value!r}: must be in (0, 1)")
    return budget


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise OptionError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    return value


def parse_shapes(given: Mapping[str, Sequence[int]] | Iterable[str] | None) -> dict[str, list[int]]:
    """`--shape NAME=DxDx...` (repeatable), or the API's `{name: [d, ...]}`: the full static shape an input
    is compiled for. Whether the model's input takes it is checked against the model (`compile.deploy_shapes`)."""
    if given is None:
        return {}
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, Mapping):
        pairs = {}
        for text in given:
            name, sep, dims = str(text).rpartition("=")
            if not sep or not name:
                raise OptionError(f"--shape {text!r}: expected NAME=DIMS, e.g. input=1x128x768")
            try:
                pairs[name] = [int(d) for d in dims.lower().split("x")]
            except ValueError:
                raise OptionError(f"--shape {text!r}: dimensions are positive integers joined by 'x'") from None
        given = pairs
    shapes = {}
    for name, dims in given.items():
        dims = list(dims)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise OptionError(f"--shape {name}={'x'.join(map(str, dims))}: dimensions are positive integers")
        shapes[str(name)] = dims
    return shapes

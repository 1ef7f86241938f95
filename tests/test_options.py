"""`--sparsities`: the search's grid, as ranges and single sparsities."""
from __future__ import annotations

import pytest

from pruneaug.errors import OptionError
from pruneaug.options import DEFAULT_SPARSITIES, parse_sparsities


def test_the_default_grid_is_every_twentieth_up_to_95_percent():
    assert parse_sparsities(DEFAULT_SPARSITIES) == [round(0.05 * i, 2) for i in range(20)]


def test_ranges_and_sparsities_mix_sorted_without_repeats():
    assert parse_sparsities("0.99,0:0.9:0.3,0.97,0.9") == [0.0, 0.3, 0.6, 0.9, 0.97, 0.99]
    assert parse_sparsities("0.5, 0.9") == [0.5, 0.9]


@pytest.mark.parametrize("text, message", [
    ("0.5:0.1:0.1", "'0.5:0.1:0.1' needs STEP > 0 and STOP >= START"),
    ("0:0.9:0", "'0:0.9:0' needs STEP > 0"),
    ("0:0.9", "'0:0.9' is not START:STOP:STEP"),
    ("0:0.9:0.1,0.5:x:0.1", "--sparsities 'x': not a number"),
    ("0:0.9:step", "step 'step' is not a number"),
    ("0.5,1", "--sparsities '1': must be in [0, 1)"),
    (" , ", "no sparsity given"),
])
def test_a_bad_grid_names_the_item_at_fault(text, message):
    with pytest.raises(OptionError) as caught:
        parse_sparsities(text)
    assert message in str(caught.value)

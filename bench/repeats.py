"""Merging the figures of repeated benchmark runs (`--repeats`)."""

from __future__ import annotations

import statistics


def median_of(values: list, digits: int = 3):
    """The runs' figures merged: each number the median over the runs (ratios too, so a
    ratio is the median of the ratios taken within each run), anything else the first run's."""
    first = values[0]
    if isinstance(first, dict):
        return {key: median_of([value.get(key) for value in values], digits) for key in first}
    numbers = [value for value in values if isinstance(value, int | float) and not isinstance(value, bool)]
    if len(numbers) == len(values):
        return round(statistics.median(numbers), digits)
    return first

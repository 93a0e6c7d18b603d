"""POST /reader's body mirrors the worker settings it may change (shared/supervision.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import DEVICES, DTYPES, WorkerSettings, declared
from shared.supervision import ReaderSpec


def test_reader_spec_takes_the_worker_settings_ranges_and_choices():
    by_attribute = {one.attribute: one for one in declared(WorkerSettings)}
    for attribute in ("max_batch_size", "batch_duration_millis", "threads"):
        minimum = by_attribute[attribute].minimum
        assert getattr(ReaderSpec(**{attribute: minimum}), attribute) == minimum
        with pytest.raises(ValidationError):
            ReaderSpec(**{attribute: minimum - 1})
    for attribute, choices in (("device", DEVICES), ("dtype", DTYPES)):
        for choice in choices:
            assert getattr(ReaderSpec(**{attribute: choice}), attribute) == choice
        with pytest.raises(ValidationError):
            ReaderSpec(**{attribute: "other"})


def test_reader_spec_leaves_unset_what_serve_decides_and_describes_each_field():
    spec = ReaderSpec()
    assert spec.consumer_group == WorkerSettings(redis_url="x").consumer_group
    assert spec.max_batch_size is spec.device is spec.threads is None
    properties = ReaderSpec.model_json_schema()["properties"]
    assert "--max-batch-size" in properties["max_batch_size"]["description"]
    assert all(field.get("description") for field in properties.values())

from __future__ import annotations

from worker.stats import StatsRecorder


def test_steps_and_requests_are_counted_with_cumulative_row_buckets():
    stats = StatsRecorder()
    for rows in (1, 3, 3, 8, 200):
        stats.record_step(rows=rows, tokens=rows, seconds=0.01)
    stats.record_request(failed=False)
    stats.record_request(failed=True)
    snapshot = stats.snapshot()
    assert snapshot.decode_steps == 5 and snapshot.tokens_generated == 215 and snapshot.rows_sum == 215
    assert snapshot.requests_finished == 1 and snapshot.requests_failed == 1
    assert snapshot.rows_per_step["1"] == 1
    assert snapshot.rows_per_step["2"] == 1
    assert snapshot.rows_per_step["4"] == 3
    assert snapshot.rows_per_step["8"] == 4
    assert snapshot.rows_per_step["128"] == 4
    assert snapshot.rows_per_step["+Inf"] == 5

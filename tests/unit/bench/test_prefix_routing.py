"""The prefix-routing benchmark's arithmetic (bench/prefix_routing.py)."""

from __future__ import annotations

from bench.prefix_routing import TOPICS, hit_rate, opening, topic_of


def test_the_hit_rate_counts_turns_after_the_first():
    turns = [
        {"prompt_tokens": 100, "cached_tokens": 0},
        {"prompt_tokens": 200, "cached_tokens": 100},
        {"prompt_tokens": 300, "cached_tokens": 200},
    ]
    assert hit_rate(turns) == 0.6
    assert hit_rate(turns[:1]) is None
    assert hit_rate([turns[0], {"prompt_tokens": 50, "cached_tokens": None}]) is None


def test_every_conversation_opens_with_its_own_message():
    topics = [topic_of(index) for index in range(2 * len(TOPICS))]
    assert len(set(topics)) == len(topics)
    assert len({opening(topic) for topic in topics}) == len(topics)

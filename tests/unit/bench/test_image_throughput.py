"""The image bench's pure helpers (no server started)."""

import pytest
import requests

from bench.image_throughput import checked, image_tokens_added, log_lines, prompt_tokens


def test_image_tokens_added_is_the_prompt_difference_and_refuses_a_shorter_image_prompt():
    assert image_tokens_added(22, 6) == 16
    assert image_tokens_added(6, 6) == 0
    with pytest.raises(ValueError):
        image_tokens_added(5, 6)


def test_prompt_tokens_reads_one_prompts_metadata_as_an_object_or_a_one_element_list():
    row = {"prompt_tokens": 22, "completion_tokens": 1, "finish_reason": "length"}
    assert prompt_tokens({"text": "a", "metadata": row}) == 22
    assert prompt_tokens({"text": ["a"], "metadata": [row]}) == 22
    with pytest.raises(ValueError):
        prompt_tokens({"text": ["a", "b"], "metadata": [row, row]})


def test_checked_keeps_the_servers_answer_in_the_error():
    response = requests.Response()
    response.status_code, response.url = 400, "http://127.0.0.1/image_generate"
    response._content = b'{"error": "invalid_image"}'
    with pytest.raises(requests.HTTPError, match=r"400 from http://127\.0\.0\.1/image_generate: .*invalid"):
        checked(response)
    response.status_code = 200
    assert checked(response) is response


def test_log_lines_are_the_last_non_empty_lines_but_answered_requests_and_readiness_polls():
    assert log_lines("a\n\nb\n  \nc\n", limit=2) == ["b", "c"]
    assert log_lines("") == []
    access = '127.0.0.1 - - [03/Dec/2026:11:17:50 +0000] "{}" {} 104 "-" "python-requests/2.34.2"'
    log = "\n".join(
        [
            access.format("GET /readyz HTTP/1.1", 503),
            access.format("POST /image_generate_stream HTTP/1.1", 200),
            access.format("POST /image_generate HTTP/1.1", 500),
            "2026-12-03 11:17:56,503 ERROR worker failed",
        ]
    )
    assert log_lines(log) == [access.format("POST /image_generate HTTP/1.1", 500), log.splitlines()[-1]]

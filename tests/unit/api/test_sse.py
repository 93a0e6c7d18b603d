import json

from api import sse


def parse_data(frame: str) -> str:
    """What an SSE client makes of one event's data lines."""
    assert frame.endswith("\n\n")
    lines = frame[:-2].split("\n")
    return "\n".join(line.removeprefix("data: ") for line in lines if line.startswith("data:"))


def test_plain_token_is_one_data_line():
    assert sse.token("Hello") == "data: Hello\n\n"


def test_leading_space_survives_the_one_space_a_client_strips():
    assert sse.token(" world") == "data:  world\n\n"
    assert parse_data(sse.token(" world")) == " world"


def test_token_with_newlines_becomes_several_data_lines_of_one_event():
    frame = sse.token("a\nb\n")
    assert frame == "data: a\ndata: b\ndata: \n\n"
    assert parse_data(frame) == "a\nb\n"


def test_token_that_is_only_a_newline():
    assert sse.token("\n") == "data: \ndata: \n\n"
    assert parse_data(sse.token("\n")) == "\n"


def test_carriage_returns_are_line_breaks_too():
    assert sse.token("a\r\nb\rc") == "data: a\ndata: b\ndata: c\n\n"


def test_empty_token_sends_nothing():
    assert sse.token("") == ""
    assert sse.batch_token("", 3) == ""


def test_batch_token_is_json_with_batch_id_on_one_line():
    frame = sse.batch_token("x\ny\r", 2)
    assert frame.count("\n") == 2
    assert frame.startswith("data: ")
    assert json.loads(frame.removeprefix("data: ")) == {"text": "x\ny\r", "batch_id": 2}


def test_batch_token_format_matches_the_takeoff_shape():
    assert sse.batch_token("Hi", 0) == 'data: {"text": "Hi", "batch_id": 0}\n\n'


def test_error_event_is_named_and_json():
    frame = sse.error("worker crashed", "internal_error")
    assert frame == 'event: error\ndata: {"error": "worker crashed", "error_type": "internal_error"}\n\n'


def test_keepalive_is_a_comment():
    assert sse.KEEPALIVE.startswith(":")
    assert sse.KEEPALIVE.endswith("\n\n")

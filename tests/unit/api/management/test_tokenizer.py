"""/tokenize, /detokenize, /chat_template: checked at the API, answered by the reader."""

from __future__ import annotations

from shared import reader_calls
from tests.support.api_fakes import add_reader, serve_one


def test_tokenize_is_answered_by_the_reader(client, connection):
    add_reader(connection)
    received: list = []
    thread = serve_one(connection, {"ok": True, "result": {"tokens": ["▁hi"], "tokens_count": 1}}, received)
    response = client.post("/tokenize/reader-1", json={"text": "hi"})
    thread.join()
    assert response.status_code == 200
    assert response.get_json() == {"tokens": ["▁hi"], "tokens_count": 1}
    assert received == [{"tool": "tokenize", "request": {"text": "hi", "use_chat_template": False}}]


def test_a_reader_refusal_is_relayed_with_its_status(client, connection):
    add_reader(connection)
    thread = serve_one(connection, {"ok": False, "status": 400, "error": "ids out of range"}, [])
    response = client.post("/detokenize/reader-1", json={"tokens": [1, 2]})
    thread.join()
    assert response.status_code == 400
    assert response.get_json()["error"] == "ids out of range"


def test_invalid_bodies_are_422_before_asking_the_reader(client, connection):
    add_reader(connection)
    assert client.post("/chat_template/reader-1", json={"inputs": []}).status_code == 422
    assert client.post("/tokenize/reader-1", json={"text": "x", "extra": 1}).status_code == 422
    assert connection.llen(reader_calls.inbox("reader-1")) == 0


def test_unknown_reader_is_404(client):
    assert client.post("/tokenize/nobody", json={"text": "x"}).status_code == 404

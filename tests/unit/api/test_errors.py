"""Every error is the JSON body {"error", "error_type"}; the unexpected ones are logged 500s."""

import api.management.readers


def test_an_unexpected_exception_is_a_logged_json_500(management, monkeypatch, caplog):
    def broken(connection):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api.management.readers.registry, "all_live_readers", broken)
    caplog.set_level("ERROR")
    response = management.get("/status")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error", "error_type": "internal_error"}
    assert any("unhandled error" in record.getMessage() for record in caplog.records)


def test_a_body_of_exactly_the_limit_is_read(make_app):
    body = b'{"text": 5, "pad": "xxxxxxxxxx"}'
    at_limit = make_app(body_size_limit_bytes=len(body)).test_client()
    assert at_limit.post("/generate", data=body, content_type="application/json").status_code == 422
    below = make_app(body_size_limit_bytes=len(body) - 1).test_client()
    assert below.post("/generate", data=body, content_type="application/json").status_code == 413

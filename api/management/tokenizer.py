"""Takeoff's tokenizer routes: POST /tokenize/{reader_id}, /detokenize/{reader_id}
and /chat_template/{reader_id}, answered by that reader's own tokenizer through a
reader call. They are answered on the inference port, like Takeoff's, not on the
management port."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.errors import ApiError
from api.management.readers import call_reader, live_reader
from api.payloads import read_model_body
from api.state import app_state
from shared import reader_calls

blueprint = Blueprint("tokenizer", __name__)


@blueprint.post("/tokenize/<reader_id>")
@blueprint.post("/detokenize/<reader_id>")
@blueprint.post("/chat_template/<reader_id>")
def tokenizer_call(reader_id: str) -> Response:
    live_reader(reader_id)
    tool = request.path.strip("/").split("/", 1)[0]
    checked = read_model_body(
        request, app_state().settings.body_size_limit_bytes, reader_calls.REQUESTS[tool]
    )
    answer = call_reader(reader_id, tool, checked)
    if answer is None:
        raise ApiError(
            f"reader '{reader_id}' did not answer in time", error_type="reader_unavailable", status=503
        )
    if not answer.get("ok"):
        raise ApiError(
            str(answer.get("error")), error_type="tokenizer_error", status=int(answer.get("status", 400))
        )
    return jsonify(answer["result"])

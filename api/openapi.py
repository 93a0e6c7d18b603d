"""The API described: an OpenAPI 3.1 document generated from the pydantic
models (GET /openapi.json) and a small self-contained page listing the routes
and the payload schema, with a form to try /generate (GET /docs; no assets
from the network)."""

from __future__ import annotations

import html
import json
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.openai.schemas import ChatCompletionRequest, CompletionRequest
from api.schemas import ErrorBody, GenerateResponse, Health, ReaderSummary, Readiness
from api.state import app_state
from shared.payload import GenerateRequest
from shared.registry import ReaderInfo
from shared.settings import ApiSettings
from shared.supervision import ReaderSpec

blueprint = Blueprint("docs", __name__)

_SCHEMA_MODELS: list[tuple[type[BaseModel], str]] = [
    (GenerateRequest, "validation"),
    (GenerateResponse, "serialization"),
    (ErrorBody, "serialization"),
    (ReaderSummary, "serialization"),
    (ReaderInfo, "serialization"),
    (Readiness, "serialization"),
    (ReaderSpec, "validation"),
    (Health, "serialization"),
    (ChatCompletionRequest, "validation"),
    (CompletionRequest, "validation"),
]

_ERROR_MEANINGS = {
    400: "The body is not UTF-8 JSON.",
    401: "Missing or wrong API key.",
    404: "Unknown consumer_group or reader.",
    413: "Body over the size limit.",
    409: "The reader was not started by this `mmserve serve`.",
    415: "Content-Type is not application/json.",
    422: "The payload is invalid (the message names each offending key).",
    429: "The group's queue is full; see Retry-After.",
    501: "A payload key or route whose capability is not built yet.",
    503: "No live, ready worker for the group, or Redis is unavailable; see Retry-After.",
    504: "No event from a worker in time.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {"description": _ERROR_MEANINGS[status], "content": _json_content("ErrorBody")}
        for status in statuses
    }


def _reader_id_parameter() -> dict[str, Any]:
    return {"name": "reader_id", "in": "path", "required": True, "schema": {"type": "string"}}


def build_openapi(settings: ApiSettings) -> dict[str, Any]:
    _, definitions = models_json_schema(_SCHEMA_MODELS, ref_template="#/components/schemas/{model}")
    schemas = definitions["$defs"]
    paths: dict[str, Any] = {
        **_generation_paths(settings),
        **_tokenizer_paths(settings),
        **_encoder_paths(settings),
        **_probe_paths(),
        **_management_paths(settings),
        **_openai_paths(settings),
    }

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mmserve",
            "version": "0.1.0",
            "description": "Takeoff-compatible text generation. Errors are "
            '`{"error": "...", "error_type": "..."}`.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
    if settings.api_key:
        document["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
    return document


def _generation_paths(settings: ApiSettings) -> dict[str, Any]:
    """/generate, /generate_stream and their image twins (inference port)."""
    generate_errors = _errors(400, 401, 404, 413, 415, 422, 429, 503, 504)
    request_body = {"required": True, "content": _json_content("GenerateRequest")}
    inference = f"Inference port ({settings.port})."
    paths: dict[str, Any] = {
        "/generate": {
            "post": {
                "summary": "Generate text for a prompt or a list of prompts",
                "description": f"{inference} `null` means the default for every key. 404 for an "
                "unknown consumer_group or lora_id.",
                "requestBody": request_body,
                "responses": {
                    "200": {
                        "description": "The generated text.",
                        "content": _json_content("GenerateResponse"),
                    },
                    **generate_errors,
                },
            }
        },
        "/generate_stream": {
            "post": {
                "summary": "Generate text, streamed as Server-Sent Events",
                "description": f"{inference} For a str `text` each event is `data: <token>` (a token "
                'with line breaks spans several data: lines); for a list, `data: {"text": "<token>", '
                '"batch_id": i}`. An error after the stream started is an `event: error` event; '
                "with return_metadata the last event is `event: metadata`.",
                "requestBody": request_body,
                "responses": {
                    "200": {
                        "description": "An SSE stream of tokens.",
                        "content": {"text/event-stream": {}},
                    },
                    **generate_errors,
                },
            }
        },
    }
    multipart_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image_data", "json_data"],
                    "properties": {
                        "image_data": {
                            "type": "string",
                            "format": "binary",
                            "description": "The image file (PNG, JPEG, WebP, GIF or BMP).",
                        },
                        "json_data": {
                            "$ref": "#/components/schemas/GenerateRequest",
                            "description": "The /generate payload, as a field or an application/json part.",
                        },
                    },
                },
                "encoding": {"json_data": {"contentType": "application/json"}},
            }
        },
    }
    for route, streamed in (("/image_generate", False), ("/image_generate_stream", True)):
        paths[route] = {
            "post": {
                "summary": "Generate text about an image"
                + (", streamed as Server-Sent Events" if streamed else ""),
                "description": f"{inference} Every prompt of `text` is asked about the image (and any "
                f"`image_paths`); answered as {'/generate_stream' if streamed else '/generate'} answers.",
                "requestBody": multipart_body,
                "responses": {
                    "200": (
                        {
                            "description": "An SSE stream of tokens.",
                            "content": {"text/event-stream": {}},
                        }
                        if streamed
                        else {
                            "description": "The generated text.",
                            "content": _json_content("GenerateResponse"),
                        }
                    ),
                    **generate_errors,
                },
            }
        }
    return paths


def _encoder_paths(settings: ApiSettings) -> dict[str, Any]:
    """Takeoff's embedding and classification routes (inference port), not supported yet."""
    return {
        f"/{route}": {
            "post": {
                "summary": f"Takeoff's {route}: not supported yet",
                "description": f"Inference port ({settings.port}). Answers 501: embedding and "
                "classification readers are not supported yet.",
                "responses": _errors(501),
            }
        }
        for route in ("embed", "classify")
    }


def _tokenizer_paths(settings: ApiSettings) -> dict[str, Any]:
    """Takeoff's tokenizer routes, answered by one reader (inference port)."""
    inference = f"Inference port ({settings.port})."
    paths: dict[str, Any] = {}
    for tool in ("tokenize", "detokenize", "chat_template"):
        paths[f"/{tool}/{{reader_id}}"] = {
            "post": {
                "summary": f"{tool.replace('_', ' ').capitalize()} with a reader's tokenizer",
                "description": f"{inference} Takeoff's request and answer shapes; answered by that "
                "reader's own tokenizer (503 when it does not answer in time).",
                "parameters": [_reader_id_parameter()],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {"description": "The tokenizer's answer.", "content": {"application/json": {}}},
                    **_errors(400, 401, 404, 422, 503),
                },
            }
        }
    return paths


def _probe_paths() -> dict[str, Any]:
    """Liveness, readiness and metrics (both ports)."""
    both = "Both ports."
    paths: dict[str, Any] = {}
    paths["/healthz"] = {
        "get": {
            "summary": "Liveness",
            "description": f"{both} Never asks for an API key.",
            "security": [],
            "responses": {"200": {"description": "The process lives.", "content": _json_content("Health")}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "summary": "Readiness",
            "description": f"{both} Ready when Redis answers and every known group has a ready worker.",
            "responses": {
                "200": {"description": "Ready.", "content": _json_content("Readiness")},
                "503": {
                    "description": "Not ready; `reasons` says why.",
                    "content": _json_content("Readiness"),
                },
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "description": both,
            "responses": {"200": {"description": "Text format.", "content": {"text/plain": {}}}},
        }
    }
    return paths


def _management_paths(settings: ApiSettings) -> dict[str, Any]:
    """Readers, LoRA adapters and local workers (management port)."""
    management = f"Management port ({settings.management_port})."
    paths: dict[str, Any] = {}
    paths["/reader_groups"] = {
        "get": {
            "summary": "Live readers by consumer group",
            "description": management,
            "responses": {
                "200": {
                    "description": "One entry per live reader.",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": {"type": "array", "items": _ref("ReaderSummary")},
                            }
                        }
                    },
                }
            },
        }
    }
    paths["/status"] = {
        "get": {
            "summary": "Every live reader's description",
            "description": f"{management} `live_readers` maps reader ids to a ReaderInfo whose "
            "`consumer_group` is given as the list `consumer_groups`.",
            "responses": {"200": {"description": "Live readers.", "content": {"application/json": {}}}},
        }
    }
    paths["/config/{reader_id}"] = {
        "get": {
            "summary": "One live reader's configuration",
            "description": management,
            "parameters": [_reader_id_parameter()],
            "responses": {
                "200": {"description": "The reader.", "content": _json_content("ReaderInfo")},
                **_errors(404),
            },
        }
    }
    paths["/loras"] = {
        "get": {
            "summary": "The LoRA adapters of every live reader",
            "description": f"{management} By group, then by reader: the adapter ids requests may "
            "name (`available`), those in memory (`loaded`, least recently used first) and how many fit.",
            "responses": {
                "200": {"description": "Adapters by group and reader.", "content": {"application/json": {}}}
            },
        }
    }
    paths["/loras/{reader_id}"] = {
        "post": {
            "summary": "Load a LoRA adapter into a reader's memory now",
            "description": f'{management} Body `{{"lora_id": "..."}}`; the reader waits for its '
            "running decode step, loads the adapter (evicting the least recently used one no running "
            "request needs) and answers its load time.",
            "parameters": [_reader_id_parameter()],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": {
                "200": {"description": "Loaded.", "content": {"application/json": {}}},
                **_errors(404, 422, 503, 504),
            },
        }
    }
    under_serve = f"{management} Only under `mmserve serve`; the API started alone answers 501."
    paths["/reader"] = {
        "post": {
            "summary": "Start a local worker process",
            "description": under_serve,
            "requestBody": {"required": True, "content": _json_content("ReaderSpec")},
            "responses": {
                "201": {
                    "description": "Started; it registers once its model is loaded. "
                    "`{reader_id, pid, consumer_group, ready, ignored}`: `ignored` names the "
                    "Takeoff keys given that mean nothing here.",
                    "content": {"application/json": {}},
                },
                **_errors(422, 501, 503),
            },
        }
    }
    paths["/reader/{reader_id}"] = {
        "delete": {
            "summary": "Stop a local worker process (it finishes its batch first)",
            "description": under_serve,
            "parameters": [_reader_id_parameter()],
            "responses": {
                "200": {"description": "Stopping.", "content": {"application/json": {}}},
                **_errors(404, 409, 501, 503),
            },
        }
    }
    return paths


def _openai_paths(settings: ApiSettings) -> dict[str, Any]:
    """The OpenAI-compatible routes (api.openai.routes): OpenAI's own shapes, described briefly."""
    port = f"OpenAI port ({settings.openai_port}). OpenAI's request and answer shapes; errors are "

    def answers(meanings: dict[int, str]) -> dict[str, Any]:
        return {
            str(status): {"description": meaning, "content": {"application/json": {}}}
            for status, meaning in meanings.items()
        }

    errors = answers(
        {
            400: "Invalid or unsupported parameter (named in error.param).",
            404: "Unknown model (consumer group, or group/lora_id): error.code model_not_found.",
            503: "No live, ready worker for the group, or Redis is unavailable.",
        }
    )
    body_errors = {**errors, **answers({413: "Body over the size limit.", 415: "Not application/json."})}
    shape = '`{"error": {"message", "type", "param", "code"}}`. '

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": _json_content(name)}

    answer = {
        "description": "JSON, or with stream: true an SSE stream of chunks ending in `data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
    return {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI chat completions (text and image_url parts)",
                "description": port + shape + "The supported parameters are listed in docs/api/openai.md.",
                "requestBody": body("ChatCompletionRequest"),
                "responses": {"200": answer, **body_errors},
            }
        },
        "/v1/completions": {
            "post": {
                "summary": "OpenAI text completions",
                "description": port + shape,
                "requestBody": body("CompletionRequest"),
                "responses": {"200": answer, **body_errors},
            }
        },
        "/v1/embeddings": {
            "post": {
                "summary": "OpenAI embeddings: not supported yet",
                "description": port + shape + "Answers 501: embedding readers are not supported yet.",
                "responses": answers({501: "Not supported yet."}),
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The models: one per consumer group",
                "description": port + shape,
                "responses": {"200": {"description": "A list.", "content": {"application/json": {}}}},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model (consumer group)",
                "description": port + shape,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "The model.", "content": {"application/json": {}}},
                    **errors,
                },
            }
        },
    }


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return jsonify(build_openapi(app_state().settings))


@blueprint.get("/docs")
def docs() -> Response:
    return Response(render_docs_page(build_openapi(app_state().settings)), mimetype="text/html")


def render_docs_page(document: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
        f"<td>{html.escape(operation.get('summary', ''))}<br><small>"
        f"{html.escape(operation.get('description', ''))}</small></td></tr>"
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    )
    payload_schema = html.escape(json.dumps(document["components"]["schemas"]["GenerateRequest"], indent=2))
    return _PAGE.replace("{rows}", rows).replace("{payload_schema}", payload_schema)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mmserve API</title>
<style>
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; width: 100%; }
td { border-top: 1px solid #ddd; padding: .4rem; vertical-align: top; }
pre, textarea { background: #f6f6f6; padding: .5rem; width: 100%; box-sizing: border-box; }
</style></head>
<body>
<h1>mmserve API</h1>
<p>The full description is at <a href="openapi.json">openapi.json</a>.
Errors are <code>{"error": "...", "error_type": "..."}</code>.</p>
<h2>Routes</h2>
<table>{rows}</table>
<h2>Try /generate</h2>
<p><label>API key (if the server has one) <input id="key" type="password"></label></p>
<textarea id="payload" rows="6">{"text": "What is the capital of France?", "max_new_tokens": 32}</textarea>
<p><button id="send">POST /generate</button></p>
<pre id="answer"></pre>
<h2>Payload schema</h2>
<pre>{payload_schema}</pre>
<script>
document.getElementById("send").onclick = async () => {
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  const answer = document.getElementById("answer");
  answer.textContent = "...";
  try {
    const response = await fetch("generate", {method: "POST", headers,
                                              body: document.getElementById("payload").value});
    answer.textContent = response.status + "\\n" + await response.text();
  } catch (error) { answer.textContent = String(error); }
};
</script>
</body></html>
"""

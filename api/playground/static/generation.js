// One streamed generation: POST /generate_stream (JSON) or /image_generate_stream (multipart
// with images), tokens handed to a callback as they arrive, the metadata event returned.

import { ApiError, readError, request } from "./http.js";
import { sseEvents } from "./sse.js";

// payload: the /generate payload; images: File objects (may be empty); signal: an AbortSignal
// (aborting closes the connection, which cancels the request on the server);
// onToken(row, text): called for every token. Resolves with {metadata, firstTokenMs}.
export async function streamGeneration({ payload, images = [], signal, onToken }) {
  const body = { ...payload, return_metadata: true };
  let init;
  let path;
  if (images.length) {
    const form = new FormData();
    for (const image of images) form.append("image_data", image, image.name || "image");
    form.append("json_data", JSON.stringify(body));
    path = "/image_generate_stream";
    init = { method: "POST", body: form, signal };
  } else {
    path = "/generate_stream";
    init = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    };
  }
  const started = performance.now();
  const response = await request(path, init);
  if (!response.ok) throw await readError(response);
  const batch = Array.isArray(payload.text);
  let metadata = null;
  let firstTokenMs = null;
  for await (const event of sseEvents(response)) {
    if (event.event === "message") {
      if (firstTokenMs === null) firstTokenMs = performance.now() - started;
      if (batch) {
        const token = JSON.parse(event.data);
        onToken(token.batch_id, token.text);
      } else {
        onToken(0, event.data);
      }
    } else if (event.event === "metadata") {
      metadata = JSON.parse(event.data);
    } else if (event.event === "error") {
      const error = JSON.parse(event.data);
      throw new ApiError(error.error, { status: 200, errorType: error.error_type });
    }
  }
  return { metadata, firstTokenMs };
}

// Requests to the server this page came from, with the API key when the server asks for
// one (asked once through the key dialog, kept in sessionStorage), and its errors as ApiError.

const KEY_STORAGE = "mmserve-api-key";

export class ApiError extends Error {
  constructor(message, { status = 0, errorType = "network_error" } = {}) {
    super(message);
    this.status = status;
    this.errorType = errorType;
  }
}

let keyPrompt = null; // (message) => Promise<string>, set by main.js

export function setKeyPrompt(prompt) {
  keyPrompt = prompt;
}

function savedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// fetch(path) with the saved key; a 401 asks for a key (once for all requests waiting) and retries.
export async function request(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = savedKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(`the server did not answer (${error.message})`);
    }
    if (response.status !== 401 || !keyPrompt) return response;
    const answer = await readError(response);
    const message = key ? `The key was refused: ${answer.message}` : "This server asks for an API key.";
    sessionStorage.setItem(KEY_STORAGE, await askOnce(message));
  }
}

let pendingPrompt = null;

function askOnce(message) {
  if (!pendingPrompt) {
    pendingPrompt = keyPrompt(message).finally(() => {
      pendingPrompt = null;
    });
  }
  return pendingPrompt;
}

// The API's error body ({"error", "error_type"}) as an ApiError, whatever the body holds.
export async function readError(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") {
      return new ApiError(body.error, { status: response.status, errorType: body.error_type || "" });
    }
  } catch {
    // not JSON: the text itself is the message
  }
  return new ApiError(`${response.status} ${response.statusText}: ${text.slice(0, 300)}`, {
    status: response.status,
    errorType: "http_error",
  });
}

export async function getJson(path) {
  const response = await request(path);
  if (!response.ok) throw await readError(response);
  return response.json();
}

export async function postJson(path, body, init = {}) {
  const response = await request(path, {
    ...init,
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw await readError(response);
  return response.json();
}

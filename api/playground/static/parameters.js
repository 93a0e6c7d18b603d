// The parameters panel: one field per /generate payload key, built from the payload's schema
// in /openapi.json (title, description, default, range), the constraint box with its backend,
// and the LoRA adapter. values() gives the payload keys to send.

// Keys the page sets from elsewhere (the message, the group selector, the constraint box,
// the adapter list), and return_metadata, always on: the numbers need it.
const HANDLED_ELSEWHERE = new Set([
  "text",
  "consumer_group",
  "regex_string",
  "json_schema",
  "constrained_decoding_backend",
  "lora_id",
  "return_metadata",
]);

const CONSTRAINT_KEYS = ["json_schema", "regex_string", "constrained_decoding_backend"];

function variant(property) {
  const options = property.anyOf || [property];
  return options.find((option) => option.type && option.type !== "null") || {};
}

function rangeText(shape) {
  const low = shape.minimum ?? shape.exclusiveMinimum;
  const high = shape.maximum ?? shape.exclusiveMaximum;
  if (low == null && high == null) return "";
  const from = low == null ? "" : `${shape.exclusiveMinimum != null ? ">" : "≥"} ${low}`;
  const to = high == null ? "" : `≤ ${high}`;
  return [from, to].filter(Boolean).join(", ");
}

export class Parameters {
  constructor() {
    this.form = document.getElementById("parameters");
    this.fields = new Map(); // key -> {input, shape, default}
    this.constraintKind = document.getElementById("constraint-kind");
    this.constraintText = document.getElementById("constraint-text");
    this.constraintError = document.getElementById("constraint-error");
    this.backend = document.getElementById("backend");
    this.lora = document.getElementById("lora");
    document.getElementById("reset-parameters").addEventListener("click", () => this.reset());
    this.constraintKind.addEventListener("change", () => this.showConstraintError(""));
    this.constraintText.addEventListener("input", () => this.showConstraintError(""));
  }

  build(schema) {
    this.form.replaceChildren();
    this.fields.clear();
    for (const [key, property] of Object.entries(schema.properties)) {
      if (HANDLED_ELSEWHERE.has(key)) continue;
      this.addField(key, property);
    }
  }

  addField(key, property) {
    const shape = variant(property);
    const id = `param-${key}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    const code = document.createElement("code");
    code.textContent = key;
    label.append(`${property.title || key} `, code);
    let input;
    if (shape.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      const row = document.createElement("div");
      row.className = "check";
      row.append(input, label);
      this.form.append(row);
    } else {
      if (shape.type === "array") {
        input = document.createElement("textarea");
        input.rows = 2;
      } else {
        input = document.createElement("input");
        if (shape.type === "integer" || shape.type === "number") {
          input.type = "number";
          input.step = shape.type === "integer" ? "1" : "any";
          const low = shape.minimum ?? shape.exclusiveMinimum;
          if (low != null) input.min = String(low);
          if (shape.maximum != null) input.max = String(shape.maximum);
        }
      }
      this.form.append(label, input);
    }
    input.id = id;
    input.name = key;
    const help = [property.description, rangeText(shape) && `Range ${rangeText(shape)}.`];
    if (property.default == null) help.push("Empty: the server's default.");
    else help.push(`Default ${JSON.stringify(property.default)}.`);
    if (shape.type === "array") help.push("One per line.");
    const small = document.createElement("small");
    small.id = `${id}-help`;
    small.textContent = help.filter(Boolean).join(" ");
    input.setAttribute("aria-describedby", small.id);
    this.form.append(small);
    input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
    this.fields.set(key, { input, shape, default: property.default });
    this.setValue(key, property.default);
  }

  setValue(key, value) {
    const field = this.fields.get(key);
    if (!field) return;
    if (field.shape.type === "boolean") field.input.checked = Boolean(value);
    else if (field.shape.type === "array") field.input.value = (value || []).join("\n");
    else field.input.value = value == null ? "" : String(value);
  }

  reset() {
    for (const [key, field] of this.fields) this.setValue(key, field.default);
  }

  setBackends(backends, defaultBackend) {
    const chosen = this.backend.value;
    this.backend.replaceChildren(new Option(`server default (${defaultBackend})`, ""));
    for (const name of backends) this.backend.append(new Option(name, name));
    this.backend.value = backends.includes(chosen) ? chosen : "";
  }

  setAdapters(adapters) {
    const chosen = this.lora.value;
    this.lora.replaceChildren(new Option(adapters.length ? "none: the base model" : "none served", ""));
    for (const name of adapters) this.lora.append(new Option(name, name));
    this.lora.value = adapters.includes(chosen) ? chosen : "";
  }

  // The payload keys of the parameters panel (not text / consumer_group).
  values() {
    const payload = {};
    for (const [key, { input, shape }] of this.fields) {
      if (shape.type === "boolean") payload[key] = input.checked;
      else if (shape.type === "array") {
        const items = input.value.split("\n").map((line) => line.trim()).filter(Boolean);
        if (items.length) payload[key] = items;
      } else if (input.value.trim() !== "") {
        payload[key] = shape.type === "integer" || shape.type === "number" ? Number(input.value) : input.value;
      }
    }
    const kind = this.constraintKind.value;
    if (kind) payload[kind] = this.constraintText.value; // json_schema may be a JSON string: the API parses it
    if (this.backend.value) payload.constrained_decoding_backend = this.backend.value;
    if (this.lora.value) payload.lora_id = this.lora.value;
    return payload;
  }

  showConstraintError(message) {
    this.constraintError.textContent = message;
    if (message) this.constraintText.setAttribute("aria-invalid", "true");
    else this.constraintText.removeAttribute("aria-invalid");
  }

  // Show an API error next to what it is about: the constraint box, or the fields it names.
  // True when it was placed next to a field.
  placeError(error) {
    const message = error.message || "";
    if (error.errorType === "invalid_constraint" || CONSTRAINT_KEYS.some((key) => message.includes(key))) {
      this.showConstraintError(message);
      return true;
    }
    let placed = false;
    for (const [key, { input }] of this.fields) {
      if (new RegExp(`\\b${key}\\b`).test(message)) {
        input.setAttribute("aria-invalid", "true");
        placed = true;
      }
    }
    return placed;
  }
}

// The consumer groups and their readers, from GET /playground/info: the group selector, the
// readers panel (model, type, device, dtype, queue depth, adapters) and what the rest of the
// page asks about the chosen group (VISION or not, chat template, adapters, a ready reader).

import { getJson } from "./http.js";

export class Readers {
  constructor(onChange) {
    this.select = document.getElementById("group");
    this.modelLine = document.getElementById("group-model");
    this.panel = document.getElementById("readers");
    this.info = { groups: {}, constrained_decoding_backends: [], default_backend: "" };
    this.onChange = onChange;
    this.select.addEventListener("change", () => this.changed());
    document.getElementById("refresh-readers").addEventListener("click", () => this.refresh());
  }

  async refresh() {
    this.info = await getJson("/playground/info");
    this.fillSelect();
    this.render();
    this.changed();
    return this.info;
  }

  get group() {
    return this.select.value;
  }

  readers(group = this.group) {
    return (this.info.groups[group] || { readers: [] }).readers;
  }

  isVision(group = this.group) {
    return this.readers(group).some((reader) => reader.model_type === "VISION");
  }

  hasChatTemplate(group = this.group) {
    return this.readers(group).some((reader) => reader.has_chat_template);
  }

  adapters(group = this.group) {
    return [...new Set(this.readers(group).flatMap((reader) => reader.loras.available))].sort();
  }

  // A ready reader of the group, for the reader calls (/chat_template/{reader_id}).
  readyReader(group = this.group) {
    return this.readers(group).find((reader) => reader.ready) || null;
  }

  fillSelect() {
    const chosen = this.select.value;
    this.select.replaceChildren();
    for (const [group, { readers }] of Object.entries(this.info.groups)) {
      const model = readers.length ? readers[0].model_name.split("/").pop() : "no live worker";
      const option = new Option(`${group} (${model})`, group);
      option.disabled = !readers.length;
      this.select.append(option);
    }
    const groups = Object.keys(this.info.groups);
    if (groups.includes(chosen)) this.select.value = chosen;
    else this.select.value = groups.find((group) => this.readers(group).length) || groups[0] || "";
  }

  changed() {
    const readers = this.readers();
    this.modelLine.textContent = readers.length
      ? `${readers[0].model_type === "VISION" ? "vision-language" : "text"} model ${readers[0].model_name}`
      : "";
    this.onChange();
  }

  render() {
    const groups = Object.entries(this.info.groups);
    if (!groups.length) {
      this.panel.textContent = "No worker has registered yet.";
      return;
    }
    this.panel.replaceChildren(
      ...groups.map(([group, { queue_depth: depth, readers }]) => {
        const section = document.createElement("section");
        section.className = "readers-group";
        const heading = document.createElement("h3");
        heading.textContent = `${group}: ${readers.length} reader(s), ${depth} waiting`;
        section.append(heading);
        for (const reader of readers) section.append(describe(reader));
        return section;
      }),
    );
  }
}

function describe(reader) {
  const rows = [
    ["reader", reader.reader_id],
    ["model", reader.model_name],
    ["type", reader.model_type],
    ["state", reader.ready ? "ready" : "loading"],
    ["host", reader.hostname],
    ["device", reader.device],
    ["dtype", reader.dtype + (reader.quantization !== "none" ? `, ${reader.quantization}` : "")],
    ["threads", reader.threads],
    ["max batch", reader.max_batch_size],
    ["context", reader.context_length],
    ["adapters", reader.loras.available.join(", ") || "none"],
  ];
  const list = document.createElement("dl");
  for (const [name, value] of rows) {
    if (value == null || value === "") continue;
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    list.append(term, detail);
  }
  return list;
}

// Chat mode: a multi-turn conversation with the chosen group. The first turn goes through the
// model's chat template on the server (use_chat_template); later turns send the whole
// conversation rendered by a reader's chat template (POST /chat_template/{reader_id}). Tokens
// appear as they stream; Stop aborts the request, which cancels it on the server.

import { postJson } from "./http.js";
import { streamGeneration } from "./generation.js";
import { answerElement, answerText, appendText, finishAnswer, messageElement } from "./messages.js";
import { describeNumbers } from "./numbers.js";

export class Chat {
  constructor({ readers, parameters, attachments }) {
    this.readers = readers;
    this.parameters = parameters;
    this.attachments = attachments;
    this.turns = []; // {role, text, images}
    this.controller = null;
    this.list = document.getElementById("conversation");
    this.message = document.getElementById("message");
    this.error = document.getElementById("composer-error");
    this.sendButton = document.getElementById("send");
    this.stopButton = document.getElementById("stop");
    document.getElementById("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.message.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener("click", () => this.stop());
    document.getElementById("new-chat").addEventListener("click", () => this.reset());
  }

  get busy() {
    return this.controller !== null;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  reset() {
    this.stop();
    this.turns = [];
    this.list.replaceChildren();
    this.error.textContent = "";
    this.message.focus();
  }

  async send() {
    const text = this.message.value.trim();
    if (this.busy) return;
    this.error.textContent = "";
    this.parameters.showConstraintError("");
    if (!text) {
      this.error.textContent = "Type a message first.";
      return;
    }
    const group = this.readers.group;
    if (!group) {
      this.error.textContent = "No consumer group has a live worker yet: start one, then Refresh the readers.";
      return;
    }
    const images = this.attachments.take();
    const user = { role: "user", text, images };
    this.turns.push(user);
    const userItem = messageElement("user", text, images);
    const answerItem = answerElement(`Model (${group})`);
    this.list.append(userItem, answerItem);
    this.message.value = "";
    this.setBusy(new AbortController());
    const signal = this.controller.signal;
    try {
      const payload = await this.payload(group, signal);
      const { metadata, firstTokenMs } = await streamGeneration({
        payload,
        images: this.turns.flatMap((turn) => turn.images),
        signal,
        onToken: (_, token) => appendText(answerItem, token),
      });
      this.turns.push({ role: "assistant", text: answerText(answerItem), images: [] });
      finishAnswer(answerItem, { state: "done", numbers: describeNumbers(metadata, firstTokenMs) });
    } catch (error) {
      if (error.name === "AbortError") {
        this.turns.push({ role: "assistant", text: answerText(answerItem), images: [] });
        finishAnswer(answerItem, { state: "stopped", note: "stopped" });
      } else if (answerText(answerItem)) {
        this.turns.push({ role: "assistant", text: answerText(answerItem), images: [] });
        finishAnswer(answerItem, { state: "error", note: error.message });
      } else {
        // Nothing was generated: take the turn back so that it can be fixed and sent again.
        this.turns.pop();
        userItem.remove();
        answerItem.remove();
        this.message.value = text;
        this.attachments.add(images);
        this.parameters.placeError(error);
        this.error.textContent = `${error.message}${error.errorType ? ` (${error.errorType})` : ""}`;
      }
    } finally {
      this.setBusy(null);
    }
  }

  // The /generate payload of the next answer (the conversation so far in `text`).
  async payload(group, signal) {
    const payload = { ...this.parameters.values(), consumer_group: group };
    if (!payload.use_chat_template || this.turns.length === 1) {
      payload.text = this.turns[this.turns.length - 1].text;
      return payload;
    }
    const reader = this.readers.readyReader(group);
    if (!reader) throw new Error(`consumer group '${group}' has no ready reader to apply its chat template`);
    const rendered = await postJson(
      `/chat_template/${encodeURIComponent(reader.reader_id)}`,
      {
        inputs: this.turns.map((turn) => ({ role: turn.role, content: turn.text })),
        add_generation_prompt: true,
      },
      { signal },
    );
    payload.text = rendered.messages[0];
    payload.use_chat_template = false; // the template is applied already
    return payload;
  }

  setBusy(controller) {
    this.controller = controller;
    this.sendButton.disabled = controller !== null;
    this.stopButton.disabled = controller === null;
  }
}

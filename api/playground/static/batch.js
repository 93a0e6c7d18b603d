// Batch mode: several prompts in one request (`text` as a list); each answer fills its own
// column as the tokens of its batch_id arrive.

import { streamGeneration } from "./generation.js";
import { answerElement, appendText, finishAnswer } from "./messages.js";
import { describeNumbers } from "./numbers.js";

export class Batch {
  constructor({ readers, parameters }) {
    this.readers = readers;
    this.parameters = parameters;
    this.controller = null;
    this.prompts = document.getElementById("batch-prompts");
    this.answers = document.getElementById("batch-answers");
    this.error = document.getElementById("batch-error");
    this.runButton = document.getElementById("batch-run");
    this.stopButton = document.getElementById("batch-stop");
    document.getElementById("batch-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.run();
    });
    this.stopButton.addEventListener("click", () => this.stop());
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  async run() {
    if (this.controller) return;
    this.error.textContent = "";
    this.parameters.showConstraintError("");
    const prompts = this.prompts.value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (!prompts.length) {
      this.error.textContent = "Write at least one prompt, one per line.";
      return;
    }
    const group = this.readers.group;
    if (!group) {
      this.error.textContent = "No consumer group has a live worker yet.";
      return;
    }
    const columns = prompts.map((prompt, index) => {
      const column = answerElement(`#${index}: ${prompt}`);
      column.dataset.batchId = String(index);
      return column;
    });
    this.answers.replaceChildren(...columns);
    this.setBusy(new AbortController());
    const payload = { ...this.parameters.values(), consumer_group: group, text: prompts };
    try {
      const { metadata, firstTokenMs } = await streamGeneration({
        payload,
        signal: this.controller.signal,
        onToken: (row, token) => appendText(columns[row], token),
      });
      columns.forEach((column, row) => {
        const numbers = describeNumbers(metadata ? metadata[row] : null, row === 0 ? firstTokenMs : null);
        finishAnswer(column, { state: "done", numbers });
      });
    } catch (error) {
      const stopped = error.name === "AbortError";
      for (const column of columns) {
        finishAnswer(column, { state: stopped ? "stopped" : "error", note: stopped ? "stopped" : error.message });
      }
      if (!stopped) {
        this.parameters.placeError(error);
        this.error.textContent = `${error.message}${error.errorType ? ` (${error.errorType})` : ""}`;
      }
    } finally {
      this.setBusy(null);
    }
  }

  setBusy(controller) {
    this.controller = controller;
    this.runButton.disabled = controller !== null;
    this.stopButton.disabled = controller === null;
  }
}

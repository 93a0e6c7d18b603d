// The playground page: wires the key dialog, the readers, the parameters, chat and batch modes.

import { Attachments } from "./images.js";
import { Batch } from "./batch.js";
import { Chat } from "./chat.js";
import { getJson, setKeyPrompt } from "./http.js";
import { keyDialog } from "./key_dialog.js";
import { Parameters } from "./parameters.js";
import { Readers } from "./readers.js";

const READERS_REFRESH_MS = 10000;

function showPageError(message) {
  const element = document.getElementById("page-error");
  element.textContent = message;
  element.hidden = !message;
}

async function start() {
  setKeyPrompt(keyDialog());
  const parameters = new Parameters();
  let chosenGroup = null;
  const readers = new Readers(() => {
    parameters.setAdapters(readers.adapters());
    if (readers.group !== chosenGroup) {
      // A new group: its chat template on when it has one; its images only if it is VISION.
      chosenGroup = readers.group;
      const template = document.getElementById("param-use_chat_template");
      if (template) template.checked = readers.hasChatTemplate();
    }
    const vision = readers.isVision();
    document.getElementById("image-input").disabled = !vision;
    document.getElementById("attach-label").setAttribute("aria-disabled", String(!vision));
  });
  const attachments = new Attachments({
    canAttach: () =>
      readers.isVision()
        ? null
        : `The model of consumer group '${readers.group}' is text-only: images need a vision (VISION) group.`,
    showError: (message) => {
      document.getElementById("composer-error").textContent = message;
    },
  });
  const chat = new Chat({ readers, parameters, attachments });
  const batch = new Batch({ readers, parameters });

  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => {
      const batchMode = radio.value === "batch" && radio.checked;
      document.getElementById("chat-panel").hidden = batchMode;
      document.getElementById("batch-panel").hidden = !batchMode;
    });
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      chat.stop();
      batch.stop();
    }
  });

  try {
    const document_ = await getJson("/openapi.json");
    parameters.build(document_.components.schemas.GenerateRequest);
    const info = await readers.refresh();
    parameters.setBackends(info.constrained_decoding_backends, info.default_backend);
    showPageError("");
    document.body.dataset.ready = "true";
  } catch (error) {
    showPageError(`The playground could not load the server's description: ${error.message}`);
    return;
  }
  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    readers.refresh().then(
      () => showPageError(""),
      (error) => showPageError(`Could not refresh the readers: ${error.message}`),
    );
  }, READERS_REFRESH_MS);
}

start();

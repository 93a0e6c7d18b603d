// How a conversation turn looks on the page: the message element, its streamed text, its
// state (data-state: streaming, done, stopped, error), its numbers and its copy button.

import { thumbnail } from "./images.js";

export function messageElement(role, text = "", images = []) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "answer-text";
  body.textContent = text;
  item.append(label);
  if (images.length) {
    const list = document.createElement("ul");
    list.className = "thumbnails";
    list.setAttribute("aria-label", "Attached images");
    for (const image of images) {
      const entry = document.createElement("li");
      entry.append(thumbnail(image));
      list.append(entry);
    }
    item.append(list);
  }
  item.append(body);
  return item;
}

export function answerElement(heading = "Model") {
  const item = messageElement("assistant");
  item.querySelector(".role").textContent = heading;
  item.dataset.state = "streaming";
  item.setAttribute("aria-busy", "true");
  const tools = document.createElement("div");
  tools.className = "tools";
  const numbers = document.createElement("span");
  numbers.className = "numbers";
  tools.append(numbers);
  item.append(tools);
  return item;
}

export function appendText(item, text) {
  item.querySelector(".answer-text").append(text);
}

export function answerText(item) {
  return item.querySelector(".answer-text").textContent;
}

// End an answer: its state, an optional note (the error or "stopped"), numbers, a copy button.
export function finishAnswer(item, { state, note = "", numbers = "" }) {
  item.dataset.state = state;
  item.removeAttribute("aria-busy");
  const tools = item.querySelector(".tools");
  tools.querySelector(".numbers").textContent = [note, numbers].filter(Boolean).join(" · ");
  if (state === "error") tools.querySelector(".numbers").classList.add("error");
  if (answerText(item)) tools.append(copyButton(item));
}

function copyButton(item) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy this answer");
  button.addEventListener("click", async () => {
    await copyText(answerText(item));
    button.textContent = "Copied";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  });
  return button;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another host: the Clipboard API is off, the old way still works.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

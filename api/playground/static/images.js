// Images attached to the next chat message: file picker, drag and drop, paste; thumbnails
// with a remove button. Only groups whose model is VISION take images.

const MAX_IMAGES = 8; // the API's limit per request (it answers with a clear error beyond it too)

export class Attachments {
  constructor({ canAttach, showError }) {
    this.files = [];
    this.list = document.getElementById("attachments");
    this.input = document.getElementById("image-input");
    this.canAttach = canAttach; // () => null when allowed, else the reason
    this.showError = showError;
    this.input.addEventListener("change", () => {
      this.add([...this.input.files]);
      this.input.value = "";
    });
    const composer = document.getElementById("composer");
    composer.addEventListener("dragover", (event) => {
      if (![...event.dataTransfer.types].includes("Files")) return;
      event.preventDefault();
      composer.classList.add("dragging");
    });
    composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
    composer.addEventListener("drop", (event) => {
      composer.classList.remove("dragging");
      if (!event.dataTransfer.files.length) return;
      event.preventDefault();
      this.add([...event.dataTransfer.files]);
    });
    document.getElementById("message").addEventListener("paste", (event) => {
      const files = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
      if (!files.length) return;
      event.preventDefault();
      this.add(files);
    });
  }

  add(files) {
    const refusal = this.canAttach();
    if (refusal) {
      this.showError(refusal);
      return;
    }
    const notImages = files.filter((file) => !file.type.startsWith("image/"));
    if (notImages.length) {
      this.showError(`not an image: ${notImages.map((file) => file.name).join(", ")}`);
    }
    for (const file of files.filter((candidate) => candidate.type.startsWith("image/"))) {
      if (this.files.length >= MAX_IMAGES) {
        this.showError(`at most ${MAX_IMAGES} images per request`);
        break;
      }
      this.files.push(file);
    }
    this.render();
  }

  take() {
    const files = this.files;
    this.files = [];
    this.render();
    return files;
  }

  clear() {
    this.take();
  }

  render() {
    this.list.replaceChildren(
      ...this.files.map((file, index) => {
        const item = document.createElement("li");
        item.append(thumbnail(file));
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "×";
        remove.setAttribute("aria-label", `Remove ${file.name || "image"}`);
        remove.addEventListener("click", () => {
          this.files.splice(index, 1);
          this.render();
        });
        item.append(remove);
        return item;
      }),
    );
  }
}

export function thumbnail(file) {
  const image = document.createElement("img");
  image.src = URL.createObjectURL(file);
  image.alt = file.name || "attached image";
  return image;
}

// The API key dialog: shown when the server answers 401, resolves with the key typed.

export function keyDialog() {
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  const message = document.getElementById("key-message");
  return (text) =>
    new Promise((resolve) => {
      message.textContent = text;
      input.value = "";
      const submitted = (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        form.removeEventListener("submit", submitted);
        dialog.close();
        resolve(key);
      };
      form.addEventListener("submit", submitted);
      // Escape would close the dialog with no key: every request waits for one, so ask again.
      dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
      dialog.showModal();
      input.focus();
    });
}

// What every page shares: the header's log-out button.
import { api } from "./api.js";

export function setupChrome() {
  for (const button of document.querySelectorAll('[data-action="logout"]')) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api.logout();
      } finally {
        window.location.assign("/");
      }
    });
  }
}

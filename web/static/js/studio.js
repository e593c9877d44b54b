// The studio: where an anchor finds the server URL and stream key for OBS, rotates the key,
// sets the title, and sees a preview of their own stream once it is live.
import { api, liveChannel } from "./api.js";
import { setupChrome } from "./chrome.js";
import { bindControls, LivePlayer } from "./player.js";
import { $, copyText, poll, viewersLabel } from "./ui.js";

const STATUS_POLL_MS = 4000;

const studio = $("#studio");
const channel = studio.dataset.channel;
const message = $("#studio-message");
const keyInput = $("#stream-key");
const player = new LivePlayer($("#video"));
const playerRoot = $("#player");

function say(text) {
  message.textContent = text;
}

function showAccount(me) {
  $("#rtmp-url").value = me.rtmp_url;
  keyInput.value = me.stream_key;
  $("#whip-url").value = me.whip_url || "";
  const title = $("#title-input");
  const displayName = $("#display-name-input");
  if (document.activeElement !== title) title.value = me.title || "";
  if (document.activeElement !== displayName) displayName.value = me.display_name || "";
}

async function loadAccount() {
  try {
    showAccount(await api.me());
  } catch (err) {
    if (err.status === 401) window.location.assign("/login?next=/studio");
    else say(`Could not load your account: ${err.message}`);
  }
}

for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", async () => {
    const input = document.getElementById(button.dataset.copy);
    const label = button.textContent;
    const ok = await copyText(input.value, input);
    button.textContent = ok ? "Copied" : "Press Ctrl+C";
    say(ok ? `${input.labels[0]?.textContent || "Value"} copied to the clipboard.` : "Copy it by hand: it is selected.");
    setTimeout(() => { button.textContent = label; }, 1600);
  });
}

$('[data-action="reveal"]').addEventListener("click", (event) => {
  const button = event.currentTarget;
  const show = keyInput.type === "password";
  keyInput.type = show ? "text" : "password";
  button.textContent = show ? "Hide" : "Show";
  button.setAttribute("aria-pressed", String(show));
});

$('[data-action="rotate"]').addEventListener("click", async (event) => {
  const button = event.currentTarget;
  if (!window.confirm("Make a new stream key? The current one stops working at once; update your encoder.")) return;
  button.disabled = true;
  try {
    const { stream_key: key } = await api.rotateStreamKey();
    keyInput.value = key;
    say("New stream key made. Paste it into your encoder.");
  } catch (err) {
    say(`Could not rotate the key: ${err.message}`);
  } finally {
    button.disabled = false;
  }
});

$("#profile-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.currentTarget;
  const error = $(".form-error", form);
  const button = $('button[type="submit"]', form);
  error.hidden = true;
  button.disabled = true;
  try {
    showAccount(await api.updateMe({
      title: form.elements.title.value,
      display_name: form.elements.display_name.value,
    }));
    say("Saved.");
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
});

async function refreshStatus() {
  const info = await liveChannel(channel);
  const status = $("#studio-status");
  status.textContent = info ? `Live · ${viewersLabel(info.viewers)}` : "Offline";
  status.className = `badge ${info ? "badge-live" : "badge-offline"}`;
  playerRoot.toggleAttribute("data-offline", !info);
  if (info && (player.state === "idle" || player.state === "gone")) player.load(info.hls);
  else if (!info && player.state !== "idle") player.stop("idle");
}

setupChrome();
bindControls(player, playerRoot);
window.livesrvPlayer = player;
loadAccount();
poll(refreshStatus, STATUS_POLL_MS);

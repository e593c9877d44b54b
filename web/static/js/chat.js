// The room's live chat: the WebSocket `/ws/rooms/CHANNEL`, the message list in the side
// panel, the compose box and danmaku over the video.
//
// The socket reconnects by itself with capped, jittered backoff (a server restart must not
// bring every viewer back in the same second) and resumes with `?since=<last chat id>`, so a
// short drop loses nothing the server's history still holds. Ids already shown are skipped, in
// case a resume overlaps. Everything user-provided reaches the DOM as text only.
import { api } from "./api.js";
import { Danmaku } from "./danmaku.js";
import { $, el, jitter, viewersLabel } from "./ui.js";

const MAX_ITEMS = 200; // messages kept in the DOM: a busy room must not grow the page forever
const SEEN_IDS = 1000; // ids remembered to drop duplicates after a resume
const STICK_PX = 48; // "at the bottom" tolerance for auto-scroll
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;

const ERROR_TEXT = {
  login_required: "Log in to chat.",
  too_long: "That message is too long.",
  empty: "Type a message first.",
  rate_limited: "You are sending messages too fast.",
  slow_mode: "Slow mode is on: wait a little before the next message.",
  muted: "You are muted in this room for now.",
  banned: "You are banned from this room's chat.",
  blocked_word: "That message contains a blocked word.",
};

/** Starts chat for the watch page's `room` ({channel, panel, feed, compose, player}). */
export function startChat(room) {
  const chat = new RoomChat(room);
  chat.start();
  return chat;
}

class RoomChat {
  constructor(room) {
    this.room = room;
    this.feed = room.feed;
    this.form = room.compose;
    this.input = $("input", this.form);
    this.sendButton = $("button[type=submit]", this.form);
    this.status = $("#room-status", room.panel);
    this.danmaku = new Danmaku($("#player"));
    this.toggle = $("#danmaku-toggle");
    this.socket = null;
    this.lastId = null;
    this.seen = new Set();
    this.attempts = 0;
    this.retryTimer = null;
    this.me = null;
  }

  start() {
    this.showToggle();
    this.toggle.addEventListener("click", () => {
      this.danmaku.setEnabled(!this.danmaku.enabled);
      this.showToggle();
    });
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.setCompose(false, "Connecting…");
    this.whoAmI();
    this.connect();
    // a tab coming back from the background reconnects at once instead of waiting out a backoff
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.socket === null && this.retryTimer !== null) {
        clearTimeout(this.retryTimer);
        this.connect();
      }
    });
  }

  async whoAmI() {
    try {
      const me = await api.me();
      this.me = me && me.username ? me.username : null;
    } catch {
      this.me = null; // 401: a guest, who may read but not send
    }
    this.updateCompose();
  }

  // ----- the socket

  url() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${window.location.host}/ws/rooms/${encodeURIComponent(this.room.channel)}`;
    if (this.lastId !== null) url += `?since=${encodeURIComponent(this.lastId)}`;
    return url;
  }

  connect() {
    this.retryTimer = null;
    let socket;
    try {
      socket = new WebSocket(this.url());
    } catch (err) {
      console.warn("livesrv: cannot open the room socket", err);
      this.retry();
      return;
    }
    this.socket = socket;
    socket.addEventListener("open", () => {
      this.updateCompose();
      this.setStatus("");
    });
    socket.addEventListener("message", (event) => {
      // the backoff resets on the first event, not on "open": a server that accepts and drops
      // at once (overloaded, or refusing us) must not be hammered every second
      this.attempts = 0;
      this.receive(event.data);
    });
    // "error" is always followed by "close": one place handles both
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.room.viewers = null; // stale now: the page's poll takes over until we are back
      this.updateCompose();
      this.retry();
    });
  }

  retry() {
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempts);
    this.attempts += 1;
    this.setStatus("Chat disconnected. Reconnecting…");
    this.retryTimer = setTimeout(() => this.connect(), jitter(delay));
  }

  get connected() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  send() {
    const text = this.input.value.trim();
    if (!text) return;
    if (!this.connected) {
      this.setStatus("Not connected yet. Your message is still in the box.");
      return;
    }
    this.socket.send(JSON.stringify({ type: "chat", text }));
    this.input.value = "";
    this.setStatus("");
  }

  // ----- incoming events

  receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      console.warn("livesrv: the room sent something that is not JSON");
      return;
    }
    if (!message || typeof message !== "object") return;
    // one layout read before and one scroll after a whole frame, however many events it holds
    const stick = this.atBottom();
    const fragment = document.createDocumentFragment();
    this.handle(message, fragment, true);
    if (!fragment.hasChildNodes()) return;
    $(".room-placeholder", this.feed)?.remove();
    this.feed.append(fragment);
    while (this.feed.childElementCount > MAX_ITEMS) this.feed.firstElementChild.remove();
    if (stick) this.feed.scrollTop = this.feed.scrollHeight;
  }

  handle(message, out, live) {
    switch (message.type) {
      case "batch":
        for (const event of asList(message.events)) this.handle(event, out, live);
        break;
      case "history":
        // replayed messages go to the list only: old chat does not fly over the video
        for (const event of asList(message.events)) this.handle(event, out, false);
        break;
      case "chat":
        if (this.isNew(message.id)) {
          out.append(this.chatItem(message));
          if (live) this.danmaku.add(String(message.text ?? ""), { mine: this.me !== null && message.user === this.me });
        }
        break;
      case "gift":
        if (this.isNew(message.id)) {
          out.append(this.giftItem(message));
          // the hook for gifts.js (animations, leaderboard): one socket serves both; `live` is
          // false for replayed history, which is listed but not animated
          document.dispatchEvent(new CustomEvent("livesrv:gift", { detail: { event: message, live } }));
        }
        break;
      case "viewers":
        this.showViewers(message.count);
        break;
      case "error":
        this.showError(message);
        break;
      default:
        break; // newer servers may send more: ignore what we do not know
    }
  }

  /** False for an id already shown; records chat ids for resuming. */
  isNew(id) {
    if (id === undefined || id === null) return true;
    const key = String(id);
    if (this.seen.has(key)) return false;
    this.seen.add(key);
    if (this.seen.size > SEEN_IDS) this.seen.delete(this.seen.values().next().value);
    return true;
  }

  chatItem(message) {
    if (message.id !== undefined && message.id !== null) this.lastId = String(message.id);
    const mine = this.me !== null && message.user === this.me;
    return el("li", { class: `chat-item${mine ? " chat-mine" : ""}`, dataset: { id: String(message.id ?? "") } },
      el("span", { class: "chat-user" }, String(message.user ?? "")),
      el("span", { class: "chat-text" }, String(message.text ?? "")));
  }

  giftItem(message) {
    const gift = message.name ??
      (message.gift && typeof message.gift === "object" ? message.gift.name ?? message.gift.id : message.gift);
    const count = Number(message.count) || 1;
    return el("li", { class: "chat-item chat-gift", dataset: { id: String(message.id ?? "") } },
      el("span", { class: "chat-user" }, String(message.user ?? "")),
      el("span", { class: "chat-text" }, `sent ${String(gift ?? "a gift")}${count > 1 ? ` ×${count}` : ""}`));
  }

  showViewers(count) {
    const node = $("#viewer-count");
    if (!node || !Number.isFinite(Number(count))) return;
    this.room.viewers = Number(count); // watch.js's slower poll shows this one, not its own
    node.textContent = viewersLabel(count);
    node.hidden = !this.room.live; // watch.js owns live/offline; offline shows no count
  }

  showError(message) {
    const code = String(message.code ?? "");
    if (code === "login_required") {
      this.me = null;
      this.updateCompose();
    }
    this.setStatus(ERROR_TEXT[code] || String(message.message || "The room refused that."), true);
  }

  atBottom() {
    const f = this.feed;
    return f.scrollHeight - f.scrollTop - f.clientHeight < STICK_PX;
  }

  // ----- compose box and status line

  updateCompose() {
    if (this.me === null) {
      this.setCompose(false, "Log in to chat");
      this.showLogin(true);
    } else {
      this.showLogin(false);
      this.setCompose(this.connected, this.connected ? "Say something…" : "Connecting…");
    }
  }

  setCompose(enabled, placeholder) {
    this.input.disabled = !enabled;
    this.sendButton.disabled = !enabled;
    this.input.placeholder = placeholder;
  }

  showLogin(show) {
    let link = $("#room-login", this.room.panel);
    if (show && !link) {
      const next = window.location.pathname + window.location.search;
      link = el("a", { id: "room-login", class: "room-login", href: `/login?next=${encodeURIComponent(next)}` },
        "Log in to chat");
      this.form.before(link);
    } else if (!show && link) {
      link.remove();
    }
  }

  setStatus(text, isError = false) {
    if (!this.status) return;
    this.status.textContent = text;
    this.status.hidden = !text;
    this.status.classList.toggle("is-error", isError);
  }

  showToggle() {
    const on = this.danmaku.enabled;
    this.toggle.setAttribute("aria-pressed", on ? "true" : "false");
    this.toggle.textContent = on ? "Danmaku on" : "Danmaku off";
    this.toggle.title = on ? "Hide the messages flying over the video" : "Show messages over the video";
  }
}

function asList(value) {
  return Array.isArray(value) ? value : [];
}

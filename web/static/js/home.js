// The home page: a grid of live channels from GET /api/live, refreshed every few seconds.
// Cards are kept by channel and updated in place, so a refresh never reloads thumbnails
// or moves keyboard focus.
import { api } from "./api.js";
import { setupChrome } from "./chrome.js";
import { $, el, initial, liveDuration, poll, viewersLabel } from "./ui.js";

const REFRESH_MS = 5000;
const THUMB_REFRESH_MS = 30000; // a thumbnail is a recent frame: refresh it now and then

const grid = $("#channel-grid");
const empty = $("#empty-state");
const count = $("#live-count");
const loadError = $("#load-error");
const cards = new Map(); // channel -> {item, parts}

function eyeIcon() {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "icon");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("fill", "currentColor");
  path.setAttribute("d", "M12 5C6.5 5 2.7 9.3 1.5 12c1.2 2.7 5 7 10.5 7s9.3-4.3 10.5-7C21.3 9.3 17.5 5 12 5zm0 11.5a4.5 4.5 0 1 1 0-9 4.5 4.5 0 0 1 0 9zm0-2.5a2 2 0 1 0 0-4 2 2 0 0 0 0 4z");
  svg.append(path);
  return svg;
}

/** The thumbnail over the anchor's initial: the image shows only once it has loaded (it 404s
 * until the first one is made), so there is never a broken-image icon. It stays rendered
 * (transparent, not display:none) because a lazy image that is not rendered never loads. */
function thumbnail() {
  const placeholder = el("span", { class: "thumb-placeholder", "aria-hidden": "true" });
  const img = el("img", { class: "thumb-img", alt: "", loading: "lazy", decoding: "async" });
  img.addEventListener("load", () => img.classList.add("is-loaded"));
  img.addEventListener("error", () => img.classList.remove("is-loaded"));
  return { img, placeholder };
}

function createCard(info) {
  const { img, placeholder } = thumbnail();
  const parts = {
    link: el("a", { class: "card-link" }),
    img,
    placeholder,
    viewers: el("span", { class: "card-viewers" }),
    duration: el("span", { class: "card-duration" }),
    title: el("h2", { class: "card-title" }),
    anchor: el("p", { class: "card-anchor" }),
    avatar: el("span", { class: "avatar avatar-sm", "aria-hidden": "true" }),
    thumbLoadedAt: 0,
    thumbUrl: "",
  };
  parts.link.append(
    el("div", { class: "card-thumb" },
      placeholder, img,
      el("span", { class: "badge badge-live card-badge" }, "LIVE"),
      el("span", { class: "card-viewers-wrap" }, eyeIcon(), parts.viewers),
      parts.duration),
    el("div", { class: "card-body" },
      parts.avatar,
      el("div", { class: "card-text" }, parts.title, parts.anchor)),
  );
  const item = el("li", { class: "card", dataset: { channel: info.channel } }, parts.link);
  return { item, parts };
}

function updateCard(card, info, now) {
  const { parts } = card;
  const name = info.display_name || info.channel;
  parts.link.href = info.watch || `/watch/${encodeURIComponent(info.channel)}`;
  parts.link.setAttribute("aria-label", `${info.title}, ${name}, live, ${viewersLabel(info.viewers)}`);
  parts.title.textContent = info.title;
  parts.title.title = info.title;
  parts.anchor.textContent = name;
  parts.avatar.textContent = initial(name);
  parts.placeholder.textContent = initial(name);
  parts.viewers.textContent = viewersLabel(info.viewers);
  parts.duration.textContent = liveDuration(info.started_at, now);
  parts.duration.dataset.startedAt = info.started_at;
  if (info.thumbnail && (info.thumbnail !== parts.thumbUrl || now - parts.thumbLoadedAt > THUMB_REFRESH_MS)) {
    parts.thumbUrl = info.thumbnail;
    parts.thumbLoadedAt = now;
    const url = new URL(info.thumbnail, window.location.href);
    url.searchParams.set("t", String(Math.floor(now / THUMB_REFRESH_MS))); // past the HTTP cache
    parts.img.src = url.href;
  }
}

function render(channels) {
  const now = Date.now();
  const seen = new Set();
  let previous = null;
  for (const info of channels) {
    seen.add(info.channel);
    let card = cards.get(info.channel);
    if (!card) {
      card = createCard(info);
      cards.set(info.channel, card);
    }
    updateCard(card, info, now);
    // keep the server's order (most watched first), moving only what moved
    const expected = previous ? previous.nextSibling : grid.firstChild;
    if (expected !== card.item) grid.insertBefore(card.item, expected);
    previous = card.item;
  }
  for (const [channel, card] of cards) {
    if (!seen.has(channel)) {
      card.item.remove();
      cards.delete(channel);
    }
  }
  empty.hidden = channels.length > 0;
  grid.hidden = channels.length === 0;
  count.textContent = channels.length ? `${channels.length} live` : "";
  grid.setAttribute("aria-busy", "false");
}

async function refresh() {
  try {
    const channels = await api.live();
    loadError.hidden = true;
    render(Array.isArray(channels) ? channels : []);
  } catch (err) {
    loadError.textContent = `Could not load live channels: ${err.message}`;
    loadError.hidden = false;
  }
}

setInterval(() => {
  const now = Date.now();
  for (const { parts } of cards.values()) {
    parts.duration.textContent = liveDuration(parts.duration.dataset.startedAt, now);
  }
}, 1000);

setupChrome();
poll(refresh, REFRESH_MS);

// Danmaku: chat messages flying right to left over the video, in lanes.
//
// Each item is absolutely positioned at the right edge of a layer over the player and moved
// by a CSS animation on `transform` only (compositor work, no layout per frame). The travel
// distance is a CSS variable set once per resize, never measured per item: we estimate an
// item's width from its length to pick a free lane, so adding an item never forces a layout.
// Busy rooms are capped (MAX_ITEMS on screen); the surplus is simply not flown (the list in
// the side panel still has every message).
import { el } from "./ui.js";

const LANES = 8;
const MAX_ITEMS = 40;
const DURATION_MS = 8000;
const CHAR_PX = 16; // rough width of one character at the danmaku font size
const GAP_PX = 24;
const STORAGE_KEY = "livesrv.danmaku";

export class Danmaku {
  /** @param {HTMLElement} stage the element to fly over (the player) */
  constructor(stage) {
    this.layer = el("div", { class: "danmaku-layer", "aria-hidden": "true" });
    stage.append(this.layer);
    this.width = stage.clientWidth || 640;
    this.laneFreeAt = new Array(LANES).fill(0);
    this.count = 0;
    this.enabled = readEnabled();
    this.layer.hidden = !this.enabled;
    this.setWidth(this.width);
    if (typeof ResizeObserver === "function") {
      new ResizeObserver((entries) => {
        const box = entries[entries.length - 1].contentRect;
        if (box.width) this.setWidth(box.width);
      }).observe(stage);
    }
  }

  setWidth(width) {
    this.width = width;
    this.layer.style.setProperty("--danmaku-distance", `${Math.round(width)}px`);
  }

  setEnabled(enabled) {
    this.enabled = enabled;
    this.layer.hidden = !enabled;
    if (!enabled) this.clear(); // nothing keeps animating behind a hidden layer
    try {
      localStorage.setItem(STORAGE_KEY, enabled ? "on" : "off");
    } catch {
      // private mode or storage full: the choice lasts for this page only
    }
  }

  clear() {
    this.layer.replaceChildren();
    this.count = 0;
    this.laneFreeAt.fill(0);
  }

  /** Flies `text` if it is on, there is room, and a lane is free; `mine` highlights it. */
  add(text, { mine = false } = {}) {
    if (!this.enabled || this.count >= MAX_ITEMS || document.hidden) return false;
    const now = performance.now();
    const lane = this.laneFreeAt.findIndex((t) => t <= now);
    if (lane < 0) return false;
    const estimated = Math.min(text.length * CHAR_PX, this.width);
    const speed = (this.width + estimated) / DURATION_MS; // px per ms
    // the lane is free again once this item's tail has cleared the right edge by a gap
    this.laneFreeAt[lane] = now + (estimated + GAP_PX) / speed;
    const item = el("span", { class: `danmaku-item danmaku-lane-${lane}${mine ? " danmaku-mine" : ""}` },
      text);
    item.addEventListener("animationend", () => this.remove(item), { once: true });
    this.count += 1;
    this.layer.append(item);
    return true;
  }

  remove(item) {
    if (item.parentNode !== this.layer) return;
    item.remove();
    this.count -= 1;
  }
}

function readEnabled() {
  try {
    return localStorage.getItem(STORAGE_KEY) !== "off";
  } catch {
    return true;
  }
}

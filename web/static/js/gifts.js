// Coins and gifts on the watch page: the viewer's balance with a recharge dialog, the gift
// panel, gift animations over the video, and the room's top gifters.
//
// Gift events come from the room socket chat.js already holds (it re-dispatches each new one
// as the document event "livesrv:gift"): no second socket per viewer.
//
// Money calls carry an idempotency key: a fresh one per click, and the SAME one when a network
// error (or a proxy's 502-504) makes us try again, so a retry can never charge or credit twice
// (the server answers a replayed key with the first result).
//
// Everything degrades: a server without the wallet API (404 on /api/gifts) leaves the panel and
// the leaderboard tab hidden; a guest sees gifts fly and the leaderboard, and a login link
// where the send button would be. User strings reach the DOM as text only (ui.js el()).
import { ApiError, request } from "./api.js";
import { $, compactCount, el, initial } from "./ui.js";

/** The count selector's choices (the server accepts 1..999). */
const COUNTS = [1, 10, 66, 99, 188, 520];
const NETWORK_RETRIES = 3; // after the first try, 0.5 s, 1 s, 2 s apart
const RETRY_BASE_MS = 500;
const CATALOG_RETRY_MS = 10000;

const BANNER_SLOTS = 2; // banners on screen at once; the rest wait in the queue
const BANNER_MS = 3000; // a banner stays this long after its last combo step...
const BUSY_BANNER_MS = 1200; // ...or this long while more than BUSY_QUEUE banners wait
const BUSY_QUEUE = 4;
const LEAVE_MS = 350; // its slide-out (0 with reduced motion)
const BIG_MS = 3200; // the big animation for an expensive gift
const MAX_QUEUE = 24; // waiting banners; past it the oldest cheap one is dropped (the chat list keeps it)
const MAX_BIG_QUEUE = 4;
/** The catalog's animation hints (config/gifts.toml) that get the big animation... */
const BIG_HINTS = new Set(["fullscreen", "big"]);
/** ...and the unit price (coins) that gets it whatever the hint (an event's gift may be unknown
 * to a catalog loaded earlier). */
const BIG_PRICE = 500;

const LEADERBOARD_MIN_MS = 2000; // gift bursts refresh the leaderboard at most this often
// a gift's refresh waits this long: the server keeps a leaderboard ~1 s (GiftService), so an
// immediate fetch could get the list from just before this gift and show it until the next
const GIFT_SETTLE_MS = 1500;

const reducedMotion = typeof window.matchMedia === "function"
  ? window.matchMedia("(prefers-reduced-motion: reduce)")
  : { matches: false };

/** Starts the gift features for the watch page's `room` ({channel, panel, player, live, …}). */
export function startGifts(room) {
  const gifts = new RoomGifts(room);
  gifts.start();
  return gifts;
}

// ---------------------------------------------------------------------------------------
// The API: api.js's request (ApiError with status 0 when the server was not reached)

const call = request;

/** fn() again on errors where the request may or may not have landed; fn must reuse its key. */
async function withRetry(fn) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await fn();
    } catch (err) {
      const transient = err instanceof ApiError && (err.status === 0 || (err.status >= 502 && err.status <= 504));
      if (!transient || attempt >= NETWORK_RETRIES) throw err;
      await new Promise((resolve) => setTimeout(resolve, RETRY_BASE_MS * 2 ** attempt));
    }
  }
}

/** 128 random bits as hex (crypto.randomUUID needs a secure context; a LAN http:// is not). */
function newKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function coins(n) {
  const value = Number(n) || 0;
  return `${value.toLocaleString()} ${value === 1 ? "coin" : "coins"}`;
}

function money(cents, currency) {
  const amount = (Number(cents) || 0) / 100;
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: String(currency || "USD") }).format(amount);
  } catch {
    return `${amount.toFixed(2)} ${String(currency ?? "")}`.trim(); // an unknown currency code
  }
}

function loginHref() {
  return `/login?next=${encodeURIComponent(window.location.pathname + window.location.search)}`;
}

const SVG = "http://www.w3.org/2000/svg";

/** A gift-box glyph (the catalog has no pictures; the hint picks its colour through CSS). */
function giftGlyph(hint) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  svg.setAttribute("class", `gift-glyph gift-hint-${String(hint || "plain").replace(/[^a-z0-9_-]/gi, "")}`);
  const box = document.createElementNS(SVG, "path");
  box.setAttribute("d", "M4 11h16v9H4zM3 7h18v4H3zM12 7v13M12 7c-1.5-3-5-3.5-5-1s3 1 5 1c2 0 5 1.5 5-1s-3.5-2-5 1");
  box.setAttribute("fill", "none");
  box.setAttribute("stroke", "currentColor");
  box.setAttribute("stroke-width", "1.8");
  box.setAttribute("stroke-linejoin", "round");
  svg.append(box);
  return svg;
}

// ---------------------------------------------------------------------------------------
// The page part: wallet, gift panel, and the wiring of the other pieces

class RoomGifts {
  constructor(room) {
    this.room = room;
    this.channel = room.channel;
    this.bar = $("#gift-bar");
    this.list = $("#gift-list");
    this.countSelect = $("#gift-count");
    this.sendButton = $("#gift-send");
    this.sendRow = $("#gift-send-row");
    this.status = $("#gift-status");
    this.balanceBox = $("#coin-balance");
    this.balanceText = $("#coin-amount");
    this.earningsBox = $("#coin-earnings");
    this.rechargeButton = $("#recharge-open");
    this.loginLink = $("#gift-login");
    /** gift id -> {id, name, price, animation} */
    this.catalog = new Map();
    /** undefined: not known yet; null: a guest; else {username, channel} */
    this.me = undefined;
    this.balance = null;
    this.selected = null;
    this.sending = false;
    this.walletTimer = null;
    /** null until the catalog answers; false: this server has no wallet API (404) */
    this.available = null;
    this.show = new GiftShow($("#player"), (id) => this.catalog.get(id));
    this.recharge = new RechargeDialog($("#recharge-dialog"), {
      balance: () => this.balance,
      paid: (balance) => this.setBalance(balance),
      pending: () => {
        this.setStatus("Payment started: your coins arrive once the provider confirms it.");
        setTimeout(() => this.loadWallet(), 3000);
      },
      loggedOut: () => this.setGuest(),
    });
    this.board = new Leaderboard(room);
  }

  start() {
    // animations work from the event alone (it carries name and price), even before the catalog
    document.addEventListener("livesrv:gift", (event) => this.onGift(event.detail));
    this.sendButton.addEventListener("click", () => this.send());
    this.rechargeButton.addEventListener("click", () => this.recharge.open());
    this.loginLink.href = loginHref();
    for (const n of COUNTS) this.countSelect.append(el("option", { value: n }, `×${n}`));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.me) this.loadWallet(); // coins spent or bought on another device
    });
    this.loadCatalog(0);
  }

  /** fn again in a while after a transient failure; five tries at most (gifts fly regardless) */
  retryLater(fn, attempt) {
    if (attempt < 5) setTimeout(fn, CATALOG_RETRY_MS);
  }

  async loadCatalog(attempt) {
    let catalog;
    try {
      catalog = await call("GET", "/api/gifts");
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.available = false; // no wallet API on this server: everything stays hidden
        return;
      }
      console.warn("livesrv: cannot load the gift catalog", err);
      this.retryLater(() => this.loadCatalog(attempt + 1), attempt);
      return;
    }
    this.catalog.clear();
    for (const gift of Array.isArray(catalog) ? catalog : []) {
      if (gift && gift.id !== undefined) this.catalog.set(String(gift.id), gift);
    }
    this.available = true;
    this.renderCatalog();
    this.bar.hidden = false;
    this.board.enable();
    await this.loadMe(0);
  }

  renderCatalog() {
    const items = [];
    for (const gift of this.catalog.values()) {
      const button = el("button", {
        type: "button", class: "gift-item", "aria-pressed": "false",
        dataset: { gift: String(gift.id), hint: String(gift.animation ?? "") },
      },
      giftGlyph(gift.animation),
      el("span", { class: "gift-name" }, String(gift.name ?? gift.id)),
      el("span", { class: "gift-price" }, coins(gift.price)));
      button.addEventListener("click", () => this.select(String(gift.id)));
      items.push(el("li", {}, button));
    }
    this.list.replaceChildren(...items);
    if (this.catalog.size) this.select(this.catalog.keys().next().value);
  }

  select(id) {
    this.selected = id;
    for (const button of this.list.querySelectorAll(".gift-item")) {
      button.setAttribute("aria-pressed", button.dataset.gift === id ? "true" : "false");
    }
    this.updateSend();
  }

  async loadMe(attempt) {
    try {
      const me = await call("GET", "/api/me");
      this.me = me && me.username ? { username: String(me.username), channel: String(me.channel ?? me.username) } : null;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        this.me = null;
      } else {
        console.warn("livesrv: cannot tell who is watching", err);
        this.retryLater(() => this.loadMe(attempt + 1), attempt);
      }
    }
    if (this.me === null) this.setGuest();
    else if (this.me) await this.loadWallet();
    this.updateSend();
  }

  async loadWallet() {
    try {
      const wallet = await call("GET", "/api/wallet");
      this.setBalance(wallet.balance);
      const anchor = this.me && this.me.channel === this.channel;
      this.earningsBox.hidden = !anchor;
      if (anchor) this.earningsBox.textContent = `Earned ${coins(wallet.earnings)}`;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) this.setGuest();
      else console.warn("livesrv: cannot load the wallet", err);
    }
  }

  setGuest() {
    this.me = null;
    this.balance = null;
    this.balanceBox.hidden = true;
    this.rechargeButton.hidden = true;
    this.earningsBox.hidden = true;
    this.loginLink.hidden = false;
    this.updateSend();
  }

  setBalance(balance) {
    if (!Number.isFinite(Number(balance))) return;
    this.balance = Number(balance);
    this.balanceText.textContent = this.balance.toLocaleString();
    this.balanceBox.hidden = false;
    this.rechargeButton.hidden = false;
    this.loginLink.hidden = true;
    this.recharge.showBalance(this.balance);
  }

  get isAnchor() {
    return Boolean(this.me && this.me.channel === this.channel);
  }

  updateSend() {
    // the anchor on their own page watches gifts arrive; gifting yourself is refused anyway
    this.sendRow.hidden = this.isAnchor;
    this.list.hidden = this.isAnchor;
    this.sendButton.disabled = this.sending || !this.selected || !this.me;
  }

  async send() {
    if (this.sending || !this.selected) return;
    if (!this.me) {
      this.setStatus("Log in to send gifts.", true);
      return;
    }
    const gift = this.catalog.get(this.selected);
    const count = Number(this.countSelect.value) || 1;
    const key = newKey(); // this click's: a retry below reuses it, the next click gets its own
    const path = `/api/rooms/${encodeURIComponent(this.channel)}/gifts`;
    this.sending = true;
    this.updateSend();
    this.setStatus("");
    try {
      const result = await withRetry(() => call("POST", path, { gift: gift.id, count, idempotency_key: key }));
      this.setBalance(result.balance);
      this.setStatus(`Sent ${gift.name ?? gift.id} ×${count}.`);
    } catch (err) {
      this.sendFailed(err);
    } finally {
      this.sending = false;
      this.updateSend();
    }
  }

  sendFailed(err) {
    const status = err instanceof ApiError ? err.status : -1;
    if (status === 402) {
      const body = err.body || {};
      if (Number.isFinite(Number(body.balance))) this.setBalance(body.balance);
      const needed = Number.isFinite(Number(body.needed)) ? ` It costs ${coins(body.needed)}.` : "";
      this.setStatus(`Not enough coins for that gift.${needed} Recharge to send it.`, true);
      this.recharge.open();
    } else if (status === 401) {
      this.setGuest();
      this.setStatus("Log in to send gifts.", true);
    } else {
      if (status < 0) console.warn("livesrv: sending a gift failed", err);
      this.setStatus(err instanceof ApiError ? err.message : "Sending the gift failed.", true);
    }
  }

  setStatus(text, isError = false) {
    this.status.textContent = text;
    this.status.hidden = !text;
    this.status.classList.toggle("is-error", isError);
  }

  onGift(detail) {
    const event = detail && detail.event;
    if (!event || typeof event !== "object") return;
    if (detail.live) this.show.add(event);
    this.board.changed();
    // the anchor's own page: the earnings figure follows the gifts (at most every few seconds)
    if (this.isAnchor && this.walletTimer === null) {
      this.walletTimer = setTimeout(() => {
        this.walletTimer = null;
        this.loadWallet();
      }, GIFT_SETTLE_MS);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Recharge: a <dialog> of coin packages

class RechargeDialog {
  constructor(dialog, hooks) {
    this.dialog = dialog;
    this.hooks = hooks;
    this.form = $("form", dialog);
    this.list = $("#package-list", dialog);
    this.error = $("#recharge-error", dialog);
    this.payButton = $("#recharge-pay", dialog);
    this.balanceText = $("#recharge-balance", dialog);
    this.packages = null;
    this.paying = false;
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.pay();
    });
    $("#recharge-cancel", dialog).addEventListener("click", () => this.dialog.close());
    // a click on the backdrop (outside the form) closes it, as on the apps' bottom sheets
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close();
    });
  }

  showBalance(balance) {
    this.balanceText.textContent = coins(balance);
  }

  async open() {
    this.setError("");
    const balance = this.hooks.balance();
    if (balance !== null) this.showBalance(balance);
    if (!this.dialog.open) this.dialog.showModal();
    if (this.packages === null) await this.load();
  }

  async load() {
    this.payButton.disabled = true;
    try {
      const packages = await call("GET", "/api/wallet/packages");
      this.packages = Array.isArray(packages) ? packages : [];
    } catch (err) {
      this.setError(err instanceof ApiError ? err.message : "Cannot load the coin packages.");
      return;
    }
    const items = this.packages.map((pack, index) => el("label", { class: "package" },
      el("input", { type: "radio", name: "package", value: index, checked: index === 0 }),
      el("span", { class: "package-coins" }, coins(pack.coins)),
      el("span", { class: "package-price" }, money(pack.price_cents, pack.currency))));
    this.list.replaceChildren(el("legend", { class: "visually-hidden" }, "Coin packages"), ...items);
    this.payButton.disabled = this.packages.length === 0;
    $("input", this.list)?.focus();
  }

  async pay() {
    if (this.paying || !this.packages) return;
    const checked = $("input[name=package]:checked", this.list);
    const pack = checked ? this.packages[Number(checked.value)] : null;
    if (!pack) {
      this.setError("Choose a package first.");
      return;
    }
    const key = newKey(); // one per press of Pay; a network retry sends the same order again
    this.paying = true;
    this.payButton.disabled = true;
    this.payButton.textContent = "Paying…";
    this.setError("");
    try {
      const order = await withRetry(() => call("POST", "/api/wallet/recharge", { package: pack.id, idempotency_key: key }));
      if (order && order.status === "paid") {
        this.hooks.paid(order.balance);
      } else {
        this.hooks.pending(); // a real provider confirms later, through its webhook
      }
      this.dialog.close();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        this.hooks.loggedOut();
        this.dialog.close();
      } else {
        this.setError(err instanceof ApiError ? err.message : "The payment failed.");
      }
    } finally {
      this.paying = false;
      this.payButton.disabled = false;
      this.payButton.textContent = "Pay";
    }
  }

  setError(text) {
    this.error.textContent = text;
    this.error.hidden = !text;
  }
}

// ---------------------------------------------------------------------------------------
// Gift animations over the video: banners in a few slots, combos merged, a queue for bursts

class GiftShow {
  constructor(stage, lookup) {
    this.lookup = lookup;
    this.layer = el("div", { class: "gift-layer", "aria-hidden": "true" }); // the chat list announces gifts
    stage.append(this.layer);
    /** slot index -> the banner showing there, or null */
    this.slots = new Array(BANNER_SLOTS).fill(null);
    this.queue = [];
    this.bigQueue = [];
    this.bigShowing = null;
  }

  add(event) {
    if (document.hidden) return; // nobody is looking: do not pile up animations for later
    const item = this.describe(event);
    // a combo step of a banner on screen (or waiting) updates it instead of adding another
    const showing = this.slots.find((b) => b && b.key === item.key);
    if (showing && item.combo > showing.combo) {
      this.bump(showing, item.combo);
    } else {
      const waiting = this.queue.find((b) => b.key === item.key);
      if (waiting && item.combo > waiting.combo) waiting.combo = item.combo;
      else this.enqueue(item);
    }
    if (item.big) this.enqueueBig(item);
    this.pump();
  }

  describe(event) {
    const giftId = String(event.gift ?? "");
    const known = this.lookup(giftId);
    const name = String(event.name ?? known?.name ?? giftId);
    const price = Number(event.price ?? known?.price) || 0;
    const hint = String(known?.animation ?? "");
    const count = Math.max(1, Number(event.count) || 1);
    const combo = Math.max(1, Number(event.combo) || count);
    return {
      key: `${String(event.user ?? "")}\u0000${giftId}`,
      user: String(event.user ?? ""), name, hint, count, combo,
      big: price >= BIG_PRICE || BIG_HINTS.has(hint.toLowerCase()),
    };
  }

  enqueue(item) {
    this.queue.push(item);
    if (this.queue.length > MAX_QUEUE) {
      const cheap = this.queue.findIndex((b) => !b.big);
      this.queue.splice(cheap >= 0 ? cheap : 0, 1);
    }
  }

  enqueueBig(item) {
    const waiting = this.bigQueue.find((b) => b.key === item.key);
    if (waiting) waiting.combo = Math.max(waiting.combo, item.combo);
    else if (this.bigQueue.length < MAX_BIG_QUEUE) this.bigQueue.push({ ...item });
  }

  pump() {
    for (let slot = 0; slot < this.slots.length && this.queue.length; slot += 1) {
      if (this.slots[slot] === null) this.showBanner(slot, this.queue.shift());
    }
    if (this.bigShowing === null && this.bigQueue.length) this.showBig(this.bigQueue.shift());
  }

  showBanner(slot, item) {
    const comboText = el("span", { class: "gift-banner-combo" }, `x${item.combo}`);
    const node = el("div", { class: `gift-banner gift-slot-${slot}${item.big ? " is-big" : ""}`, dataset: { hint: item.hint } },
      el("span", { class: "avatar avatar-sm gift-banner-avatar" }, initial(item.user)),
      el("span", { class: "gift-banner-text" },
        el("span", { class: "gift-banner-user" }, item.user),
        el("span", { class: "gift-banner-what" }, `sent ${item.name}`)),
      giftGlyph(item.hint),
      comboText);
    const banner = { ...item, slot, node, comboText, timer: null };
    this.slots[slot] = banner;
    this.layer.append(node);
    this.scheduleLeave(banner);
  }

  bump(banner, combo) {
    banner.combo = combo;
    banner.comboText.textContent = `x${combo}`;
    // restart the little "pop" on the number (a reflow between removing and re-adding the class)
    banner.comboText.classList.remove("is-bumped");
    void banner.comboText.offsetWidth;
    banner.comboText.classList.add("is-bumped");
    this.scheduleLeave(banner);
  }

  scheduleLeave(banner) {
    clearTimeout(banner.timer);
    banner.timer = setTimeout(() => {
      banner.node.classList.add("is-leaving");
      // timers, not animationend: with reduced motion there is no animation to end
      setTimeout(() => {
        banner.node.remove();
        if (this.slots[banner.slot] === banner) this.slots[banner.slot] = null;
        this.pump();
      }, reducedMotion.matches ? 0 : LEAVE_MS);
    }, this.queue.length > BUSY_QUEUE ? BUSY_BANNER_MS : BANNER_MS);
  }

  showBig(item) {
    const node = el("div", { class: "gift-big", dataset: { hint: item.hint } },
      giftGlyph(item.hint),
      el("span", { class: "gift-big-text" }, `${item.user} sent ${item.name}`),
      el("span", { class: "gift-big-combo" }, `x${item.combo}`));
    this.bigShowing = node;
    this.layer.append(node);
    setTimeout(() => {
      node.remove();
      this.bigShowing = null;
      this.pump();
    }, BIG_MS);
  }
}

// ---------------------------------------------------------------------------------------
// The room panel's tabs, and the top gifters

class Leaderboard {
  constructor(room) {
    this.room = room;
    this.tab = $("#tab-top");
    this.panel = $("#room-top");
    this.list = $("#leaderboard");
    this.empty = $("#leaderboard-empty");
    this.scopeButtons = Array.from(this.panel.querySelectorAll("[data-scope]"));
    this.scope = null; // chosen when first shown: this live if the channel is live, else all time
    this.visible = false;
    this.stale = true;
    this.lastRefresh = 0;
    this.timer = null;
    this.generation = 0;
    for (const button of this.scopeButtons) {
      button.addEventListener("click", () => this.setScope(button.dataset.scope));
    }
    setupTabs($("#room-tabs"), (panelId) => this.setVisible(panelId === "room-top"));
  }

  /** The wallet API exists: offer the tab. */
  enable() {
    this.tab.hidden = false;
  }

  setVisible(visible) {
    this.visible = visible;
    if (!visible) return;
    if (this.scope === null) this.setScope(this.room.live ? "live" : "all");
    else if (this.stale) this.refreshSoon();
  }

  setScope(scope) {
    this.scope = scope === "live" ? "live" : "all";
    for (const button of this.scopeButtons) {
      button.setAttribute("aria-pressed", button.dataset.scope === this.scope ? "true" : "false");
    }
    this.lastRefresh = 0; // a different list: fetch it now
    this.stale = true;
    this.refreshSoon();
  }

  /** A gift arrived: refresh, at most every LEADERBOARD_MIN_MS, and only while it is shown. */
  changed() {
    this.stale = true;
    if (this.visible) this.refreshSoon(GIFT_SETTLE_MS);
  }

  refreshSoon(delay = 0) {
    if (this.timer !== null) return; // one is coming: it will fetch the newest state
    const now = performance.now();
    const wait = Math.max(delay, this.lastRefresh + LEADERBOARD_MIN_MS - now);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.refresh();
    }, wait);
  }

  async refresh() {
    if (!this.visible || this.scope === null) return;
    this.lastRefresh = performance.now();
    this.stale = false;
    const generation = ++this.generation;
    const scope = this.scope;
    let board;
    try {
      board = await call("GET", `/api/rooms/${encodeURIComponent(this.room.channel)}/leaderboard?scope=${scope}`);
    } catch (err) {
      console.warn("livesrv: cannot load the leaderboard", err);
      this.stale = true;
      return;
    }
    if (generation !== this.generation) return; // a newer request (another scope) won
    this.render(Array.isArray(board && board.entries) ? board.entries : []);
  }

  render(entries) {
    this.list.replaceChildren(...entries.map((entry, index) => el("li", { class: `rank-item${index < 3 ? ` rank-top rank-${index + 1}` : ""}` },
      el("span", { class: "rank-place" }, String(index + 1)),
      el("span", { class: "avatar avatar-sm", "aria-hidden": "true" }, initial(String(entry.user ?? ""))),
      el("span", { class: "rank-user" }, String(entry.user ?? "")),
      el("span", { class: "rank-coins", title: coins(entry.coins) }, `${compactCount(entry.coins)} ${Number(entry.coins) === 1 ? "coin" : "coins"}`))));
    this.empty.hidden = entries.length > 0;
    let empty = "No gifts yet.";
    if (this.scope === "live") empty = this.room.live ? "No gifts during this live yet." : "Not live right now.";
    this.empty.textContent = empty;
  }
}

/** WAI-ARIA tabs: click or arrow keys select; onSelect(panel id) after each change. */
function setupTabs(tablist, onSelect) {
  const tabs = () => Array.from(tablist.querySelectorAll("[role=tab]")).filter((t) => !t.hidden);
  const select = (tab) => {
    for (const other of tablist.querySelectorAll("[role=tab]")) {
      const on = other === tab;
      other.setAttribute("aria-selected", on ? "true" : "false");
      other.tabIndex = on ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !on;
    }
    onSelect(tab.getAttribute("aria-controls"));
  };
  tablist.addEventListener("click", (event) => {
    const tab = event.target.closest("[role=tab]");
    if (tab) select(tab);
  });
  tablist.addEventListener("keydown", (event) => {
    const all = tabs();
    const at = all.indexOf(document.activeElement);
    if (at < 0) return;
    let next = null;
    if (event.key === "ArrowRight") next = all[(at + 1) % all.length];
    else if (event.key === "ArrowLeft") next = all[(at - 1 + all.length) % all.length];
    else if (event.key === "Home") next = all[0];
    else if (event.key === "End") next = all[all.length - 1];
    if (!next) return;
    event.preventDefault();
    next.focus();
    select(next);
  });
}

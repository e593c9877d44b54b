// Small DOM helpers shared by the pages. User-provided strings only ever reach the page as
// text (textContent, attribute values), never as HTML.

/** An element: el("a", {class: "x", href}, "text", child...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

/** The first letter of a name, for avatar placeholders. */
export function initial(name) {
  const first = Array.from((name || "").trim())[0];
  return first ? first.toUpperCase() : "?";
}

/** 1234 -> "1.2K", as live platforms show counts. */
export function compactCount(n) {
  const value = Number(n) || 0;
  if (value < 1000) return String(value);
  if (value < 1_000_000) return `${(value / 1000).toFixed(value < 10_000 ? 1 : 0)}K`.replace(".0K", "K");
  return `${(value / 1_000_000).toFixed(1)}M`.replace(".0M", "M");
}

/** How long since an ISO time, as a clock: "4:05", "1:02:09". */
export function liveDuration(startedAt, now = Date.now()) {
  const started = Date.parse(startedAt);
  if (Number.isNaN(started)) return "";
  let seconds = Math.max(0, Math.floor((now - started) / 1000));
  const h = Math.floor(seconds / 3600);
  seconds -= h * 3600;
  const m = Math.floor(seconds / 60);
  const s = seconds - m * 60;
  const pad = (v) => String(v).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
}

export function viewersLabel(n) {
  const value = Number(n) || 0;
  return `${compactCount(value)} ${value === 1 ? "viewer" : "viewers"}`;
}

/** `ms` ±10%: thousands of pages opened together (a popular stream starting) must not keep
 * polling the server in lockstep. */
export function jitter(ms) {
  return ms * (0.9 + Math.random() * 0.2);
}

/** Runs fn now and then every `ms` (jittered), never overlapping; slower while the tab is
 * hidden (a background tab has nobody to show fresh data to). Returns a stop function. */
export function poll(fn, ms, { hiddenMs = ms * 4 } = {}) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    try {
      await fn();
    } catch (err) {
      console.warn("livesrv: poll failed", err);
    }
    if (!stopped) timer = setTimeout(tick, jitter(document.hidden ? hiddenMs : ms));
  };
  const wake = () => {
    if (!document.hidden && timer !== null) {
      clearTimeout(timer);
      tick();
    }
  };
  document.addEventListener("visibilitychange", wake);
  tick();
  return () => {
    stopped = true;
    if (timer !== null) clearTimeout(timer);
    document.removeEventListener("visibilitychange", wake);
  };
}

/** Copies text; falls back to selecting the input on browsers without the async clipboard. */
export async function copyText(text, input) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (input) {
      input.focus();
      input.select();
      try {
        return document.execCommand("copy");
      } catch {
        return false;
      }
    }
    return false;
  }
}

// The watch page: the player, the channel's title/anchor/viewers, and the room panel.
//
// The page owns the "is the channel live?" question (polling GET /api/live/CHANNEL); the
// player owns playback. Offline → poll every few seconds and start by itself when the
// channel goes live. The player reporting "gone" (playlist 404) → ask the API at once:
// still live means the packager is between publishers or warming up, so reload shortly.
//
// Room features (chat, gifts) plug in through `room` below: import it, or listen for the
// "livesrv:room" event on document, which carries the same object.
import { liveChannel } from "./api.js";
import { startChat } from "./chat.js";
import { setupChrome } from "./chrome.js";
import { bindControls, LivePlayer } from "./player.js";
import { $, jitter, liveDuration, viewersLabel } from "./ui.js";

// while playing: title and viewer count (the player notices a stream ending by itself, so
// this can be slow; room events will bring the viewer count live)
const LIVE_POLL_MS = 15000;
const OFFLINE_POLL_MS = 3000; // while offline: how soon playback starts once the anchor goes live
const GONE_RELOAD_MS = 1500;

const page = $("#watch");
const channel = page.dataset.channel;
// `?ll=0` plays plain HLS (whole segments, ~3 target durations behind) instead of following
// LL-HLS parts: for a viewer whose network cannot keep up with the parts, and for comparison
const lowLatency = new URLSearchParams(window.location.search).get("ll") !== "0";
// WebRTC (WHEP) first, HLS when it fails; `?hls=1` (or an HLS mode: `?ll=0`) plays HLS only
const webrtc = lowLatency && new URLSearchParams(window.location.search).get("hls") !== "1";
const player = new LivePlayer($("#video"), { lowLatency, webrtc });
const playerRoot = $("#player");

/** The room as plug-ins see it. */
export const room = {
  channel,
  panel: $("#room-panel"),
  feed: $("#room-feed"),
  compose: $("#room-compose"),
  player,
  /** The latest GET /api/live/CHANNEL answer, or null while offline. */
  live: null,
  /** The viewer count from the room's `viewers` events while its socket is up (fresher than
   * the poll's), else null. */
  viewers: null,
  /** The chat (chat.js), once started. */
  chat: null,
  /** Coins, gifts and the leaderboard (gifts.js), once started. */
  gifts: null,
};

let liveSince = null; // started_at of the publication being played
let timer = null;

function showInfo(info) {
  room.live = info;
  const badge = $("#live-badge");
  const viewers = $("#viewer-count");
  const time = $("#live-time");
  badge.hidden = !info;
  viewers.hidden = !info;
  time.hidden = !info;
  if (!info) return;
  $("#stream-title").textContent = info.title;
  $("#stream-anchor").textContent = info.display_name || info.channel;
  viewers.textContent = viewersLabel(room.viewers ?? info.viewers);
  time.textContent = liveDuration(info.started_at);
  time.dataset.startedAt = info.started_at;
  document.title = `${info.title} · ${info.display_name || info.channel}`;
}

async function check() {
  const info = await liveChannel(channel);
  showInfo(info);
  if (!info) {
    liveSince = null;
    if (player.state !== "idle") player.stop("idle");
    setOffline(true);
    schedule(OFFLINE_POLL_MS);
    return;
  }
  setOffline(false);
  const republished = liveSince !== null && info.started_at !== liveSince;
  liveSince = info.started_at;
  if (player.state === "idle" || player.state === "gone" || player.url !== info.hls) {
    player.load(info.hls, info.whep);
  } else if (republished && player.state !== "playing") {
    // the encoder reconnected (a new publication, maybe new codec parameters) and the
    // player is not coping on its own: start over, even if it had given up
    player.retry();
  }
  schedule(LIVE_POLL_MS);
}

/** The next check in `ms` (slower in a background tab: nobody is looking). */
function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(run, jitter(document.hidden ? ms * 3 : ms));
}

async function run() {
  try {
    await check();
  } catch (err) {
    console.warn("livesrv: cannot ask whether the channel is live", err);
    schedule(OFFLINE_POLL_MS);
  }
}

function setOffline(offline) {
  playerRoot.toggleAttribute("data-offline", offline);
}

player.addEventListener("gone", () => {
  schedule(GONE_RELOAD_MS);
});

setInterval(() => {
  const time = $("#live-time");
  if (!time.hidden && time.dataset.startedAt) time.textContent = liveDuration(time.dataset.startedAt);
}, 1000);

// tests and curious developers: window.livesrvPlayer.hls, .state, .fatalErrors, .stats
window.livesrvPlayer = player;
window.livesrvRoom = room;

setupChrome();
bindControls(player, playerRoot);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && playerRoot.hasAttribute("data-offline")) schedule(0);
});
run();
// chat must never take the player down with it: a failure here is logged, playback goes on
try {
  room.chat = startChat(room);
} catch (err) {
  console.warn("livesrv: chat could not start", err);
}
// gifts load as a separate module, so one that fails to load or start cannot take the player
// and the chat down with it
import("./gifts.js")
  .then((gifts) => {
    room.gifts = gifts.startGifts(room);
    window.livesrvGifts = room.gifts;
  })
  .catch((err) => console.warn("livesrv: gifts could not start", err));
document.dispatchEvent(new CustomEvent("livesrv:room", { detail: room }));

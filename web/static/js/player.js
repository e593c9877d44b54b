// The live player: WebRTC (WHEP, whep.js) first when the page gives a WHEP URL, then hls.js on
// MediaSource where it exists, the browser's own HLS otherwise (iOS Safari has no MSE on
// iPhones), with recovery from the errors live streams produce. WebRTC that fails, or
// starts or stalls too slowly, falls back to HLS for the rest of the page's life.
//
// States: "idle" → "loading" → "playing"; "gone" when the stream's playlist disappeared
// (the page decides whether the channel is offline or will be back); "error" when recovery
// gave up; "unsupported" when neither hls.js nor native HLS can play here.
//
// Events (on the player, an EventTarget): "statechange" {state, message}; "gone".

const MEDIA_ERROR_WINDOW_MS = 3000; // a second media error this soon after the first: swap codecs
const STALL_MS = 8000; // playing but the clock stands still this long: reload the source
const LOADING_TIMEOUT_MS = 20000; // no first frame after this long: reload the source
const MAX_RELOADS = 6; // consecutive reloads without a frame played in between, then "error"
const WHEP_START_TIMEOUT_MS = 6000; // WebRTC shows no frame this long after load(): use HLS
const WHEP_STALL_MS = 4000; // WebRTC playing but the clock stands still this long: use HLS

// hls.js settings shared by both modes
const HLS_BASE_CONFIG = {
  backBufferLength: 30,
  enableWorker: true,
};

/** Low-Latency HLS: follow the parts (EXT-X-PART) with blocking playlist reloads and sit at the
 * server's PART-HOLD-BACK (3 parts, ~1.5 s) behind the live edge. NOTE: no liveSyncDuration*
 * and so no liveMaxLatency* here (hls.js accepts the latter only with the former): a
 * user-set liveSyncDuration(Count) overrides PART-HOLD-BACK, and 3 target durations would put
 * an LL viewer ~6 s behind, like plain HLS. A stall still adds a second to the target (hls.js's
 * liveSyncOnStallIncrease, capped at one target duration), so a shaky link backs off by itself.
 * A viewer starts about a second further back (hls.js starts on an independent part, i.e. a
 * keyframe, and the page takes a moment to load) and catches up by playing up to 20% fast
 * (pitch kept; hls.js only speeds up in low-latency mode): bench/glass_to_glass.py saw a new
 * viewer start 2.3-3.2 s behind and settle at ~1.6 s within ~10 s. A jump would be worse. */
const LOW_LATENCY_CONFIG = { ...HLS_BASE_CONFIG, lowLatencyMode: true, maxLiveSyncPlaybackRate: 1.2 };

/** Plain HLS (the watch page's `?ll=0`): whole segments only, 3 target durations behind the
 * edge (the spec's HOLD-BACK): what makes a live stream survive a late segment without
 * stalling; 10 behind, it jumps back to the edge. */
const STANDARD_CONFIG = {
  ...HLS_BASE_CONFIG,
  lowLatencyMode: false,
  liveSyncDurationCount: 3,
  liveMaxLatencyDurationCount: 10,
};

import { webrtcSupported, WhepSession } from "./whep.js";

function hlsLibrary() {
  return typeof window.Hls === "function" ? window.Hls : null;
}

export function canPlayNatively(video) {
  return video.canPlayType("application/vnd.apple.mpegurl") !== "";
}

/** How this browser would play HLS: "hls.js", "native" or null. */
export function playbackEngine(video) {
  const Hls = hlsLibrary();
  if (Hls && Hls.isSupported()) return "hls.js";
  if (canPlayNatively(video)) return "native";
  return null;
}

export class LivePlayer extends EventTarget {
  /** `options.lowLatency` (default true): hls.js follows LL-HLS parts when the server offers
   * them; false plays whole segments from 3 target durations behind the edge. */
  constructor(video, { lowLatency = true, webrtc = true } = {}) {
    super();
    this.video = video;
    this.lowLatency = lowLatency;
    /** Try WHEP first when `load()` is given a WHEP URL. */
    this.webrtc = webrtc;
    this.whep = null;
    this.whepUrl = null;
    /** Why WebRTC was given up for HLS (null while it was not): for the page and for tests. */
    this.whepFailure = null;
    /** WebRTC showed a picture on this page: a later failure is the stream's, not the network's. */
    this._whepWorked = false;
    /** What hls.js loaded since `load()`: whole segments, LL-HLS parts, and playlist reloads
     * that asked the server to block (`_HLS_msn`); for the page's diagnostics and for tests. */
    this.stats = { segments: 0, parts: 0, blockingReloads: 0 };
    this.url = null;
    this.state = "idle";
    this.message = "";
    this.engine = null;
    this.hls = null;
    /** Every fatal error seen, newest last: {type, details, at}. For the page and for tests. */
    this.fatalErrors = [];
    this.recoveries = 0;
    this.reloads = 0;
    this._consecutiveReloads = 0;
    this._lastMediaError = 0;
    this._progress = { time: -1, at: 0 };
    this._loadingSince = 0;
    this._reloadTimer = null;
    this._watchdog = null;
    this._onVideoEvent = this._onVideoEvent.bind(this);
    for (const name of ["playing", "timeupdate", "waiting", "error", "pause", "play", "ended"]) {
      video.addEventListener(name, this._onVideoEvent);
    }
  }

  /** Starts playing `url` (HLS) from the live edge (muted, since browsers block sound on
   * autoplay); over WebRTC from `whepUrl` first, when given and WebRTC has not failed here. */
  load(url, whepUrl = this.whepUrl) {
    this._teardown();
    this.url = url;
    this.whepUrl = whepUrl;
    if (this.webrtc && whepUrl && this.whepFailure === null && webrtcSupported()) {
      this.engine = "webrtc";
      this._setState("loading");
      this._loadingSince = performance.now();
      this._progress = { time: -1, at: performance.now() };
      this._loadWhep(whepUrl);
      this._watchdog = setInterval(() => this._checkProgress(), 1000);
      return;
    }
    this.engine = playbackEngine(this.video);
    if (!this.engine) {
      const reason = document.body.dataset.playerInstalled === "false"
        ? "The player library is not installed on this server."
        : "This browser cannot play HLS video.";
      this._setState("unsupported", reason);
      return;
    }
    this._setState("loading");
    this._loadingSince = performance.now();
    this._progress = { time: -1, at: performance.now() };
    if (this.engine === "hls.js") this._loadHlsJs(url);
    else this._loadNative(url);
    this._watchdog = setInterval(() => this._checkProgress(), 1000);
  }

  /** The same source again, from scratch (after the publisher reconnected, or a stall). */
  reload() {
    if (!this.url) return;
    this.reloads += 1;
    this._consecutiveReloads += 1;
    if (this._consecutiveReloads > MAX_RELOADS) {
      this._teardown();
      this._setState("error", "The stream keeps failing to play. Try again in a moment.");
      return;
    }
    this.load(this.url);
  }

  /** Stops playback; `state` says why ("idle", "gone", "error"). */
  stop(state = "idle", message = "") {
    this._teardown();
    // WebRTC that played here and then ended (the anchor stopped, the server restarted) is
    // tried again for the next publication; WebRTC that never got a picture here is not
    if (this._whepWorked) this.whepFailure = null;
    this._setState(state, message);
  }

  /** Resets the give-up counter, for a user's "try again". */
  retry() {
    this._consecutiveReloads = 0;
    if (this.url) this.load(this.url);
  }

  /** Jumps to the live edge (after a pause, or when the player fell behind). */
  seekToLive() {
    const video = this.video;
    let edge = null;
    if (this.hls && Number.isFinite(this.hls.liveSyncPosition)) edge = this.hls.liveSyncPosition;
    else if (video.seekable.length) edge = video.seekable.end(video.seekable.length - 1) - 3;
    if (edge !== null && edge > video.currentTime + 0.5) video.currentTime = edge;
    video.play().catch(() => {});
  }

  /** Seconds behind the live edge, or null when unknown. */
  get latency() {
    if (this.engine === "webrtc") return null; // WebRTC has no edge to be behind: it is the edge
    if (this.hls && Number.isFinite(this.hls.latency)) return this.hls.latency;
    const video = this.video;
    if (video.seekable.length) return video.seekable.end(video.seekable.length - 1) - video.currentTime;
    return null;
  }

  _loadWhep(url) {
    const session = new WhepSession(url);
    this.whep = session;
    session.addEventListener("failed", (event) => this._fallbackToHls(session, event.detail.reason));
    session.start().then((stream) => {
      if (session !== this.whep) return;
      this.video.srcObject = stream;
      this._play();
    }).catch((err) => this._fallbackToHls(session, err.message || String(err)));
  }

  /** WebRTC did not work here: HLS from now on (the page's `?hls=1` does it from the start). */
  _fallbackToHls(session, reason) {
    if (session !== this.whep) return;
    console.info("livesrv: WebRTC playback failed, falling back to HLS:", reason);
    this.whepFailure = reason;
    this.load(this.url);
  }

  _loadHlsJs(url) {
    const Hls = hlsLibrary();
    const hls = new Hls(this.lowLatency ? LOW_LATENCY_CONFIG : STANDARD_CONFIG);
    this.hls = hls;
    this.stats = { segments: 0, parts: 0, blockingReloads: 0 };
    const stats = this.stats;
    hls.on(Hls.Events.FRAG_LOADED, (_event, data) => {
      if (data.part) stats.parts += 1;
      else stats.segments += 1;
    });
    hls.on(Hls.Events.LEVEL_LOADING, (_event, data) => {
      if (data.deliveryDirectives) stats.blockingReloads += 1;
    });
    hls.on(Hls.Events.MANIFEST_PARSED, () => this._play());
    hls.once(Hls.Events.LEVEL_LOADED, (_event, data) => this._startInCurrentPublication(hls, data.details));
    hls.on(Hls.Events.ERROR, (_event, data) => this._onHlsError(hls, data));
    hls.attachMedia(this.video);
    hls.loadSource(url);
  }

  /** The packager keeps the previous publication's last segments in the playlist, after a
   * discontinuity, when an anchor reconnects. hls.js starts a few segments back from the
   * edge, which can land in that old tail: a new viewer would first see seconds of a stream
   * that already ended. Start at the current publication's first segment instead. */
  _startInCurrentPublication(hls, details) {
    if (!details || !details.live || !details.fragments.length) return;
    const fragments = details.fragments;
    const current = fragments[fragments.length - 1].cc;
    const first = fragments.find((fragment) => fragment.cc === current);
    const planned = Number.isFinite(hls.liveSyncPosition) ? hls.liveSyncPosition : fragments[0].start;
    if (!first || first.start <= planned + 0.05) return;
    // on the next turn: restarting the load from inside hls.js's own LEVEL_LOADED dispatch
    // leaves it waiting for a level forever
    setTimeout(() => {
      if (hls !== this.hls) return;
      hls.stopLoad();
      hls.startLoad(first.start);
    }, 0);
  }

  _loadNative(url) {
    this.video.src = url;
    this.video.load();
    this._play();
  }

  _play() {
    const video = this.video;
    const attempt = video.play();
    if (attempt && attempt.catch) {
      attempt.catch((err) => {
        if (err && err.name === "NotAllowedError" && !video.muted) {
          // sound was on and the browser refused: play muted, the page offers "unmute"
          video.muted = true;
          video.play().catch(() => {});
        }
      });
    }
  }

  _onHlsError(hls, data) {
    if (hls !== this.hls || !data.fatal) return;
    const Hls = hlsLibrary();
    this.fatalErrors.push({ type: data.type, details: data.details, at: Date.now() });
    const status = data.response && data.response.code;
    const playlistGone = (data.details === Hls.ErrorDetails.MANIFEST_LOAD_ERROR ||
      data.details === Hls.ErrorDetails.LEVEL_LOAD_ERROR) && (status === 404 || status === 410);
    if (playlistGone) {
      // the stream ended or has not produced its first segment yet: the page asks the
      // API which, and either waits for the channel or reloads
      this.stop("gone");
      this.dispatchEvent(new Event("gone"));
      return;
    }
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
      this.recoveries += 1;
      const now = performance.now();
      if (now - this._lastMediaError < MEDIA_ERROR_WINDOW_MS) {
        hls.swapAudioCodec(); // hls.js's documented second step for a repeated media error
      }
      this._lastMediaError = now;
      hls.recoverMediaError();
      return;
    }
    // a network error hls.js gave up on, or a transmux/other error: start over shortly
    this._scheduleReload(1000 * Math.min(8, 2 ** this._consecutiveReloads));
  }

  _onVideoEvent(event) {
    const video = this.video;
    switch (event.type) {
      case "playing":
      case "timeupdate":
        if (video.currentTime !== this._progress.time) {
          this._progress = { time: video.currentTime, at: performance.now() };
          if (!video.paused && video.readyState >= 3 && this.state !== "playing") {
            this._consecutiveReloads = 0;
            this._setState("playing");
          }
        }
        this._setBuffering(false);
        break;
      case "waiting":
        this._setBuffering(true);
        break;
      case "pause":
      case "play":
        this.dispatchEvent(new CustomEvent("statechange", { detail: { state: this.state, message: this.message } }));
        break;
      case "ended":
        // the playlist was closed (EXT-X-ENDLIST): the publication is over; the page asks
        // the API whether the channel is gone or already live again
        if (this.url && this.state === "playing") {
          this.stop("gone");
          this.dispatchEvent(new Event("gone"));
        }
        break;
      case "error":
        if (this.engine === "native" && this.url && this.state !== "idle") {
          this.fatalErrors.push({ type: "nativeError", details: String(video.error && video.error.code), at: Date.now() });
          this._scheduleReload(2000);
        }
        break;
      default:
        break;
    }
  }

  _checkProgress() {
    const now = performance.now();
    const video = this.video;
    if (this.engine === "webrtc") {
      if (this.state === "playing" && !video.paused && now - this._progress.at > WHEP_STALL_MS) {
        this._fallbackToHls(this.whep, "stalled");
      } else if (this.state === "loading" && now - this._loadingSince > WHEP_START_TIMEOUT_MS) {
        this._fallbackToHls(this.whep, "no picture in time");
      }
      return;
    }
    if (this.state === "playing" && !video.paused && now - this._progress.at > STALL_MS) {
      this.reload();
    } else if (this.state === "loading" && now - this._loadingSince > LOADING_TIMEOUT_MS) {
      this.reload();
    }
  }

  _scheduleReload(delayMs) {
    if (this._reloadTimer !== null) return;
    this._setState("loading");
    this._reloadTimer = setTimeout(() => {
      this._reloadTimer = null;
      this.reload();
    }, delayMs);
  }

  _setBuffering(on) {
    const root = this.video.closest(".player");
    if (root) root.toggleAttribute("data-buffering", on);
  }

  _setState(state, message = "") {
    if (state === "playing" && this.engine === "webrtc") this._whepWorked = true;
    this.state = state;
    this.message = message;
    this.dispatchEvent(new CustomEvent("statechange", { detail: { state, message } }));
  }

  _teardown() {
    if (this._reloadTimer !== null) clearTimeout(this._reloadTimer);
    this._reloadTimer = null;
    if (this._watchdog !== null) clearInterval(this._watchdog);
    this._watchdog = null;
    if (this.hls) {
      this.hls.destroy();
      this.hls = null;
    }
    if (this.engine === "native") {
      this.video.removeAttribute("src");
      this.video.load();
    }
    if (this.whep) {
      this.whep.stop();
      this.whep = null;
      this.video.srcObject = null;
    }
    this._setBuffering(false);
  }
}

/** Wires the on-screen controls (play/pause, sound, volume, live edge, full screen) and the
 * keyboard shortcuts to a player inside `root`. */
export function bindControls(player, root) {
  const video = player.video;
  const unmute = root.querySelector("#unmute");
  const volume = root.querySelector("#volume");
  const button = (action) => root.querySelector(`[data-action="${action}"]`);

  const render = () => {
    root.dataset.state = player.state;
    root.toggleAttribute("data-paused", video.paused);
    root.toggleAttribute("data-muted", video.muted || video.volume === 0);
    const play = button("play");
    if (play) play.setAttribute("aria-label", video.paused ? "Play" : "Pause");
    const mute = button("mute");
    if (mute) mute.setAttribute("aria-label", video.muted ? "Unmute" : "Mute");
    if (unmute) unmute.hidden = !(video.muted && player.state === "playing");
    if (volume) volume.value = video.muted ? "0" : String(video.volume);
    const message = root.querySelector("#player-message");
    if (message) message.textContent = player.message;
    const latency = player.latency;
    root.toggleAttribute("data-behind", latency !== null && latency > 12);
  };

  const toggleSound = () => {
    video.muted = !video.muted;
    if (!video.muted && video.volume === 0) video.volume = 1;
    if (video.paused) video.play().catch(() => {});
  };
  const togglePlay = () => {
    if (video.paused) player.seekToLive(); // a live stream resumes at the edge, not where it paused
    else video.pause();
  };
  const toggleFullscreen = () => {
    if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
    else if (root.requestFullscreen) root.requestFullscreen().catch(() => {});
    else if (video.webkitEnterFullscreen) video.webkitEnterFullscreen(); // iPhone Safari
  };

  unmute?.addEventListener("click", toggleSound);
  button("play")?.addEventListener("click", togglePlay);
  button("mute")?.addEventListener("click", toggleSound);
  button("live-edge")?.addEventListener("click", () => player.seekToLive());
  button("fullscreen")?.addEventListener("click", toggleFullscreen);
  button("retry")?.addEventListener("click", () => player.retry());
  volume?.addEventListener("input", () => {
    video.volume = Number(volume.value);
    video.muted = video.volume === 0;
  });
  video.addEventListener("click", togglePlay);
  video.addEventListener("volumechange", render);
  video.addEventListener("timeupdate", render);
  player.addEventListener("statechange", render);

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target instanceof HTMLElement && target.closest("input, textarea, select, [contenteditable]")) return;
    const onButton = target instanceof HTMLElement && target.closest("button, a");
    switch (event.key) {
      case "k":
      case " ":
        if (event.key === " " && onButton) return; // space on a focused button presses it
        event.preventDefault();
        togglePlay();
        break;
      case "m":
        toggleSound();
        break;
      case "f":
        toggleFullscreen();
        break;
      default:
        break;
    }
  });

  render();
  return render;
}

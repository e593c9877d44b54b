// Go live from the browser: camera and microphone published over WHIP (RFC 9725) with the
// logged-in user's stream key. The server takes no trickled candidates, so the offer is sent
// once ICE gathering is complete (host candidates take a moment; a timeout caps the wait).
import { api, liveChannel } from "./api.js";
import { setupChrome } from "./chrome.js";
import { $ } from "./ui.js";
import { gatheringComplete, refusalReason } from "./whep.js";

const GATHER_TIMEOUT_MS = 3000;
const LIVE_POLL_MS = 1500;

const root = $("#golive");
const channel = root.dataset.channel;
const statusBadge = $("#golive-status");
const message = $("#golive-message");
const preview = $("#golive-preview");
const startButton = $("#golive-start");
const stopButton = $("#golive-stop");

let session = null; // { pc, media, location, pollTimer }

function setState(state, text) {
  statusBadge.dataset.state = state;
  statusBadge.textContent = text;
  statusBadge.className = `badge ${state === "live" ? "badge-live" : "badge-offline"}`;
}

function say(text) {
  message.textContent = text;
}

async function openMedia() {
  const video = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
  try {
    return await navigator.mediaDevices.getUserMedia({ video, audio: true });
  } catch (err) {
    // a camera without a microphone (or the other way round) can still go live
    for (const constraints of [{ video }, { audio: true }]) {
      try {
        return await navigator.mediaDevices.getUserMedia(constraints);
      } catch { /* try the next one */ }
    }
    throw err;
  }
}

/** H.264 first (the server passes it through untouched), VP8 next (it is transcoded). */
function preferCodecs(transceiver) {
  if (!RTCRtpSender.getCapabilities || !transceiver.setCodecPreferences) return;
  const codecs = RTCRtpSender.getCapabilities("video")?.codecs || [];
  const rank = (c) => {
    const mime = c.mimeType.toLowerCase();
    if (mime === "video/h264" && /packetization-mode=1/.test(c.sdpFmtpLine || "") &&
        /profile-level-id=42/.test(c.sdpFmtpLine || "")) return 0;
    if (mime === "video/vp8") return 1;
    return 2;
  };
  try {
    transceiver.setCodecPreferences([...codecs].sort((a, b) => rank(a) - rank(b)));
  } catch { /* keep the browser's order */ }
}

async function publish(whipUrl, streamKey, media) {
  const pc = new RTCPeerConnection();
  for (const track of media.getTracks()) {
    const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [media] });
    if (track.kind === "video") {
      preferCodecs(transceiver);
      // HLS restarts when the picture size changes: lower the frame rate instead, if needed
      try {
        const params = transceiver.sender.getParameters();
        params.degradationPreference = "maintain-resolution";
        await transceiver.sender.setParameters(params);
      } catch { /* not supported here */ }
    }
  }
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc, GATHER_TIMEOUT_MS);
  const response = await fetch(whipUrl, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${streamKey}` },
    body: pc.localDescription.sdp,
  });
  const text = await response.text();
  if (response.status !== 201) {
    pc.close();
    throw new Error(refusalReason(response.status, text));
  }
  const location = new URL(response.headers.get("Location"), whipUrl).href;
  await pc.setRemoteDescription({ type: "answer", sdp: text });
  return { pc, location };
}

function endSession(reason) {
  const current = session;
  session = null;
  if (!current) return;
  clearInterval(current.pollTimer);
  if (current.location) {
    // keepalive: the DELETE still goes out when the tab is closing
    fetch(current.location, { method: "DELETE", keepalive: true }).catch(() => {});
  }
  current.pc?.close();
  for (const track of current.media.getTracks()) track.stop();
  preview.srcObject = null;
  startButton.disabled = false;
  stopButton.disabled = true;
  if (reason) say(reason);
}

async function start() {
  startButton.disabled = true;
  say("");
  setState("starting", "Starting…");
  let media;
  try {
    media = await openMedia();
  } catch (err) {
    setState("error", "Offline");
    say(`No camera or microphone: ${err.message || err.name}. Allow access and try again.`);
    startButton.disabled = false;
    return;
  }
  preview.srcObject = media;
  session = { pc: null, media, location: null, pollTimer: 0 };
  const mine = session;
  try {
    const me = await api.me();
    setState("connecting", "Connecting…");
    const { pc, location } = await publish(me.whip_url, me.stream_key, media);
    if (session !== mine) { // stopped while connecting
      fetch(location, { method: "DELETE", keepalive: true }).catch(() => {});
      pc.close();
      return;
    }
    mine.pc = pc;
    mine.location = location;
    stopButton.disabled = false;
    pc.addEventListener("connectionstatechange", () => {
      if (session !== mine) return;
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        setState("error", "Offline");
        endSession("The connection to the server was lost. Press Go live to try again.");
      }
    });
    mine.pollTimer = setInterval(() => checkLive(mine), LIVE_POLL_MS);
    checkLive(mine);
  } catch (err) {
    if (session === mine) {
      setState("error", "Offline");
      endSession(`Could not go live: ${err.message}`);
    }
  }
}

async function checkLive(mine) {
  let info = null;
  try {
    info = await liveChannel(channel);
  } catch {
    return; // a failed poll says nothing; the next one may
  }
  if (session !== mine) return;
  if (info && info.source === "whip") {
    setState("live", "Live");
    say("You are live.");
  } else if (statusBadge.dataset.state === "live") {
    setState("ended", "Offline");
    endSession("Your broadcast ended (another encoder may have taken over).");
  }
}

startButton.addEventListener("click", start);
stopButton.addEventListener("click", () => {
  setState("ended", "Offline");
  endSession("Stream ended.");
});
window.addEventListener("pagehide", () => endSession(null));

setupChrome();

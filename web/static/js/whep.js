// WHEP playback (draft-ietf-wish-whep): the browser's own WebRTC, receive-only.
//
// POST the SDP offer to /whep/CHANNEL once ICE gathering is complete (the server takes no
// trickled candidates), set the answer, play the MediaStream in the <video>. DELETE on the
// session URL (the Location header) when done. Any failure rejects/fires "failed", and the
// player falls back to HLS.

const GATHER_TIMEOUT_MS = 2000; // a slow STUN server must not hold up the start: send what we have

export function webrtcSupported() {
  return typeof window.RTCPeerConnection === "function";
}

/** Resolves once ICE gathering is complete, or after `timeoutMs` with what was gathered
 * (WHIP and WHEP here take no trickled candidates: the offer carries them all). */
export function gatheringComplete(pc, timeoutMs = GATHER_TIMEOUT_MS) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        clearTimeout(timer);
        resolve();
      }
    };
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

/** The reason in a WHIP/WHEP error answer (`{"error": …}`), else the status. */
export function refusalReason(status, body) {
  try {
    return JSON.parse(body).error || `HTTP ${status}`;
  } catch {
    return `HTTP ${status}`; // not JSON
  }
}

/** One WHEP session. Events: "failed" {reason} when the connection fails or closes after
 * having started (the player then falls back to HLS). */
export class WhepSession extends EventTarget {
  constructor(url) {
    super();
    this.url = url;
    this.pc = null;
    this.location = null;
    this.closed = false;
  }

  /** Resolves with the MediaStream once the answer is applied; rejects with a reason. */
  async start() {
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    this.pc = pc;
    const stream = new MediaStream();
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addEventListener("track", (event) => stream.addTrack(event.track));
    pc.addEventListener("connectionstatechange", () => {
      if (this.closed) return;
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        this.dispatchEvent(new CustomEvent("failed", { detail: { reason: `connection ${pc.connectionState}` } }));
      }
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc);
    if (this.closed) throw new Error("stopped");
    const response = await fetch(this.url, {
      method: "POST",
      headers: { "Content-Type": "application/sdp" },
      body: pc.localDescription.sdp,
    });
    const body = await response.text();
    if (response.status !== 201) {
      const error = new Error(refusalReason(response.status, body));
      error.status = response.status;
      throw error;
    }
    const location = response.headers.get("Location");
    this.location = location ? new URL(location, this.url).href : null;
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    return stream;
  }

  /** Ends the session (DELETE on the server, then the peer connection). */
  stop() {
    if (this.closed) return;
    this.closed = true;
    if (this.location) fetch(this.location, { method: "DELETE", keepalive: true }).catch(() => {});
    if (this.pc) this.pc.close();
  }
}

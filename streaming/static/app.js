// The page: WebRTC video+audio from the server, text/microphone/pose/interrupt/portrait to it, metrics in
// words. In reenact mode (the server's config says so) a face drives the avatar instead of text: the
// browser's camera when the server takes it (config.camera), else the server's own webcam or video.
// One WebSocket carries signalling, controls and metrics (same origin; ?token= is passed through).
// A new portrait gives this client a new avatar (a new stream on the server): the page connects again.
"use strict";
const $ = (id) => document.getElementById(id);
const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${location.search}`);
const send = (msg) => ws.readyState === 1 && ws.send(JSON.stringify(msg));
let pc = null, micSender = null, micTrack = null, camSender = null, camTrack = null, server = {}, browser = {};
let config = null, ticker = null, ended = false;
const query = new URLSearchParams(location.search);
const status = (text, alert = false) => { $("status").textContent = text; $("status").classList.toggle("alert", alert); };

ws.onmessage = async (e) => {
  const msg = JSON.parse(e.data);
  if (msg.op === "config") { config = msg; showControls(msg.controls || []); $("portraitbox").hidden = !msg.portrait; connect(); }
  else if (msg.op === "answer") await pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
  else if (msg.op === "metrics") { server = msg; show(); }
  else if (msg.op === "portrait") { status("your portrait is on; reconnecting the video..."); browser.portraits = (browser.portraits || 0) + 1; connect(); }
  else if (msg.op === "idle") { ended = true; status(msg.reason, true); }
  else if (msg.op === "error") status("server: " + msg.error, true);
};
ws.onclose = async () => {
  if (ended) return;
  if (config) { status("disconnected from the server; reload the page to start again", true); return; }
  // refused before it began: the server says why on its page (503 when it is full)
  try {
    const r = await fetch(location.href, { cache: "no-store" });
    const why = r.ok ? null : new DOMParser().parseFromString(await r.text(), "text/html").getElementById("status");
    status(why ? why.textContent : "could not connect to the server", true);
  } catch (err) { status("the server is not reachable", true); }
};

async function connect() {
  const reenact = config.mode === "reenact", camera = config.camera;
  document.body.classList.toggle("reenact", reenact);
  $("camera").hidden = !camera;
  $("calibrate").hidden = !config.calibrate;                 // absolute mode has nothing to calibrate
  $("intro").textContent = reenact ? "Look into your camera (or watch the server's video): the avatar copies the face, live."
    : "Type something and press Speak (or use your microphone): the face answers with your words, live." +
      (config.portrait ? " Choose a photo to give it another face." : "");
  if (pc) pc.close();
  pc = new RTCPeerConnection({ iceServers: config.ice_servers });
  // sendrecv from the start: the camera and microphone are attached later with replaceTrack, no renegotiation
  camSender = pc.addTransceiver("video", { direction: camera ? "sendrecv" : "recvonly" }).sender;
  micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
  if (micTrack) await micSender.replaceTrack(micTrack);       // a new connection after a portrait change
  if (camTrack) await camSender.replaceTrack(camTrack);
  const stream = new MediaStream();
  pc.ontrack = (e) => {
    stream.addTrack(e.track); $("video").srcObject = stream;
    if (query.has("avsync")) avsync.watch(e.track, e.receiver);
  };
  const mine = pc;
  pc.onconnectionstatechange = () => {
    if (pc !== mine) return;
    if (mine.connectionState === "connected") status("connected: the avatar is live");
    else if (mine.connectionState === "failed") status("the video connection failed (a firewall?)", true);
  };
  await pc.setLocalDescription(await pc.createOffer());
  // the server answers with all its candidates, so send ours complete too (no trickle); give up waiting at 3 s
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 3000);
  });
  send({ op: "offer", sdp: pc.localDescription.sdp });
  $("video").play().catch(() => { status("click the video to start the sound"); });
  if (ticker) return;
  ticker = setInterval(stats, 1000);
  if (query.has("mic")) $("mic").click();                    // tests
  if (camera && query.has("camera")) $("camera").click();
}

async function stats() {
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") browser.cameraFramesSent = s.framesSent;
    if (query.has("avsync") && s.type === "media-playout") avsync.playoutDelay(s);
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") Object.assign(browser, { framesDecoded: s.framesDecoded, framesDropped: s.framesDropped,
      framesReceived: s.framesReceived, fps: s.framesPerSecond, width: s.frameWidth, height: s.frameHeight,
      jitterBufferMs: s.jitterBufferEmittedCount ? 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount : null });
    if (query.has("avsync")) browser["playout_" + s.kind] = s.estimatedPlayoutTimestamp;
    if (s.kind === "audio") Object.assign(browser, { audioSamplesReceived: s.totalSamplesReceived,
      audioConcealedSamples: s.concealedSamples, audioPackets: s.packetsReceived });
  });
  browser.currentTime = $("video").currentTime;
  browser.controlsShown = ["yaw", "location", "scale"].filter((id) => $(id).offsetParent !== null);
  browser.portraitShown = $("portrait").offsetParent !== null;
  if (query.has("avsync")) browser.avsync = avsync.report();
  send(Object.assign({ op: "stats" }, browser));
  show();
}

// The figures a person asks about, in words: how late the lips are, how smooth the picture is, what was
// skipped, and whether this machine keeps up.
function show() {
  const lines = [], warn = [];
  const ms = (v) => `${Math.round(v)} ms`;
  if (server.latency_p50_ms != null)
    lines.push(`Latency: ${ms(server.latency_p50_ms)} from a word arriving to the face saying it (${ms(server.latency_p95_ms)} at worst, 95% of the time)`);
  else if (server.frames != null) lines.push("Latency: say something to measure it");
  if (server.fps != null) lines.push(`Frame rate: ${server.fps.toFixed(1)} frames/s sent` +
    (browser.fps != null ? `, ${Math.round(browser.fps)} frames/s shown here` : ""));
  const skipped = (server.repeats || 0) + (server.held || 0);
  if (server.frames != null) lines.push(`Skipped frames: ${skipped} of ${server.frames}` + (server.frames ? ` (${(100 * skipped / server.frames).toFixed(1)}%)` : "") +
    (browser.framesDropped ? `, ${browser.framesDropped} dropped by this browser` : ""));
  if (server.drawn_fps != null && server.drawn_fps < 24 && server.frames >= 50)     // judged after 2 s
    warn.push(`This machine renders ${server.drawn_fps.toFixed(1)} frames/s, fewer than the 25 a smooth picture needs: the last picture is repeated between them (the voice is not affected)`);
  if (server.sessions != null && config && config.own) lines.push(`Avatars on this server: ${server.sessions} of ${server.capacity}`);
  const av = browser.avsync;           // ?avsync=1: the last 10 flashes, median
  if (av && av.offsetMs != null) lines.push(`A/V sync (test pattern): the sound is ${ms(Math.abs(av.offsetMs))} ` +
    `${av.offsetMs >= 0 ? "late" : "early"} (\u00b15 ms)` + (av.rawOffsetMs != null ? `; ${ms(av.rawOffsetMs)} through WebAudio` : ""));
  if (server.errors) warn.push(`The engine reported ${server.errors} error${server.errors > 1 ? "s" : ""}` + (server.last_error ? `: ${server.last_error}` : ""));
  const list = $("metrics");
  list.replaceChildren(...lines.map((t) => li(t)), ...warn.map((t) => li(t, "warn")));
}
const li = (text, cls) => { const el = document.createElement("li"); el.textContent = text; if (cls) el.className = cls; return el; };

// The chosen photo, shrunk to at most 512 px and sent as a JPEG: the server finds the face in it.
$("portrait").onchange = async () => {
  const file = $("portrait").files[0];
  if (!file) return;
  try {
    const image = await createImageBitmap(file);
    const scale = Math.min(1, 512 / Math.max(image.width, image.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(image.width * scale); canvas.height = Math.round(image.height * scale);
    canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
    status("sending your portrait...");
    send({ op: "portrait", image: canvas.toDataURL("image/jpeg", 0.9).split(",")[1] });
  } catch (err) { status(`that file is not a picture this browser can read (${err.message})`, true); }
};

$("say").onclick = () => { const text = $("text").value.trim(); if (text) send({ op: "say", text }); };
$("interrupt").onclick = () => send({ op: "interrupt" });

// A second click stops sending. The camera asks for what the engine uses: it crops a 256x256 face.
$("mic").onclick = () => toggle("mic", "microphone", { audio: { echoCancellation: true, noiseSuppression: true } });
$("camera").onclick = () => toggle("camera", "camera", { video: { width: 640, height: 480, frameRate: 25 } });
$("calibrate").onclick = () => send({ op: "calibrate" });

async function toggle(id, what, constraints) {
  const sender = id === "mic" ? micSender : camSender;
  const track = id === "mic" ? micTrack : camTrack;
  const set = (t) => { if (id === "mic") micTrack = t; else camTrack = t; };
  if (track) {
    await sender.replaceTrack(null);
    track.stop(); set(null);
    $(id).textContent = `Use my ${what}`;
    return;
  }
  try {
    const media = await navigator.mediaDevices.getUserMedia(constraints);
    set(media.getTracks()[0]);
    await sender.replaceTrack(media.getTracks()[0]);
    $(id).textContent = `Stop my ${what}`;
  } catch (err) { $("status").textContent = `${what}: ${err.message}`; }
}

// Only the controls the loaded model has are shown (an audio-only model has none).
function showControls(names) {
  $("pose").hidden = !names.includes("pose");
  $("face").hidden = !(names.includes("location") || names.includes("scale"));
  for (const id of ["location", "scale"]) $(id).parentElement.hidden = !names.includes(id);
}

function poseChanged() {
  const auto = $("auto").checked;
  const v = (id) => (auto ? null : Number($(id).value));
  send({ op: "controls", yaw: v("yaw"), pitch: v("pitch"), roll: v("roll") });
}
for (const id of ["auto", "yaw", "pitch", "roll"]) $(id).oninput = poseChanged;

function faceChanged() {
  const auto = $("faceauto").checked;
  const v = (id) => (auto || $(id).parentElement.hidden ? null : Number($(id).value));
  send({ op: "controls", location: v("location"), scale: v("scale") });
}
for (const id of ["faceauto", "location", "scale"]) $(id).oninput = faceChanged;

// ?avsync=1 with the test pattern (anitalker live --serve --test-pattern): A/V sync as this browser renders
// the stream, on performance.now()'s clock. Flashes: the first white frame of each flash, at the time
// requestVideoFrameCallback says it is displayed. Clicks, two ways:
// - heard (the figure): when the <video> element's audio renderer plays the click. The renderer pulls the
//   received audio from WebRTC 10 ms at a time; the pull that decodes a packet (the first to play any of
//   it) reports that packet to the audio receiver's getSynchronizationSources(): its RTP timestamp, its
//   audio level (RFC 6464, set by aiortc from the frame it encoded) and the pull's time (whole ms, on the
//   page's pseudo-wall clock). The first loud packet after a quiet one carries the click, which starts
//   its frame. Heard = that pull's time + where in the pull the packet starts (0-10 ms, unknown: taken as
//   5, so +-5 ms) + the Opus encoder's lookahead (the click is 6.5 ms into its packet) + the delay from pull
//   to speaker that the renderer reports (media-playout stats). While NetEq stretches the audio it may
//   decode a packet one pull early (that click then counts up to 10 ms early). Polled every 4 ms: a packet
//   is missed only if the page stalls for 20 ms (that click is then not counted). A device that took 20 ms
//   a callback (two pulls at once, the second 10 ms later on the speaker) makes the same sum the middle of
//   +-10 ms; the page reports WebAudio's baseLatency, the device's callback period (10 ms here).
// - raw (kept to show the difference): a WebAudio worklet on the received track, mapped to the output clock
//   (getOutputTimestamp). That also counts the MediaStreamAudioSourceNode's FIFO (no target depth: it
//   starts where the first pulls find it and every underrun leaves 10 ms more in it) and WebAudio's own
//   output latency, neither of which the viewer hears. A local click looped through
//   MediaStreamAudioDestinationNode -> createMediaStreamSource was tried as a calibration (16-21 ms here)
//   and not used: that FIFO is fed on WebAudio's own thread, the received track's on the renderer's, so
//   their depths differ, and it leaves WebAudio's output latency (40 ms here) in place of the renderer's.
const OPUS_LOOKAHEAD_MS = 6.5, CLICK_LEVEL = 0.05;      // both checked in tests/test_shell_webrtc.py
const avsync = {
  flashes: [], clicks: [], pulled: [], delayMs: null, last: null, lag: Infinity, ctx: null,
  watch(track, receiver) {
    if (track.kind === "video") this.watchVideo(); else { this.watchAudio(track); this.watchPackets(receiver); }
  },
  // the mean delay from pull to speaker of the audio played since the last stats (media-playout)
  playoutDelay(s) {
    const last = this.last;
    if (last && s.totalSamplesCount > last.totalSamplesCount)
      this.delayMs = 1000 * (s.totalPlayoutDelay - last.totalPlayoutDelay) / (s.totalSamplesCount - last.totalSamplesCount);
    this.last = { totalPlayoutDelay: s.totalPlayoutDelay, totalSamplesCount: s.totalSamplesCount };
  },
  watchPackets(receiver) {
    let last = null, quiet = true;
    setInterval(() => {
      for (const s of receiver.getSynchronizationSources()) {
        if (s.rtpTimestamp === last) continue;               // seen at an earlier poll
        last = s.rtpTimestamp;
        const pulled = s.timestamp - performance.timeOrigin + 0.5;         // + 0.5: whole ms, cut
        this.lag = Math.min(this.lag, performance.now() - pulled);    // ~0 (>= -0.5) if the clocks agree
        const loud = (s.audioLevel || 0) > CLICK_LEVEL;
        if (loud && quiet) this.pulled.push(pulled);
        quiet = !loud;
      }
    }, 4);
  },
  heard() {
    return this.delayMs == null ? [] : this.pulled.map((t) => t + 5 + OPUS_LOOKAHEAD_MS + this.delayMs);
  },
  report() {
    const heard = this.heard(), median = (a) => a.length ? a.sort((x, y) => x - y)[a.length >> 1] : null;
    const offsets = (clicks) => median(this.flashes.slice(-10).map((f) => clicks.reduce(
      (best, c) => (Math.abs(c - f) < Math.abs(best) ? c - f : best), Infinity)).filter((d) => Math.abs(d) <= 500));
    return { flashes: this.flashes.slice(-120), clicks: this.clicks.slice(-120), heard: heard.slice(-120),
      pulled: this.pulled.slice(-120), playoutDelayMs: this.delayMs, firstSeenMs: this.lag,
      baseLatencyMs: this.ctx && 1000 * this.ctx.baseLatency, offsetMs: offsets(heard), rawOffsetMs: offsets(this.clicks) };
  },
  watchVideo() {
    const video = $("video"), canvas = document.createElement("canvas");
    canvas.width = canvas.height = 8;
    const g = canvas.getContext("2d", { willReadFrequently: true });
    let white = false;
    const frame = (now, meta) => {
      g.drawImage(video, 0, 0, 8, 8);
      const px = g.getImageData(0, 0, 8, 8).data;
      let sum = 0;
      for (let i = 0; i < px.length; i += 4) sum += px[i];
      const bright = sum / (px.length / 4) > 128;
      if (bright && !white) this.flashes.push(meta.expectedDisplayTime);
      white = bright;
      video.requestVideoFrameCallback(frame);
    };
    video.requestVideoFrameCallback(frame);
  },
  async watchAudio(track) {
    const ctx = this.ctx = new AudioContext();
    const code = `registerProcessor("clicks", class extends AudioWorkletProcessor {
      constructor() { super(); this.quiet = 1e9; }
      process(inputs) {
        const x = inputs[0][0];
        if (x) for (let i = 0; i < x.length; i++) {
          if (Math.abs(x[i]) > 0.2) { if (this.quiet > 0.1 * sampleRate) this.port.postMessage(currentTime + i / sampleRate); this.quiet = 0; }
          else this.quiet++;
        }
        return true;
      }
    });`;
    await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([code], { type: "text/javascript" })));
    const node = new AudioWorkletNode(ctx, "clicks"), mute = ctx.createGain();
    mute.gain.value = 0;                               // pulled by the output, heard through the video element
    ctx.createMediaStreamSource(new MediaStream([track])).connect(node).connect(mute).connect(ctx.destination);
    node.port.onmessage = (e) => {
      const ts = ctx.getOutputTimestamp();
      this.clicks.push(ts.performanceTime + (e.data - ts.contextTime) * 1000);
    };
  },
};

// The page: WebRTC video+audio from the server, text/microphone/pose/interrupt to it, live metrics.
// In reenact mode (the server's config says so) a face drives the avatar instead of text: the browser's
// camera when the server takes it (config.camera), else the server's own webcam or video.
// One WebSocket carries signalling, controls and metrics (same origin; ?token= is passed through).
"use strict";
const $ = (id) => document.getElementById(id);
const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${location.search}`);
const send = (msg) => ws.readyState === 1 && ws.send(JSON.stringify(msg));
let pc = null, micSender = null, micTrack = null, camSender = null, camTrack = null, server = {}, browser = {};
const query = new URLSearchParams(location.search);

ws.onmessage = async (e) => {
  const msg = JSON.parse(e.data);
  if (msg.op === "config") { showControls(msg.controls || []); connect(msg.ice_servers, msg.mode === "reenact", msg.camera, msg.calibrate); }
  else if (msg.op === "answer") await pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
  else if (msg.op === "metrics") { server = msg; show(); }
  else if (msg.op === "error") $("status").textContent = "server: " + msg.error;
};
ws.onclose = () => { $("status").textContent = "disconnected from the server"; };

async function connect(iceServers, reenact, camera, calibrate) {
  document.body.classList.toggle("reenact", reenact);
  $("camera").hidden = !camera;
  $("calibrate").hidden = !calibrate;                        // absolute mode has nothing to calibrate
  pc = new RTCPeerConnection({ iceServers });
  // sendrecv from the start: the camera and microphone are attached later with replaceTrack, no renegotiation
  camSender = pc.addTransceiver("video", { direction: camera ? "sendrecv" : "recvonly" }).sender;
  micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
  const stream = new MediaStream();
  pc.ontrack = (e) => {
    stream.addTrack(e.track); $("video").srcObject = stream;
    if (query.has("avsync")) avsync.watch(e.track);
  };
  pc.onconnectionstatechange = () => { $("status").textContent = "WebRTC: " + pc.connectionState; };
  await pc.setLocalDescription(await pc.createOffer());
  // the server answers with all its candidates, so send ours complete too (no trickle); give up waiting at 3 s
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
    setTimeout(done, 3000);
  });
  send({ op: "offer", sdp: pc.localDescription.sdp });
  $("video").play().catch(() => { $("status").textContent = "click the video to start the sound"; });
  setInterval(stats, 1000);
  if (query.has("mic")) $("mic").click();                    // tests
  if (camera && query.has("camera")) $("camera").click();
}

async function stats() {
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") browser.cameraFramesSent = s.framesSent;
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
  if (query.has("avsync")) browser.avsync = { flashes: avsync.flashes.slice(-120), clicks: avsync.clicks.slice(-120) };
  send(Object.assign({ op: "stats" }, browser));
  show();
}

function show() {
  $("metrics").textContent = "server\n" + JSON.stringify(server, null, 1) + "\nthis browser\n" + JSON.stringify(browser, null, 1);
}

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
// the stream, both on performance.now()'s clock. Flashes: the first white frame of each flash, at the time
// requestVideoFrameCallback says it is displayed. Clicks: onsets found by a WebAudio worklet on the received
// audio track, at the time the audio clock maps that sample to the output (getOutputTimestamp).
const avsync = {
  flashes: [], clicks: [],
  watch(track) {
    if (track.kind === "video") this.watchVideo(); else this.watchAudio(track);
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
    const ctx = new AudioContext();
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

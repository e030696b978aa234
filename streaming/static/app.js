// The page: WebRTC video+audio from the server, text/microphone/pose/interrupt to it, live metrics.
// One WebSocket carries signalling, controls and metrics (same origin; ?token= is passed through).
"use strict";
const $ = (id) => document.getElementById(id);
const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${location.search}`);
const send = (msg) => ws.readyState === 1 && ws.send(JSON.stringify(msg));
let pc = null, micSender = null, micTrack = null, server = {}, browser = {};

ws.onmessage = async (e) => {
  const msg = JSON.parse(e.data);
  if (msg.op === "config") connect(msg.ice_servers);
  else if (msg.op === "answer") await pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
  else if (msg.op === "metrics") { server = msg; show(); }
  else if (msg.op === "error") $("status").textContent = "server: " + msg.error;
};
ws.onclose = () => { $("status").textContent = "disconnected from the server"; };

async function connect(iceServers) {
  pc = new RTCPeerConnection({ iceServers });
  pc.addTransceiver("video", { direction: "recvonly" });
  // sendrecv from the start: the microphone is attached later with replaceTrack, no renegotiation
  micSender = pc.addTransceiver("audio", { direction: "sendrecv" }).sender;
  const stream = new MediaStream();
  pc.ontrack = (e) => { stream.addTrack(e.track); $("video").srcObject = stream; };
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
}

async function stats() {
  const report = await pc.getStats();
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") Object.assign(browser, { framesDecoded: s.framesDecoded, framesDropped: s.framesDropped,
      framesReceived: s.framesReceived, fps: s.framesPerSecond, width: s.frameWidth, height: s.frameHeight,
      jitterBufferMs: s.jitterBufferEmittedCount ? 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount : null });
    if (s.kind === "audio") Object.assign(browser, { audioSamplesReceived: s.totalSamplesReceived,
      audioConcealedSamples: s.concealedSamples, audioPackets: s.packetsReceived });
  });
  browser.currentTime = $("video").currentTime;
  send(Object.assign({ op: "stats" }, browser));
  show();
}

function show() {
  $("metrics").textContent = "server\n" + JSON.stringify(server, null, 1) + "\nthis browser\n" + JSON.stringify(browser, null, 1);
}

$("say").onclick = () => { const text = $("text").value.trim(); if (text) send({ op: "say", text }); };
$("interrupt").onclick = () => send({ op: "interrupt" });

$("mic").onclick = async () => {
  if (micTrack) {                       // second click: stop sending
    await micSender.replaceTrack(null);
    micTrack.stop(); micTrack = null;
    $("mic").textContent = "Use my microphone";
    return;
  }
  try {
    const media = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    micTrack = media.getAudioTracks()[0];
    await micSender.replaceTrack(micTrack);
    $("mic").textContent = "Stop my microphone";
  } catch (err) { $("status").textContent = "microphone: " + err.message; }
};

function pose() {
  const auto = $("auto").checked;
  const v = (id) => (auto ? null : Number($(id).value));
  send({ op: "pose", yaw: v("yaw"), pitch: v("pitch"), roll: v("roll") });
}
for (const id of ["auto", "yaw", "pitch", "roll"]) $(id).oninput = pose;

if (new URLSearchParams(location.search).has("mic")) setTimeout(() => $("mic").click(), 500);   // tests

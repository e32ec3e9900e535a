// streamvae web: send the camera over WebRTC, show the server's numbers, the latents and the
// frames the server decoded back from them (the round trip).
// Every number on this page comes from the server (its data channel messages), except
// "latent pictures seen here", which counts the pictures this page received.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pc: null, channel: null, stream: null, sender: null, latencies: [], seen: 0, info: null };
// Every latent message of this page's sessions, without its picture (for scripts: the benchmark).
window.streamvaeLatents = [];
const PLOT_POINTS = 240;
const SINK_NAMES = { MqttSink: "MQTT", FileSink: "file" };

function setText(id, value) { $(id).textContent = value; }
function fmt(value, digits = 1) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }
function say(text) { setText("state", text); }
function fail(text) { $("error").textContent = text; }

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  state.info = info;
  // Random weights: the banner says it once; the header names the architecture only.
  setText("model-name", info.random_weights ? "random" : info.model);
  setText("config", info.config);
  setText("dtype", info.dtype);
  setText("size", info.size || "the camera's");
  setText("zdim", info.z_dim);
  setText("sinks", info.sinks.length ? info.sinks.join(", ") : "none");
  setText("clocks", "Clocks: " + info.clocks + ".");
  $("banner").style.display = info.random_weights ? "block" : "none";
  // The round trip beside the camera preview (unless the server runs with --no-decode).
  $("decoded-figure").style.display = info.decodes ? "block" : "none";
  setText("decoded-note", info.random_weights ? ": meaningless (random weights)" : "");
}

function videoConstraints(deviceId) {
  const video = {};
  if (state.info && state.info.size) {
    const [h, w] = state.info.size.split("x").map(Number);
    video.width = { ideal: w };
    video.height = { ideal: h };
  }
  if (deviceId) video.deviceId = { exact: deviceId };
  return { video, audio: false };
}

async function listCameras() {
  const cameras = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  const select = $("camera");
  select.innerHTML = "";
  cameras.forEach((camera, i) => {
    const option = document.createElement("option");
    option.value = camera.deviceId;
    option.textContent = camera.label || `camera ${i + 1}`;
    select.appendChild(option);
  });
  select.hidden = cameras.length < 2;
}

function waitForIce(pc, ms) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const timer = setTimeout(resolve, ms);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

async function start() {
  fail("");
  $("start").disabled = true;
  try {
    say("asking for the camera");
    state.stream = await navigator.mediaDevices.getUserMedia(videoConstraints());
    $("preview").srcObject = state.stream;
    const track = state.stream.getVideoTracks()[0];
    track.contentHint = "detail";  // keep the resolution under load (a new one resets the stream)
    const pc = new RTCPeerConnection({ iceServers: [] });
    state.pc = pc;
    state.channel = pc.createDataChannel("streamvae");
    state.channel.onmessage = (event) => onMessage(JSON.parse(event.data));
    const transceiver = pc.addTransceiver(track, { direction: "sendonly", streams: [state.stream] });
    state.sender = transceiver.sender;
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") fail("the connection to the server failed");
    };
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitForIce(pc, 3000);
    say("connecting");
    const response = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `the server said ${response.status}`);
    setText("session", answer.session);
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    try {
      const params = state.sender.getParameters();
      params.degradationPreference = "maintain-resolution";
      await state.sender.setParameters(params);
    } catch (error) { /* older browsers: contentHint does the same */ }
    say("streaming");
    $("stop").disabled = false;
    listCameras();
  } catch (error) {
    fail(String(error.message || error));
    say("not streaming");
    teardown();
    $("start").disabled = false;
  }
}

function stop() {
  $("stop").disabled = true;
  if (state.channel && state.channel.readyState === "open") {
    say("stopping: the server flushes the stream");
    state.channel.send(JSON.stringify({ type: "stop" }));
    setTimeout(() => { if (state.pc) teardown(); }, 15000);  // no "ended" came: give up
  } else {
    teardown();
  }
}

function teardown() {
  if (state.pc) state.pc.close();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.pc = null; state.channel = null; state.stream = null; state.sender = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

async function switchCamera() {
  if (!state.sender) return;
  const stream = await navigator.mediaDevices.getUserMedia(videoConstraints($("camera").value));
  const track = stream.getVideoTracks()[0];
  track.contentHint = "detail";
  await state.sender.replaceTrack(track);
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = stream;
  $("preview").srcObject = stream;
}

function showNumbers(m) {
  setText("session", m.session);
  setText("frames", m.frames_received);
  setText("fps", fmt(m.frames_per_second));
  setText("latents", m.latents);
  setText("lps", fmt(m.latents_per_second, 2));
  if (m.rate_window_s) setText("rate-window", m.rate_window_s);
  setText("latency-p50", fmt(m.latency_ms.p50));
  setText("latency-p90", fmt(m.latency_ms.p90));
  setText("e2e-p50", fmt(m.capture_to_ready_ms.p50));
  setText("e2e-p90", fmt(m.capture_to_ready_ms.p90));
  setText("transit-p50", fmt(m.capture_to_receive_ms.p50));
  setText("dropped-groups", m.dropped_groups);
  setText("dropped-frames", m.dropped_frames);
  setText("gaps", m.gaps);
  setText("resets", m.resets);
  setText("resolution", m.resolution || "-");
  const outputs = m.sinks.map((s) => (SINK_NAMES[s.kind] || s.kind) +
    (s.published !== undefined ? ` ${s.published} of ${s.sent} published` : "") +
    (s.written !== undefined ? ` ${s.written} written` : "")).join(", ") || "none";
  setText("outputs", outputs);
  $("outputs").title = outputs;
  if (m.decoded) {
    setText("decoded-count", m.decoded.frames);
    setText("decoded-restarts", m.decoded.restarts);
  }
}

function onMessage(m) {
  if (m.type === "hello") {
    $("banner").style.display = m.random_weights ? "block" : "none";
  } else if (m.type === "stats") {
    showNumbers(m);
  } else if (m.type === "latent") {
    state.seen += 1;
    if (window.streamvaeLatents.length < 100000) {
      const { rgb, ...record } = m;
      window.streamvaeLatents.push(record);
    }
    setText("latents-seen", state.seen);
    setText("latents", m.count);
    setText("latent-index", m.index + (m.gap ? " (gap)" : ""));
    setText("latent-shape", `${m.height}x${m.width}`);
    setText("latency-last", fmt(m.latency_ms));
    drawPicture(m);
    if (m.latency_ms !== null) {
      state.latencies.push({ ms: m.latency_ms, e2e: m.capture_to_ready_ms, gap: m.gap || m.dropped_before > 0 });
      if (state.latencies.length > PLOT_POINTS) state.latencies.shift();
      drawPlot();
    }
  } else if (m.type === "decoded") {
    $("decoded").src = "data:image/jpeg;base64," + m.jpeg;
    setText("decoded-frame", m.frame);
    setText("decoded-latent", m.latent);
    setText("decoded-shape", `${m.height}x${m.width}`);
    setText("decoded-count", m.count);
    setText("decoded-restarts", m.restarts);
  } else if (m.type === "ended") {
    showNumbers(m);
    say(m.state === "ended" ? "ended (flushed)" : m.state);
    if (m.error) fail(m.error);
    teardown();
  }
}

const scratch = document.createElement("canvas");
function drawPicture(m) {
  const bytes = Uint8Array.from(atob(m.rgb), (c) => c.charCodeAt(0));
  scratch.width = m.width; scratch.height = m.height;
  const context = scratch.getContext("2d");
  const image = context.createImageData(m.width, m.height);
  for (let i = 0, j = 0; i < bytes.length; i += 3, j += 4) {
    image.data[j] = bytes[i]; image.data[j + 1] = bytes[i + 1]; image.data[j + 2] = bytes[i + 2]; image.data[j + 3] = 255;
  }
  context.putImageData(image, 0, 0);
  const canvas = $("picture");
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = false;
  target.drawImage(scratch, 0, 0, canvas.width, canvas.height);
}

function drawPlot() {
  const canvas = $("plot");
  const c = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, left = 48, bottom = 20, top = 8;
  c.clearRect(0, 0, W, H);
  const values = state.latencies.map((p) => p.ms);
  const ends = state.latencies.map((p) => p.e2e);
  const peak = Math.max(10, ...values, ...ends.filter((v) => v !== null));
  // Four ticks of a round step (1, 2 or 5 times a power of ten), so every label is a whole number.
  const want = (peak * 1.1) / 4;
  const base = Math.pow(10, Math.floor(Math.log10(want)));
  const tick = [1, 2, 5, 10].map((m) => m * base).find((t) => t >= want);
  const ymax = tick * 4;
  const y = (ms) => top + (H - top - bottom) * (1 - ms / ymax);
  const x = (i) => left + ((W - left - 8) * i) / Math.max(1, PLOT_POINTS - 1);
  c.strokeStyle = "#e4e4e4"; c.fillStyle = "#666"; c.font = "11px system-ui"; c.lineWidth = 1;
  const digits = tick >= 1 ? 0 : 1;  // one format for every tick
  for (let k = 0; k <= 4; k++) {
    const ms = (ymax * k) / 4;
    c.beginPath(); c.moveTo(left, y(ms)); c.lineTo(W - 8, y(ms)); c.stroke();
    c.fillText(ms.toFixed(digits), 4, y(ms) + 4);
  }
  c.fillText(`last ${values.length} latents`, left, H - 4);
  state.latencies.forEach((p, i) => {
    if (p.gap) { c.strokeStyle = "#d33"; c.beginPath(); c.moveTo(x(i), top); c.lineTo(x(i), H - bottom); c.stroke(); }
  });
  c.strokeStyle = "#e67e00"; c.lineWidth = 2; c.beginPath();
  let drawing = false;
  ends.forEach((ms, i) => {
    if (ms === null) { drawing = false; return; }
    if (drawing) c.lineTo(x(i), y(ms)); else c.moveTo(x(i), y(ms));
    drawing = true;
  });
  c.stroke();
  c.strokeStyle = "#0a58ca"; c.beginPath();
  values.forEach((ms, i) => (i ? c.lineTo(x(i), y(ms)) : c.moveTo(x(i), y(ms))));
  c.stroke();
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("camera").addEventListener("change", switchCamera);
window.addEventListener("pagehide", () => { if (state.pc) state.pc.close(); });
loadInfo().catch((error) => fail("could not reach the server: " + error));

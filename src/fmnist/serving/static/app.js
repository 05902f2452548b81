// The fmnist page: upload or pick an image, POST it to /v1/predict, draw the top-3 as bars; with a
// catalogue index on the server, show the most similar catalogue items under the prediction.
"use strict";
const $ = (id) => document.getElementById(id);

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

function render(pred, originalUrl, truth) {
  $("result").hidden = false;
  $("original").src = originalUrl;
  $("preprocessed").src = pred.preprocessed;
  const pct = `${(pred.probability * 100).toFixed(1)}%`;
  const unsure = pred.verdict === "unsure";
  // An unsure verdict leads with the doubt and says why; the best guess stays visible below it.
  $("label").textContent = unsure ? `Unsure — perhaps ${pred.label} (${pct})` : `${pred.label} (${pct})`;
  $("label").classList.toggle("unsure", unsure);
  $("reason").textContent = unsure && pred.reason ? pred.reason : "";
  $("reason").hidden = !(unsure && pred.reason);
  $("truth").textContent = truth ? `true label: ${truth}` : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const t of pred.top) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = t.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(t.probability * 100).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.textContent = `${(t.probability * 100).toFixed(1)}%`;
    li.append(name, bar, pct);
    bars.append(li);
  }
}

// "More like this": the catalogue items nearest to what the model saw. The 28x28 image goes back
// to /v1/similar, so the photo is not converted a second time (a 28x28 upload is taken as is).
let search = { enabled: false };

async function loadSearch() {
  try {
    const r = await fetch("/v1/index");
    if (r.ok) search = await r.json();
  } catch (e) {
    console.error("index info:", e);
  }
}

async function showSimilar(pred) {
  const box = $("similar");
  if (!search.enabled || !pred.preprocessed) { box.hidden = true; return; }
  const list = $("neighbours");
  list.replaceChildren();
  $("similar-info").textContent = "…";
  box.hidden = false;
  try {
    const form = new FormData();
    form.append("files", await (await fetch(pred.preprocessed)).blob(), "seen.png");
    const r = await fetch("/v1/similar?k=8", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) {
      $("similar-info").textContent = body.error ? body.error.message : `search failed (${r.status})`;
      return;
    }
    $("similar-info").textContent = `(nearest of ${body.index.count.toLocaleString()} catalogue items; distance = 1 − cosine similarity)`;
    for (const n of body.results[0].neighbours) {
      const fig = document.createElement("figure");
      fig.className = "neighbour";
      fig.dataset.id = n.id;
      const img = document.createElement("img");
      img.src = n.thumbnail;
      img.alt = `catalogue item ${n.id}`;
      img.title = n.source;
      const cap = document.createElement("figcaption");
      cap.textContent = `${n.label || n.predicted + "?"} · ${n.distance.toFixed(3)}`;
      fig.append(img, cap);
      list.append(fig);
    }
  } catch (e) {
    $("similar-info").textContent = `search failed: ${e}`;
  }
}

async function classify(blob, filename, truth) {
  showError("");
  const form = new FormData();
  form.append("files", blob, filename);
  $("label").textContent = "…";
  try {
    const r = await fetch("/v1/predict?top_k=3&include_image=true", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) {
      showError(body.error ? body.error.message : `request failed (${r.status})`);
      $("result").hidden = true;
      $("similar").hidden = true;
      return;
    }
    render(body.predictions[0], URL.createObjectURL(blob), truth);
    showSimilar(body.predictions[0]);
  } catch (e) {
    showError(`could not reach the server: ${e}`);
  }
}

function handleFiles(files) {
  if (!files || !files.length) return;
  classify(files[0], files[0].name);
}

async function loadSamples() {
  const r = await fetch("/v1/samples?n=12");
  const { samples } = await r.json();
  const strip = $("strip");
  strip.replaceChildren();
  for (const s of samples) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = `test image #${s.id}`;
    b.dataset.label = s.label;
    const img = document.createElement("img");
    img.src = s.image;
    img.alt = `test image of a ${s.label}`;
    b.append(img);
    b.addEventListener("click", async () => {
      const blob = await (await fetch(s.image)).blob();
      classify(blob, `test-${s.id}.png`, s.label);
    });
    strip.append(b);
  }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    if (!r.ok) throw new Error(`/v1/model answered ${r.status}`);
    const m = await r.json();
    // parameters and accuracy are null when unknown (e.g. an ONNX file exported by an older fmnist)
    const facts = [m.backend];
    if (m.parameters != null) facts.push(`${m.parameters.toLocaleString()} parameters`);
    if (m.accuracy != null) {
      const before = m.accuracy_of && m.accuracy_of.includes("int8") ? " (fp32, before int8)" : "";
      facts.push(`${(m.accuracy * 100).toFixed(1)}% test accuracy${before}`);
    }
    $("model-info").textContent = `Model: ${m.description || m.name} (${facts.filter(Boolean).join(", ")}).`;
  } catch (e) {
    // The page still classifies without this line; say why it is missing instead of hiding it.
    console.error("model info:", e);
    $("model-info").textContent = `Model details unavailable (${e.message}).`;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });
$("file").addEventListener("change", (e) => handleFiles(e.target.files));
$("shuffle").addEventListener("click", loadSamples);
loadModel();
loadSearch();
loadSamples();

// Prediction page: enter one record's features (or load an example), get the model's probability and its reasons.
"use strict";

let examples = [];

async function buildForm() {
  const schema = await api("GET", "/api/schema");
  const fields = document.getElementById("fields");
  fields.replaceChildren(...schema.columns.filter((c) => c.role === "feature").map((c) => el("label", { title: c.description }, [
    c.name, el("input", { type: "number", step: "any", min: "0", name: c.name, id: "f-" + c.name, required: "" }),
  ])));
  const data = await api("GET", "/api/examples");
  examples = data.examples;
  document.getElementById("example").replaceChildren(...examples.map((e, i) => el("option", { value: String(i) }, [e.label])));
}

function loadExample() {
  const ex = examples[Number(document.getElementById("example").value)];
  if (!ex) return;
  for (const [name, value] of Object.entries(ex.features)) {
    const input = document.getElementById("f-" + name);
    if (input) input.value = String(value);
  }
}

async function predict(event) {
  event.preventDefault();
  const message = document.getElementById("predict-message");
  const features = {};
  document.querySelectorAll("#fields input").forEach((input) => { features[input.name] = input.value === "" ? null : Number(input.value); });
  try {
    const res = await api("POST", "/api/predict", { features: features });
    showMessage(message, "", "info");
    document.getElementById("result").hidden = false;
    document.getElementById("risk-probability").textContent = (100 * res.probability).toFixed(1) + " % " + terms.outcome;
    const level = document.getElementById("risk-level");
    level.textContent = res.risk_level;
    level.className = "badge level-" + res.risk_level.replace(" ", "-");
    document.getElementById("risk-bar").style.width = (100 * res.probability).toFixed(1) + "%";
    document.getElementById("risk-confidence").textContent = res.confidence;
    document.querySelector("#contributions tbody").replaceChildren(...res.top_features.map((f) => el("tr", {}, [
      el("td", { class: "mono" }, [f.feature]), el("td", {}, [fmt(f.value, 4)]),
      el("td", {}, [(f.contribution >= 0 ? "+" : "") + fmt(f.contribution, 3)]),
      el("td", { class: f.contribution > 0 ? "up" : "down" }, [(f.contribution > 0 ? "▲ " : "▼ ") + f.direction]),
    ])));
  } catch (err) {
    document.getElementById("result").hidden = true;
    showMessage(message, err.message, "error");
  }
}

async function init() {
  await loadTitle();
  document.title = "fedveil · " + terms.predictor.toLowerCase();
  await buildForm();
  document.getElementById("load-example").addEventListener("click", loadExample);
  document.getElementById("record-form").addEventListener("submit", predict);
}

init();

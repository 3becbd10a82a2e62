// Shared helpers for the fedveil dashboard pages (no framework, no network beyond this server).
"use strict";

async function api(method, path, body, headers) {
  const init = { method: method, headers: Object.assign({ "X-Fedveil-Request": "1" }, headers || {}) };
  if (body !== undefined) {
    if (body instanceof Blob || body instanceof ArrayBuffer) {
      init.body = body;
    } else {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error("the dashboard server did not answer (" + err.message + ")");
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    throw new Error("the server sent a reply that is not JSON (HTTP " + response.status + ")");
  }
  if (!response.ok) {
    const error = new Error(payload && payload.error ? payload.error : "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return payload;
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children || []) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (!Number.isFinite(value)) return "∞";
  return value.toFixed(digits === undefined ? 3 : digits);
}

function showMessage(node, text, kind) {
  node.textContent = text;
  node.className = "message " + (kind || "info");
  node.hidden = !text;
}

// The task's own words (GET /api/status "terms"): the pages carry generic ones until they arrive.
let terms = { record: "record", records: "records", predictor: "Prediction", predict_action: "Predict",
              outcome: "probability of the positive class", result_title: "Prediction from the current global model" };

function term(template) {
  const text = template.replace(/\{(\w+)\}/g, (_, key) => (key in terms ? terms[key] : "{" + key + "}"));
  return template.startsWith("{") ? text.charAt(0).toUpperCase() + text.slice(1) : text;
}

async function loadTitle() {
  try {
    const status = await api("GET", "/api/status");
    document.querySelectorAll("[data-task]").forEach((n) => { n.textContent = status.task; });
    if (status.terms) terms = Object.assign(terms, status.terms);
    document.querySelectorAll("[data-term]").forEach((n) => { n.textContent = term(n.dataset.term); });
    return status;
  } catch (err) {
    return null;
  }
}

// Site page: upload a site CSV (validated by the server against the task schema) and list local files.
"use strict";

async function refreshSites() {
  const data = await api("GET", "/api/sites");
  if (!data.uploads) {
    document.getElementById("upload-button").disabled = true;
    showMessage(document.getElementById("upload-message"), data.message, "info");
  }
  const select = document.getElementById("site");
  const current = select.value;
  select.replaceChildren(...data.sites.map((h) => el("option", { value: h.name }, [h.name])));
  if (current) select.value = current;
  document.querySelector("#sites-table tbody").replaceChildren(...data.sites.map((h) => {
    const remove = el("button", { type: "button", class: "small" }, ["remove"]);
    remove.disabled = !h.has_upload;
    remove.addEventListener("click", async () => {
      // one click must not lose a site's data (a framed or mistaken click)
      if (!window.confirm("Remove " + h.name + "'s uploaded file? The site goes back to its demo share.")) return;
      await api("DELETE", "/api/sites/" + encodeURIComponent(h.name) + "/upload");
      await refreshSites();
    });
    return el("tr", { "data-site": h.name }, [
      el("td", {}, [h.name]),
      el("td", { class: "upload-state" }, [h.has_upload ? (h.error ? "invalid: " + h.error : "site.csv") : "none (demo share)"]),
      el("td", {}, [h.rows === null ? "–" : h.rows]),
      el("td", {}, [remove]),
    ]);
  }));
}

let maxBytes = 0;

async function refreshSchema() {
  const schema = await api("GET", "/api/schema");
  maxBytes = schema.max_bytes;
  document.getElementById("max-size").textContent = (schema.max_bytes / (1024 * 1024)).toFixed(1) + " MB";
  document.querySelector("#schema-table tbody").replaceChildren(...schema.columns.map((c) => el("tr", {}, [
    el("td", { class: "mono" }, [c.name + (c.role === "label" ? " (label)" : "")]), el("td", {}, [c.type]),
    el("td", {}, [c.description]),
  ])));
}

async function upload(event) {
  event.preventDefault();
  const message = document.getElementById("upload-message");
  const site = document.getElementById("site").value;
  const file = document.getElementById("file").files[0];
  if (!file) { showMessage(message, "Choose a CSV file first.", "error"); return; }
  if (maxBytes && file.size > maxBytes) {
    showMessage(message, `Rejected: ${file.name}: the file is too large (${file.size} bytes; the limit is ${maxBytes})`,
                "error");
    return;
  }
  showMessage(message, "Checking " + file.name + " …", "info");
  try {
    const res = await api("POST", "/api/sites/" + encodeURIComponent(site) + "/upload?filename=" +
                          encodeURIComponent(file.name), file, { "Content-Type": "text/csv" });
    showMessage(message, `Accepted ${res.filename}: ${res.rows} ${terms.records}, ${res.features} features ` +
                `(${(100 * res.label_share).toFixed(0)} % positive), kept at ${res.site}'s side.`, "ok");
  } catch (err) {
    showMessage(message, "Rejected: " + err.message, "error");
  }
  await refreshSites();
}

async function init() {
  await loadTitle();
  await Promise.all([refreshSites(), refreshSchema()]);
  document.getElementById("upload-form").addEventListener("submit", upload);
}

init();

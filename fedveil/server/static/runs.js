// Runs page: start a run, list runs, and follow one run's rounds live (polling the JSON API).
"use strict";

let selectedRun = null;
let pollTimer = null;

function epsilonText(value) { return value === null || value === undefined ? "–" : fmt(value, 3); }

async function refreshRuns() {
  let data;
  try {
    data = await api("GET", "/api/runs");
  } catch (err) {
    return;
  }
  const body = document.querySelector("#runs-table tbody");
  document.getElementById("no-runs").hidden = data.runs.length > 0;
  body.replaceChildren(...data.runs.map((run) => {
    const row = el("tr", { class: run.id === selectedRun ? "selected" : "", "data-run": run.id }, [
      el("td", {}, [el("a", { href: "#" + run.id, class: "run-link" }, [run.id])]),
      el("td", {}, [el("span", { class: "badge " + run.status }, [run.status])]),
      el("td", {}, [run.rounds_done + " / " + (run.settings.rounds || "?")]),
      el("td", {}, [run.settings.dp || "–"]),
      el("td", {}, [fmt(run.accuracy)]),
      el("td", {}, [fmt(run.auc)]),
      el("td", {}, [epsilonText(run.epsilon_sample_max)]),
      el("td", {}, [epsilonText(run.epsilon_user)]),
    ]);
    row.addEventListener("click", (ev) => { ev.preventDefault(); selectRun(run.id); });
    return row;
  }));
  if (!selectedRun && data.runs.length > 0) selectRun(data.runs[0].id);
  const running = data.runs.some((r) => r.status === "running");
  schedule(running ? 1000 : 3000);
}

function schedule(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(async () => { await refreshRuns(); if (selectedRun) await refreshDetail(); }, ms);
}

function selectRun(id) {
  selectedRun = id;
  window.location.hash = id;
  refreshDetail();
  document.querySelectorAll("#runs-table tbody tr").forEach((r) => {
    r.classList.toggle("selected", r.dataset.run === id);
  });
}

async function refreshDetail() {
  if (!selectedRun) return;
  let run;
  try {
    run = await api("GET", "/api/runs/" + encodeURIComponent(selectedRun));
  } catch (err) {
    return;
  }
  document.getElementById("run-detail").hidden = false;
  document.getElementById("run-id").textContent = run.id;
  const badge = document.getElementById("run-status");
  badge.textContent = run.status + (run.error ? ": " + run.error : "");
  badge.className = "badge " + run.status;
  const modelLink = document.getElementById("model-link");
  modelLink.href = "/api/runs/" + encodeURIComponent(run.id) + "/model";
  modelLink.hidden = run.rounds.length === 0;
  const s = run.settings;
  document.getElementById("run-settings").textContent =
    `${s.rounds} rounds · ${s.sites_per_round} sites per round · DP ${s.dp}` +
    (s.epsilon_budget == null ? "" : ` · ε budget ${s.epsilon_budget} · δ ${run.delta}`);
  const warning = document.getElementById("run-warning");
  warning.textContent = s.warning || "";
  warning.hidden = !s.warning;
  const rounds = run.rounds;
  const xs = rounds.map((r) => r.round);
  drawLineChart(document.getElementById("chart-accuracy"), [
    { name: "accuracy", points: rounds.map((r) => [r.round, r.accuracy]) },
    { name: "ROC AUC", points: rounds.map((r) => [r.round, r.auc]) },
  ], { xLabel: "round", yMax: 1 });
  legend(document.getElementById("legend-accuracy"), [{ name: "accuracy" }, { name: "ROC AUC" }]);
  const lossSeries = [{ name: "test loss", points: rounds.map((r) => [r.round, r.loss]) }];
  drawLineChart(document.getElementById("chart-loss"), lossSeries, { xLabel: "round", yMin: 0 });
  legend(document.getElementById("legend-loss"), lossSeries);
  const sites = run.sites || [];
  const epsSeries = sites.map((h) => ({
    name: h, points: rounds.map((r) => [r.round, r.epsilon_sample ? r.epsilon_sample[h] : null]),
  }));
  if (rounds.some((r) => r.epsilon_user !== null && r.epsilon_user !== undefined)) {
    epsSeries.push({ name: "user-level (federation)", color: "#111827", dashed: true,
                     points: rounds.map((r) => [r.round, r.epsilon_user]) });
  }
  const budget = run.epsilon_budget;
  drawLineChart(document.getElementById("chart-epsilon"), epsSeries, {
    xLabel: "round", yMin: 0, hlines: budget ? [{ y: budget, label: "budget ε = " + budget }] : [],
    empty: s.dp === "none" ? "no differential privacy in this run" : "no data yet",
  });
  legend(document.getElementById("legend-epsilon"), epsSeries);
  const partSeries = [
    { name: "participants", color: "#16a34a", points: rounds.map((r) => [r.round, r.participants.length]) },
    { name: "dropped", color: "#dc2626", points: rounds.map((r) => [r.round, r.dropped.length]) },
  ];
  drawLineChart(document.getElementById("chart-participants"), partSeries, { xLabel: "round", yMin: 0 });
  legend(document.getElementById("legend-participants"), partSeries);
  const box = document.getElementById("budget-box");
  const last = rounds[rounds.length - 1];
  if (last && last.budget_remaining && Object.keys(last.budget_remaining).length > 0) {
    box.replaceChildren(el("strong", {}, ["Privacy budget remaining: "]),
      ...Object.entries(last.budget_remaining).map(([party, left]) =>
        el("span", { class: "chip" + (left !== null && left <= 0.05 * (budget || 1) ? " low" : "") },
           [party + ": " + epsilonText(left)])));
  } else {
    box.replaceChildren(el("span", { class: "muted" }, [s.dp === "none" ? "No privacy budget: DP is off." : "No rounds yet."]));
  }
  document.querySelector("#rounds-table tbody").replaceChildren(...rounds.slice().reverse().map((r) => el("tr", {}, [
    el("td", {}, [r.round]), el("td", {}, [fmt(r.accuracy)]), el("td", {}, [fmt(r.auc)]), el("td", {}, [fmt(r.loss)]),
    el("td", {}, [epsilonText(r.epsilon_sample_max)]), el("td", {}, [epsilonText(r.epsilon_user)]),
    el("td", {}, [r.participants.join(", ")]), el("td", { class: r.dropped.length ? "dropped" : "" }, [r.dropped.join(", ") || "–"]),
  ])));
  void xs;
}

async function startRun(event) {
  event.preventDefault();
  const message = document.getElementById("start-message");
  const settings = {
    rounds: Number(document.getElementById("rounds").value),
    sites_per_round: Number(document.getElementById("per-round").value),
    dp: document.getElementById("dp").value,
    epsilon_budget: Number(document.getElementById("budget").value),
  };
  try {
    const res = await api("POST", "/api/runs", settings);
    showMessage(message, "Started " + res.run_id + ".", "ok");
    selectedRun = res.run_id;
    await refreshRuns();
    await refreshDetail();
  } catch (err) {
    showMessage(message, err.message, "error");
  }
}

async function init() {
  const status = await loadTitle();
  if (status) {
    const perRound = document.getElementById("per-round");
    perRound.max = String(status.sites.length);
    perRound.value = String(status.defaults.sites_per_round);
    document.getElementById("rounds").value = String(status.defaults.rounds);
    document.getElementById("budget").value = String(status.defaults.epsilon_budget);
    if (!status.can_start_runs) {
      document.getElementById("start-button").disabled = true;
      showMessage(document.getElementById("start-message"),
                  "This dashboard watches a server's run store; start runs with the server command.", "info");
    }
  }
  document.getElementById("start-form").addEventListener("submit", startRun);
  if (window.location.hash.length > 1) selectedRun = decodeURIComponent(window.location.hash.slice(1));
  await refreshRuns();
  await refreshDetail();
  window.addEventListener("resize", refreshDetail);
}

init();

// The worker's dashboard page: refresh the panels every few seconds, answer the "try it"
// form from the worker's own endpoints. No library, no network beyond this worker.
"use strict";
(function () {
  const panels = document.getElementById("panels");
  const refreshed = document.getElementById("refreshed");
  const every = 1000 * Number(document.body.dataset.refresh || 5);

  async function refresh() {
    try {
      const response = await fetch("/dashboard/panels", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      panels.innerHTML = await response.text();
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      refreshed.textContent = "refreshed " + new Date().toLocaleTimeString();
    } catch (error) {
      refreshed.textContent = "worker not answering (" + error.message + "); retrying";
    }
  }
  setInterval(refresh, every);

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function show(body, status, what) {
    const out = document.getElementById("try-result");
    out.replaceChildren();
    out.className = "";
    const head = document.createElement("p");
    if (status !== 200) {
      head.className = "badge bad";
      head.textContent = what + ": " + (body.error || "HTTP " + status);
      out.appendChild(head);
      return;
    }
    const notes = ["index v" + (body.index_version ?? "–"), "variant " + body.variant];
    if (body.fallback) notes.push("fallback: " + body.fallback);
    if (body.cold_start) notes.push("cold start");
    head.textContent = what + " (" + notes.join(", ") + ")";
    out.appendChild(head);
    const table = document.createElement("table");
    table.id = "try-list";
    const header = table.insertRow();
    ["#", "item", "score"].forEach((h) => {
      const th = document.createElement("th");
      th.textContent = h;
      header.appendChild(th);
    });
    body.items.forEach((item, i) => {
      const row = table.insertRow();
      row.className = "try-item";
      cell(row, String(i + 1));
      cell(row, item.item_id);
      cell(row, Number(item.score).toFixed(4));
    });
    out.appendChild(table);
  }

  function wire(formId, path, what) {
    document.getElementById(formId).addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.target;
      const id = form.elements.id.value.trim();
      const url = path + encodeURIComponent(id) + "?k=" + encodeURIComponent(form.elements.k.value);
      try {
        const response = await fetch(url, { cache: "no-store" });
        show(await response.json(), response.status, what + " " + id);
      } catch (error) {
        show({ error: error.message }, 0, what + " " + id);
      }
    });
  }
  wire("try-user", "/recommendations/", "list for user");
  wire("try-item", "/similar/", "neighbours of item");
})();

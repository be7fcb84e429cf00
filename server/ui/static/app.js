// The dashboard's live parts: rows, counts and a job's page follow the API's event streams (no reloads).
"use strict";

function setStatus(holder, status) {
  if (!holder) return;
  const span = document.createElement("span");
  span.className = "status s-" + status;
  span.textContent = status;
  holder.replaceChildren(span);
}

function setProgress(id, fraction) {
  const pct = Math.round(fraction * 1000) / 10;
  document.querySelectorAll('[data-bar="' + id + '"]').forEach(function (bar) {
    const meter = bar.querySelector("progress");
    if (meter) { meter.value = pct; meter.textContent = Math.round(pct) + " %"; }
    const label = bar.querySelector(".pct");
    if (label) label.textContent = Math.round(pct) + " %";
  });
}

// A stream that ended for good: if the session is over, the page goes to sign-in (and back here after).
function whenClosed(source) {
  source.addEventListener("error", function () {
    if (source.readyState !== EventSource.CLOSED) return;
    fetch(location.href, { redirect: "manual", credentials: "same-origin" }).then(function (r) {
      if (r.type === "opaqueredirect" || r.status === 401) location.reload();
    });
  });
}

async function replaceFrom(selector) {
  const response = await fetch(location.href, { credentials: "same-origin" });
  if (response.redirected || !response.ok) { location.reload(); return; }
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = page.querySelector(selector);
  const here = document.querySelector(selector);
  if (fresh && here) here.replaceWith(fresh);
}

// The list's stream follows its own rows (`rows`): a `job` event for each that changed, and for the rest one
// `others` event a wake, with the ids of those that match the page's filters. Ids begin with their creation time:
// one above the page's `newer` is a job created since the page was read (as hex text, the same order).
function followJobs() {
  const note = document.querySelector("[data-new-jobs]");
  const page = new URLSearchParams(location.search);
  const counting = note && !page.has("before");
  const newer = note ? note.dataset.newer : "";
  const rows = Array.from(document.querySelectorAll("tr[data-job]"), function (row) { return row.dataset.job; });
  const params = new URLSearchParams({ rows: rows.join(",") });
  ["status", "type"].forEach(function (name) { if (page.get(name)) params.set(name, page.get(name)); });
  const source = new EventSource("/ui/events?" + params);
  whenClosed(source);
  source.addEventListener("job", function (event) {
    const job = JSON.parse(event.data);
    const row = document.querySelector('tr[data-job="' + job.id + '"]');
    if (!row) return;
    setStatus(row.querySelector("[data-status]"), job.status);
    setProgress(job.id, job.progress.fraction);
    const attempt = row.querySelector("[data-attempt]");
    if (attempt) attempt.textContent = job.attempt + " / " + job.max_attempts;
  });
  const fresh = new Set();  // a job is counted once, though the stream may show it again when it ends
  source.addEventListener("others", function (event) {
    if (!counting) return;
    JSON.parse(event.data).ids.forEach(function (id) { if (id > newer) fresh.add(id); });
    if (fresh.size === 0) return;
    note.hidden = false;
    note.querySelector("span").textContent = fresh.size + (fresh.size === 1 ? " new job" : " new jobs");
  });
}

// The overview only reloads its counts, at most every 2 s: its stream follows no rows, so it is one small event a wake.
function followOverview() {
  const source = new EventSource("/ui/events?rows=");
  whenClosed(source);
  let pending = null;
  source.addEventListener("others", function () {
    if (pending) return;
    pending = setTimeout(function () { pending = null; replaceFrom("#live"); }, 2000);
  });
}

function followJob(id) {
  if (document.body.dataset.done === "true") return;
  const source = new EventSource("/ui/jobs/" + id + "/events");
  whenClosed(source);
  source.addEventListener("status", function (event) {
    const job = JSON.parse(event.data);
    const shown = document.querySelector("h1 [data-status]");
    const changed = !shown || shown.textContent.trim() !== job.status;
    setStatus(shown, job.status);
    setProgress(id, job.progress.fraction);
    const attempt = document.querySelector("[data-attempt]");
    if (attempt) attempt.textContent = job.attempt + " / " + job.max_attempts;
    if (job.done) source.close();
    // A new state (not the stream's first word, which repeats the page's): the page's own rendering of it, for its
    // times, its timeline, its error and result, and the buttons that state has.
    if (changed || job.done) replaceFrom("#job");
  });
  source.addEventListener("progress", function (event) {
    const progress = JSON.parse(event.data);
    setProgress(id, progress.fraction);
    const message = document.querySelector("[data-progress-message]");
    if (message) message.textContent = progress.message || "";
  });
  source.addEventListener("log", function (event) {
    const line = JSON.parse(event.data);
    const log = document.querySelector("[data-log]");
    if (!log) return;
    const item = document.createElement("li");
    item.className = "lvl-" + line.level;
    const level = document.createElement("span");
    level.className = "lvl";
    level.textContent = line.level;
    item.append(level, " " + line.message);
    log.append(item);
    const empty = document.querySelector("[data-log-empty]");
    if (empty) empty.remove();
  });
}

document.addEventListener("DOMContentLoaded", function () {
  const live = document.body.dataset.live;
  if (live === "jobs") followJobs();
  else if (live === "overview") followOverview();
  else if (live === "job") followJob(document.body.dataset.jobId);
});

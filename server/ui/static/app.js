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

function followJobs() {
  const source = new EventSource("/ui/events");
  whenClosed(source);
  const note = document.querySelector("[data-new-jobs]");
  const firstPage = !new URLSearchParams(location.search).has("before");
  // Ids begin with their creation time: one above the newest row's is a job created since. The stream sends each
  // job at its latest state, so a job that ran within a second is never seen queued.
  const newestRow = document.querySelector("tr[data-job]");
  const newest = newestRow ? newestRow.dataset.job : null;
  const fresh = new Set();
  source.addEventListener("job", function (event) {
    const job = JSON.parse(event.data);
    const row = document.querySelector('tr[data-job="' + job.id + '"]');
    if (!row) {
      const created = newest === null ? job.status === "queued" : job.id > newest;
      if (firstPage && note && created && !fresh.has(job.id)) {
        fresh.add(job.id);
        note.hidden = false;
        note.querySelector("span").textContent = String(fresh.size);
      }
      return;
    }
    setStatus(row.querySelector("[data-status]"), job.status);
    setProgress(job.id, job.progress.fraction);
    const attempt = row.querySelector("[data-attempt]");
    if (attempt) attempt.textContent = job.attempt + " / " + job.max_attempts;
  });
}

function followOverview() {
  const source = new EventSource("/ui/events");
  whenClosed(source);
  let pending = null;
  source.addEventListener("job", function () {
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

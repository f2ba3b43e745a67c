// The Stem dashboard. Every page polls its part of /api/ and redraws; nothing a task,
// producer or worker wrote is ever parsed as HTML (text nodes only).
"use strict";

const REFRESH_MS = 1500;
// `busy` holds the actions whose request is in flight: their buttons stay disabled across
// redraws, so a second click cannot send the same action again.
const state = { canAct: false, expanded: new Set(), timer: null, page: null, busy: new Set() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function notice(text, isError) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = isError ? "error" : "";
  box.hidden = false;
}

async function api(path) {
  const response = await fetch("/api/" + path, { credentials: "same-origin" });
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not logged in");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

// What makes two actions the same: the path and which ids or "all" they name.
const actionKey = (path, extra) => path + " " + JSON.stringify((extra && (extra.ids || extra.all)) || null);

// Asks first; the server refuses any action without the confirmation.
async function act(path, question, extra, target) {
  const key = actionKey(path, extra);
  if (state.busy.has(key) || !window.confirm(question)) return null;
  state.busy.add(key);
  if (target) target.disabled = true;
  try {
    const response = await fetch("/api/" + path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(Object.assign({ confirm: true }, extra || {})),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      notice("Refused: " + (body.error || response.statusText), true);
      return null;
    }
    return body;
  } catch (error) {
    notice("Failed: " + error.message, true);
    return null;
  } finally {
    state.busy.delete(key);
    if (target) target.disabled = false;
    refresh();
  }
}

function button(label, question, path, extra, options) {
  const opts = options || {};
  const busy = state.busy.has(actionKey(path, extra));
  return el("button", {
    type: "button",
    class: opts.danger ? "danger" : null,
    disabled: !state.canAct || busy,
    "aria-busy": busy ? "true" : null,
    title: state.canAct ? null : "Read-only: the dashboard was started without a token",
    onclick: async (event) => {
      const body = await act(path, question, extra, event.currentTarget);
      if (body && opts.done) opts.done(body);
    },
  }, label);
}

const replayedNotice = (b) => notice(`Replayed ${b.replayed.length} task(s).` +
  (b.skipped.length ? ` Skipped ${b.skipped.length} undecodable.` : "") +
  (b.left_invalid ? ` Left ${b.left_invalid} refused as signature-invalid.` : ""));

const enc = encodeURIComponent;
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "");
const stateCell = (s) => el("span", { class: "state state-" + s }, s);
const taskLink = (id) => el("a", { href: "/tasks/" + enc(id) }, id);
const table = (headers, rows, empty) => rows.length === 0
  ? el("p", { class: "muted" }, empty)
  : el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
const payloadText = (payload) => {
  if (!payload) return "";
  try { return JSON.stringify(JSON.parse(payload.data), null, 2); } catch (_) { return payload.data; }
};

function chart(series) {
  const width = 600, height = 160, max = Math.max(1, ...series.map((b) => b.succeeded + b.failed));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
  const step = width / Math.max(1, series.length);
  series.forEach((bucket, i) => {
    const ok = (bucket.succeeded / max) * (height - 10);
    const bad = (bucket.failed / max) * (height - 10);
    root.append(svg("rect", { x: i * step + 1, y: height - ok, width: step - 2, height: ok, fill: "#2da44e" }));
    root.append(svg("rect", { x: i * step + 1, y: height - ok - bad, width: step - 2, height: bad, fill: "#cf222e" }));
  });
  return root;
}

const pages = {
  async overview() {
    const o = await api("overview");
    const card = (value, label, id) => el("div", { class: "card" },
      el("div", { class: "value", id }, value), el("div", { class: "label" }, label));
    return [
      el("h1", {}, "Overview"),
      el("div", { class: "cards" },
        card(o.workers, "workers alive", "workers-alive"), card(o.running, "running"),
        card(o.ready, "ready"), card(o.delayed, "delayed"), card(o.dead, "dead letters"),
        card(o.succeeded, "succeeded, 10 min", "succeeded-10m"), card(o.failed, "failed, 10 min", "failed-10m")),
      el("h2", {}, "Throughput and failures (per " + o.bucket_secs + " s, last 10 minutes)"),
      el("div", { class: "chart" }, chart(o.series),
        el("div", { class: "legend" }, el("span", {}, "green: succeeded"), el("span", {}, "red: failed"))),
      o.events ? null : el("p", { class: "muted" }, "Not receiving events: charts stay empty until the broker's event stream is reachable."),
      el("h2", {}, "Latest events"),
      table(["When", "Event", "Task", "Name", "Queue", "Worker", "Error"],
        o.recent.map((e) => el("tr", {}, el("td", {}, time(e.at)), el("td", {}, e.event),
          el("td", {}, e.task_id ? taskLink(e.task_id) : ""), el("td", {}, e.task || ""),
          el("td", {}, e.queue || ""), el("td", {}, e.worker || ""), el("td", {}, e.error || ""))),
        "No events yet."),
    ];
  },

  async queues() {
    const queues = await api("queues");
    return [
      el("h1", {}, "Queues"),
      table(["Queue", "Ready", "Delayed", "In flight", "Dead", "Finished / min", ""],
        queues.map((q) => el("tr", { "data-queue": q.queue }, el("td", {}, q.queue),
          el("td", { class: "num" }, q.ready), el("td", { class: "num" }, q.delayed),
          el("td", { class: "num" }, q.in_flight), el("td", { class: "num" }, q.dead),
          el("td", { class: "num" }, q.finished_per_minute),
          el("td", {}, button("Purge", `Purge every ready and delayed task of queue ${q.queue}?`,
            `queues/${enc(q.queue)}/purge`, null, { danger: true,
              done: (b) => notice(`Purged ${b.purged} tasks from ${q.queue}.`) })))),
        "No queue holds tasks."),
    ];
  },

  async workers() {
    const workers = await api("workers");
    const command = (w, name, label, danger) => button(label, `${label} worker ${w.worker_id}?`,
      `workers/${enc(w.worker_id)}/${name}`, null, { danger,
        done: (b) => notice(b.replies.length
          ? `${w.worker_id}: ${JSON.stringify(b.replies[0].body)} (${b.elapsed_ms} ms)`
          : `${w.worker_id} did not answer.`, b.replies.length === 0) });
    return [
      el("h1", {}, "Workers"),
      table(["Worker", "Host", "PID", "Queues", "Slots", "Running", "Processed", "Started", "Last seen", ""],
        workers.map((w) => el("tr", { "data-worker": w.worker_id }, el("td", {}, w.worker_id),
          el("td", {}, w.hostname), el("td", { class: "num" }, w.pid), el("td", {}, w.queues.join(", ")),
          el("td", { class: "num" }, w.concurrency), el("td", { class: "num" }, w.in_flight),
          el("td", { class: "num" }, w.processed), el("td", {}, time(w.started_at)),
          el("td", {}, time(w.last_seen)),
          el("td", {}, command(w, "ping", "Ping"), command(w, "pause", "Pause"),
            command(w, "resume", "Resume"), command(w, "shutdown", "Shut down", true)))),
        "No worker is alive."),
    ];
  },

  async tasks() {
    const params = new URLSearchParams(window.location.search);
    const statuses = await api("tasks?" + params.toString());
    return [
      el("h1", {}, "Tasks"),
      searchForm(params),
      table(["Task id", "Name", "State", "Attempt", "Worker", "Updated"],
        statuses.map((s) => el("tr", {}, el("td", {}, taskLink(s.id)), el("td", {}, s.task || ""),
          el("td", {}, stateCell(s.state)), el("td", { class: "num" }, s.attempt),
          el("td", {}, s.worker || ""), el("td", {}, time(s.updated_at)))),
        "No task matches."),
    ];
  },

  async task(id) {
    const t = await api("tasks/" + enc(id));
    const s = t.status || {};
    const row = (label, value) => [el("dt", {}, label), el("dd", {}, value === undefined || value === null ? "" : value)];
    const revoke = (terminate) => button(terminate ? "Terminate" : "Revoke",
      terminate ? `Revoke task ${id} and stop it if it is running?` : `Revoke task ${id}? It will not run.`,
      `tasks/${enc(id)}/revoke`, { terminate }, { danger: true,
        done: (b) => notice(`Revoked ${b.revoked.length} task(s).`) });
    const progress = s.progress ? `${s.progress.percent}% ${s.progress.message || ""}` : "";
    return [
      el("h1", {}, "Task ", el("code", {}, id)),
      el("dl", {},
        row("State", s.state ? el("span", { id: "task-state", class: "state state-" + s.state }, s.state) : "(no status)"),
        row("Name", s.task), row("Attempt", s.attempt), row("Worker", s.worker),
        row("Progress", progress), row("Updated", time(s.updated_at)),
        row("Parent", s.parent_id ? taskLink(s.parent_id) : ""),
        row("Root", s.root_id ? taskLink(s.root_id) : ""), row("Group", s.group_id),
        row("Component", s.component)),
      el("p", {}, revoke(false), " ", revoke(true)),
      s.error ? [el("h2", {}, "Error"), el("pre", { id: "task-error" }, `${s.error.kind}: ${s.error.message}`)] : null,
      s.result ? [el("h2", {}, "Result"), el("pre", { id: "task-result" }, payloadText(s.result))] : null,
      t.args ? [el("h2", {}, "Arguments (from its dead letter)"), el("pre", {}, payloadText(t.args))] : null,
      t.dead_letter ? el("p", {}, "In the dead-letter queue: ", t.dead_letter.reason, " ",
        button("Replay", `Replay task ${id}?`, "dead-letters/replay", { ids: [t.dead_letter.id] },
          { done: replayedNotice })) : null,
      t.canvas ? [el("h2", {}, "Canvas"), el("pre", {}, JSON.stringify(t.canvas, null, 2))] : null,
    ];
  },

  async deadLetters() {
    const params = new URLSearchParams(window.location.search);
    const queue = params.get("queue") || "";
    const [letters, queues] = await Promise.all(
      [api("dead-letters" + (queue ? "?queue=" + enc(queue) : "")), api("queues")]);
    // The count to confirm is the broker's, not the length of the list (at most 500 rows).
    const total = queues.filter((q) => !queue || q.queue === queue).reduce((n, q) => n + q.dead, 0);
    const scope = queue ? ` of queue ${queue}` : "";
    const all = { all: true, expected: total, queue: queue || undefined };
    const rows = letters.flatMap((d) => {
      const key = d.id;
      const open = state.expanded.has(key);
      const main = el("tr", { "data-letter": d.task_id || d.id },
        el("td", {}, d.task_id ? taskLink(d.task_id) : `(entry ${d.id})`),
        el("td", {}, d.task || "(undecodable)"), el("td", {}, d.queue), el("td", {}, time(d.dead_at)),
        el("td", {}, d.reason),
        el("td", {},
          el("button", { type: "button", onclick: () => { open ? state.expanded.delete(key) : state.expanded.add(key); refresh(); } }, open ? "Hide" : "Show"),
          button("Replay", `Replay ${d.task_id || d.id} as a new run?`, "dead-letters/replay", { ids: [d.id] },
            { done: replayedNotice }),
          button("Purge", `Delete dead letter ${d.task_id || d.id} for good?`, "dead-letters/purge", { ids: [d.id] },
            { danger: true, done: (b) => notice(`Purged ${b.purged} dead letter(s).`) })));
      return open ? [main, el("tr", {}, el("td", { colspan: 6 }, el("pre", {}, d.payload)))] : [main];
    });
    const choices = queues.filter((q) => q.dead > 0 || q.queue === queue);
    return [
      el("h1", {}, "Dead letters"),
      el("form", { class: "search", method: "get", action: "/dead-letters" },
        el("select", { name: "queue", id: "dead-queue" },
          el("option", { value: "", selected: !queue }, "every queue"),
          choices.map((q) => el("option", { value: q.queue, selected: q.queue === queue }, `${q.queue} (${q.dead})`))),
        el("button", { type: "submit" }, "Show")),
      total ? el("p", {},
        button("Replay all", `Replay all ${total} dead letters${scope}?`, "dead-letters/replay", all,
          { done: replayedNotice }), " ",
        button("Purge all", `Delete all ${total} dead letters${scope} for good?`, "dead-letters/purge", all,
          { danger: true, done: (b) => notice(`Purged ${b.purged} dead letter(s).`) })) : null,
      letters.length < total ? el("p", { class: "muted" }, `The newest ${letters.length} of ${total} are listed.`) : null,
      table(["Task id", "Task", "Queue", "Dead at", "Reason", ""], rows, "The dead-letter queue is empty."),
    ];
  },

  async schedules() {
    const entries = await api("schedules");
    return [
      el("h1", {}, "Schedules"),
      table(["Entry", "Task", "Schedule", "Queue", "Next run", "Last run", "Runs"],
        entries.map((e) => el("tr", {}, el("td", {}, e.id), el("td", {}, e.definition.task),
          el("td", {}, JSON.stringify(e.definition.schedule)), el("td", {}, e.definition.queue || ""),
          el("td", {}, time(e.state.next_run_at)), el("td", {}, time(e.state.last_run_at)),
          el("td", { class: "num" }, e.state.total_run_count ?? ""))),
        "No schedule entries (Beat stores them from its schedule file)."),
    ];
  },
};

function searchForm(params) {
  const field = (name, label) => el("input", { name, placeholder: label, value: params.get(name) || "" });
  const states = ["", "pending", "received", "started", "retrying", "succeeded", "failed", "revoked"];
  const select = el("select", { name: "state" },
    states.map((s) => el("option", { value: s, selected: (params.get("state") || "") === s }, s || "any state")));
  return el("form", { class: "search", method: "get", action: "/tasks" },
    field("id", "task id"), field("name", "task name"), select, el("button", { type: "submit" }, "Search"));
}

function route() {
  const path = window.location.pathname;
  if (path.startsWith("/tasks/")) return () => pages.task(decodeURIComponent(path.slice("/tasks/".length)));
  return {
    "/": pages.overview, "/queues": pages.queues, "/workers": pages.workers, "/tasks": pages.tasks,
    "/dead-letters": pages.deadLetters, "/schedules": pages.schedules,
  }[path] || pages.overview;
}

async function refresh() {
  clearTimeout(state.timer);
  const app = document.getElementById("app");
  // A search being typed is not redrawn under the cursor.
  if (app.contains(document.activeElement) && document.activeElement.matches("input, select")) {
    state.timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  try {
    const content = await state.page();
    app.replaceChildren(...[content].flat(3).filter((c) => c !== null && c !== undefined));
    document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (error) {
    notice("Could not load: " + error.message, true);
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", async () => {
  const path = window.location.pathname;
  for (const link of document.querySelectorAll("header nav a")) {
    const target = link.getAttribute("href");
    if (target === path || (target !== "/" && path.startsWith(target))) link.classList.add("current");
  }
  try {
    state.canAct = (await api("session")).can_act;
  } catch (_) {
    return;
  }
  state.page = route();
  refresh();
});

// Drives the dashboard in Debian's headless Chromium against a real worker on SQLite.
// Started by host/tests/all/dashboard.rs, which runs the worker and the dashboard and passes:
//   DASHBOARD_URL, DASHBOARD_TOKEN, STEM_BIN (stem-host, run in the current directory with
//   this process's environment), DEAD_TASK_ID (a task in the dead-letter queue that succeeds
//   when replayed), SCREENSHOT (where to save a picture of the overview).
// Exits non-zero, naming the step, when anything is not as it should be.
import { execFileSync } from "node:child_process";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const url = process.env.DASHBOARD_URL;
const token = process.env.DASHBOARD_TOKEN;
const stem = (...args) => execFileSync(process.env.STEM_BIN, args, { encoding: "utf8" }).trim();
const enqueue = (task, args) => stem("enqueue", task, "--args", JSON.stringify(args));

let step = "start";
const log = (text) => { step = text; console.log("step:", text); };

async function refusedWithoutToken() {
  log("without the token every page and action is refused");
  for (const path of ["/", "/queues", "/workers", "/tasks", "/tasks/x", "/dead-letters", "/schedules",
    "/api/overview", "/api/queues", "/api/workers", "/api/tasks", "/api/dead-letters", "/api/schedules"]) {
    const response = await fetch(url + path, { redirect: "manual" });
    assert.equal(response.status, 401, `GET ${path} without the token`);
  }
  for (const path of ["/api/queues/default/purge", "/api/dead-letters/purge", "/api/tasks/x/revoke",
    "/api/workers/w/shutdown", "/api/dead-letters/replay"]) {
    const response = await fetch(url + path, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ confirm: true, all: true }),
    });
    assert.equal(response.status, 401, `POST ${path} without the token`);
  }
  const wrong = await fetch(url + "/api/overview", { headers: { Authorization: "Bearer wrong" } });
  assert.equal(wrong.status, 401, "a wrong bearer token");
  const unconfirmed = await fetch(url + "/api/dead-letters/purge", {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({ all: true }),
  });
  assert.equal(unconfirmed.status, 400, "an action without its confirmation");
  const form = await fetch(url + "/api/dead-letters/purge", {
    method: "POST", headers: { "Content-Type": "application/x-www-form-urlencoded", Authorization: `Bearer ${token}` },
    body: "confirm=true&all=true",
  });
  assert.equal(form.status, 415, "an action sent as a form");
}

async function stateOf(page) {
  return (await page.locator("#task-state").textContent({ timeout: 10000 })).trim();
}

async function main() {
  await refusedWithoutToken();
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  try {
    page.setDefaultTimeout(30000);
    // Every confirmation is accepted, unless `dismissNext` says otherwise; `asked` keeps them.
    const asked = [];
    let dismissNext = false;
    page.on("dialog", (dialog) => {
      asked.push(dialog.message());
      if (dismissNext) {
        dismissNext = false;
        dialog.dismiss();
      } else {
        dialog.accept();
      }
    });

    log("a page without a session shows the login form");
    const first = await page.goto(url + "/queues");
    assert.equal(first.status(), 401);
    await page.locator("#token").fill("not-the-token");
    await page.locator("#login").click();
    await page.getByText("That token is not right.").waitFor();

    log("log in");
    await page.locator("#token").fill(token);
    await page.locator("#login").click();
    await page.waitForURL(url + "/");
    await page.locator("#workers-alive").filter({ hasText: /^[1-9]/ }).waitFor();

    log("see a task succeed live");
    const busy = enqueue("hello.busy", { ms: 2500 });
    await page.goto(`${url}/tasks/${busy}`);
    await page.evaluate(() => { window.notReloaded = true; });
    await page.locator("#task-state", { hasText: "succeeded" }).waitFor();
    assert.equal(await page.evaluate(() => window.notReloaded), true, "updated without a reload");
    assert.match(await page.locator("#task-result").textContent(), /\d+/);

    log("open a failed task's error");
    const failed = enqueue("hello.fail", { message: "boom from the browser test" });
    await page.goto(`${url}/tasks/${failed}`);
    await page.locator("#task-state", { hasText: "failed" }).waitFor();
    assert.match(await page.locator("#task-error").textContent(), /boom from the browser test/);

    log("replay all asks with the broker's count of dead letters");
    const dead = process.env.DEAD_TASK_ID;
    await page.goto(`${url}/dead-letters`);
    const row = page.locator(`tr[data-letter="${dead}"]`);
    await row.waitFor();
    const queues = await (await fetch(url + "/api/queues", { headers: { Authorization: `Bearer ${token}` } })).json();
    const total = queues.reduce((n, q) => n + q.dead, 0);
    dismissNext = true;
    await page.getByRole("button", { name: "Replay all" }).click();
    assert.equal(asked.at(-1), `Replay all ${total} dead letters?`);

    log("replay a dead letter: its button stays disabled while the request is in flight");
    let release;
    const held = new Promise((resolve) => { release = resolve; });
    await page.route("**/api/dead-letters/replay", async (route) => { await held; await route.continue(); });
    await row.getByRole("button", { name: "Replay" }).click();
    await page.waitForTimeout(2500); // past a redraw of the page
    assert.equal(await row.getByRole("button", { name: "Replay" }).isDisabled(), true,
      "a replay in flight cannot be sent again");
    release();
    await page.getByText("Replayed 1 task(s).").waitFor();
    await page.unroute("**/api/dead-letters/replay");
    await row.waitFor({ state: "detached" });
    await page.goto(`${url}/tasks/${dead}`);
    await page.locator("#task-state", { hasText: "succeeded" }).waitFor();

    log("revoke a running task");
    const long = enqueue("hello.busy", { ms: 120000, cooperative: false });
    await page.goto(`${url}/tasks/${long}`);
    await page.locator("#task-state", { hasText: "started" }).waitFor();
    await page.getByRole("button", { name: "Terminate" }).click();
    await page.locator("#task-state", { hasText: "revoked" }).waitFor();

    log("the overview charts what ran");
    await page.goto(url + "/");
    await page.locator("#succeeded-10m").filter({ hasText: /^[1-9]/ }).waitFor();
    await page.locator("#failed-10m").filter({ hasText: /^[1-9]/ }).waitFor();
    assert.ok(await page.locator(".chart rect").count() > 0, "the chart has bars");
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });

    log("log out");
    await page.getByRole("button", { name: "Log out" }).click();
    await page.waitForURL(url + "/login");
    const after = await page.goto(url + "/workers");
    assert.equal(after.status(), 401, "no page after logging out");
  } catch (error) {
    if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT + ".failed.png" });
    throw error;
  } finally {
    await browser.close();
  }
}

main().then(
  () => console.log("all steps passed"),
  (error) => {
    console.error(`failed at step "${step}":`, error);
    process.exit(1);
  },
);

// Dashboard end to end: `strobe demo` (aggregator, simulated fleet, staged bad deploy) driven in real headless
// Chromium. Screenshots go to artifacts/.
"use strict";

const { test } = require("node:test");
const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const path = require("node:path");
const readline = require("node:readline");
const { chromium } = require("playwright-core");

const root = path.resolve(__dirname, "..", "..");
const bin = process.env.STROBE_BIN || path.join(root, "target", "debug", "strobe");
const artifacts = path.join(root, "artifacts");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

function startDemo() {
  const demo = spawn(bin, ["demo", "--http-addr", "127.0.0.1:0", "--bad-deploy-after", "6s"], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, STROBE_LOG: "warn" },
  });
  const url = new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: demo.stdout });
    lines.on("line", (line) => {
      const m = line.match(/dashboard at (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    demo.on("exit", (code) => reject(new Error(`strobe demo exited with ${code}`)));
    setTimeout(() => reject(new Error("strobe demo did not print its URL")), 30000);
  });
  return { demo, url };
}

// Stops the demo: SIGTERM, then SIGKILL if it has not exited within 5 s.
function stop(child) {
  if (child.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const force = setTimeout(() => child.kill("SIGKILL"), 5000);
    child.on("exit", () => { clearTimeout(force); resolve(); });
    child.kill("SIGTERM");
  });
}

async function eventually(what, timeoutMs, check) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

test("the dashboard shows every service live, turns the bad version red and acknowledges its alert", { timeout: 180000 }, async () => {
  fs.mkdirSync(artifacts, { recursive: true });
  const { demo, url: urlPromise } = startDemo();
  let browser;
  try {
    const url = await urlPromise;
    browser = await chromium.launch({ executablePath: chromiumPath, args: CHROMIUM_FLAGS });
    const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
    const errors = [];
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(url);

    // Every service gets a tile, and tiles move every second.
    for (const service of ["checkout", "search", "payments"]) {
      await page.waitForSelector(`.tile[data-service="${service}"][data-t]`, { timeout: 20000 });
    }
    const secondOf = async () => Number(await page.getAttribute('.tile[data-service="search"]', "data-t"));
    const first = await secondOf();
    await page.waitForTimeout(3200);
    const later = await secondOf();
    assert.ok(later >= first + 2, `tiles updated from second ${first} to ${later} in 3.2 s`);
    assert.match(await page.textContent("#conn"), /live/);

    // The staged bad deploy: v42's side of checkout's tile turns red, v41's does not, and an alert appears.
    await page.waitForSelector('.tile[data-service="checkout"] .version.bad[data-version="v42"]', { timeout: 40000 });
    assert.equal(await page.$('.tile[data-service="checkout"] .version.bad[data-version="v41"]'), null);
    assert.match(await page.getAttribute('.tile[data-service="checkout"]', "class"), /\bbad\b/);
    // Red alone could come from the page's own 5% error colour; the tile must also show what the canary decided,
    // and the API must say the same.
    const verdict = page.locator('.tile[data-service="checkout"] .verdict.bad');
    await verdict.waitFor({ timeout: 30000 });
    assert.match(await verdict.textContent(), /canary v42 vs v41: bad · (error_ratio|p50|p99) /);
    const deploys = (await (await fetch(new URL("/api/v1/deploys", url))).json()).deploys;
    const checkout = deploys.find((d) => d.service === "checkout");
    assert.deepEqual([checkout.candidate, checkout.baseline, checkout.state], ["v42", "v41", "bad"]);
    const alert = page.locator('#alert-list .alert.firing[data-service="checkout"]').first();
    await alert.waitFor({ timeout: 30000 });
    const id = await alert.getAttribute("data-alert-id");
    assert.match(await alert.textContent(), /detected after \d+ ms/);
    await page.screenshot({ path: path.join(artifacts, "dashboard-bad-deploy.png") });

    // Acknowledge from the page; the API agrees.
    await page.locator(`#alert-list .alert[data-alert-id="${id}"] button.ack`).click();
    const acked = await eventually("the acknowledgement", 10000, async () => {
      const body = await (await fetch(new URL("/api/v1/alerts", url))).json();
      return body.alerts.find((a) => a.id === id && a.state === "acknowledged");
    });
    assert.equal(acked.acknowledged_by, "dashboard");
    await page.waitForSelector(`#alert-list .alert.acknowledged[data-alert-id="${id}"]`, { timeout: 5000 });

    // The service view: charts from backfill, then live.
    await page.click('.tile[data-service="checkout"]');
    await page.waitForSelector("#charts .chart canvas", { timeout: 10000 });
    await page.selectOption("#split", "version");
    await page.waitForFunction(() => {
      const text = document.querySelector("#charts").textContent;
      return document.querySelectorAll("#charts .chart").length >= 3 && text.includes("v41") && text.includes("v42");
    }, null, { timeout: 10000 });
    await page.hover("#charts .chart canvas");
    assert.match(await page.textContent("#tooltip"), /v42/);
    await page.screenshot({ path: path.join(artifacts, "dashboard-service-view.png") });

    assert.deepEqual(errors, [], "no console errors");
  } finally {
    if (browser) await browser.close();
    await stop(demo);
  }
});

test("over HTTPS with tokens the dashboard asks for one, says when it is wrong, and a read token cannot change anything", { timeout: 120000 }, async () => {
  fs.mkdirSync(artifacts, { recursive: true });
  // A throwaway certificate for 127.0.0.1 (the browser is told to accept it).
  const tlsDir = fs.mkdtempSync(path.join(require("node:os").tmpdir(), "strobe-e2e-tls-"));
  const [cert, key] = [path.join(tlsDir, "cert.pem"), path.join(tlsDir, "key.pem")];
  require("node:child_process").execFileSync("openssl", [
    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
  ], { stdio: "ignore" });
  const aggregator = spawn(bin, [
    "aggregator", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
    "--read-token", "viewer:read-secret", "--admin-token", "ops:admin-secret",
    "--tls-cert", cert, "--tls-key", key,
  ], { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, STROBE_LOG: "warn" } });
  const url = await new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: aggregator.stdout });
    lines.on("line", (line) => {
      const m = line.match(/http=(\S+)/);
      if (m) resolve(`https://${m[1]}/`);
    });
    aggregator.on("exit", (code) => reject(new Error(`strobe aggregator exited with ${code}`)));
    setTimeout(() => reject(new Error("strobe aggregator did not print its addresses")), 30000);
  });
  let browser;
  try {
    browser = await chromium.launch({ executablePath: chromiumPath, args: [...CHROMIUM_FLAGS, "--ignore-certificate-errors"] });
    const page = await browser.newPage({ viewport: { width: 1200, height: 600 }, ignoreHTTPSErrors: true });
    // Without a token the API refuses (over HTTPS); the page's own files do not.
    assert.equal(await page.request.get(new URL("/api/v1/alerts", url).href).then((r) => r.status()), 401);
    await page.goto(url);
    await page.waitForSelector("#token-form:not([hidden])", { timeout: 10000 });
    assert.match(await page.textContent("#token-message"), /needs a token/);

    await page.fill("#token-input", "not-the-token");
    await page.click("#token-form button[type=submit]");
    await page.waitForFunction(() => /not accepted/.test(document.querySelector("#token-message").textContent)
      && !document.querySelector("#token-form").hidden, null, { timeout: 10000 });
    await page.screenshot({ path: path.join(artifacts, "dashboard-token-refused.png") });

    await page.fill("#token-input", "read-secret");
    await page.click("#token-form button[type=submit]");
    // The websocket (WSS) opens with the token as a subprotocol value: the page goes live.
    await page.waitForFunction(() => /live/.test(document.querySelector("#conn").textContent), null, { timeout: 10000 });
    assert.equal(await page.isHidden("#token-form"), true);

    // A read token may not change rules or acknowledge, even from the page itself.
    const statuses = await page.evaluate(async () => {
      const auth = { authorization: "Bearer " + sessionStorage.getItem("strobe-token") };
      const put = await fetch("/api/v1/rules", { method: "PUT", headers: { ...auth, "content-type": "application/toml" }, body: "" });
      const ack = await fetch("/api/v1/alerts/x/ack", { method: "POST", headers: { ...auth, "content-type": "application/json" }, body: "{}" });
      const read = await fetch("/api/v1/alerts", { headers: auth });
      return [put.status, ack.status, read.status];
    });
    assert.deepEqual(statuses, [403, 403, 200]);
    assert.equal(new URL(page.url()).protocol, "https:");
  } finally {
    if (browser) await browser.close();
    await stop(aggregator);
    fs.rmSync(tlsDir, { recursive: true, force: true });
  }
});

// Measures how smoothly the dashboard draws under load (not a test: prints numbers). Usage:
//   node frame-time.js http://127.0.0.1:7080/ 20
// Opens the page in headless Chromium for N seconds and reports animation-frame intervals and long tasks.
"use strict";

const { chromium } = require("playwright-core");

(async () => {
  const url = process.argv[2] || "http://127.0.0.1:7080/";
  const seconds = Number(process.argv[3] || 20);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(url);
  await page.waitForTimeout(5000); // backfill and first layout
  const result = await page.evaluate((ms) => new Promise((resolve) => {
    const intervals = [];
    const longTasks = [];
    new PerformanceObserver((list) => { for (const e of list.getEntries()) longTasks.push(e.duration); })
      .observe({ type: "longtask", buffered: false });
    let last = performance.now();
    const end = last + ms;
    function frame(now) {
      intervals.push(now - last);
      last = now;
      if (now < end) requestAnimationFrame(frame);
      else resolve({ intervals, longTasks, tiles: document.querySelectorAll(".tile").length });
    }
    requestAnimationFrame(frame);
  }), seconds * 1000);
  const sorted = [...result.intervals].sort((a, b) => a - b);
  const q = (p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))].toFixed(1);
  console.log(`tiles=${result.tiles} frames=${sorted.length} in ${seconds}s; frame interval p50=${q(0.5)} ms ` +
    `p99=${q(0.99)} ms max=${sorted[sorted.length - 1].toFixed(1)} ms; long tasks=${result.longTasks.length} ` +
    `(longest ${Math.max(0, ...result.longTasks).toFixed(0)} ms)`);
  await browser.close();
})();

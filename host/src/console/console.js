// Live request rates: polls the totals every 2 s and shows each route's
// requests per second since the previous poll. Everything else on the page
// is plain HTML and forms, and works without this script.
"use strict";
(function () {
  let previous = null;
  async function poll() {
    try {
      const reply = await fetch("/console/rates", { credentials: "same-origin" });
      if (!reply.ok) return;
      const now = await reply.json();
      for (const [key, total] of Object.entries(now.totals)) {
        const totalCell = document.querySelector(`[data-total="${CSS.escape(key)}"]`);
        if (totalCell) totalCell.textContent = total;
        const rateCell = document.querySelector(`[data-rate="${CSS.escape(key)}"]`);
        if (rateCell && previous && key in previous.totals) {
          const seconds = (now.at - previous.at) / 1000;
          const rate = seconds > 0 ? (total - previous.totals[key]) / seconds : 0;
          rateCell.textContent = rate.toFixed(1);
        }
      }
      previous = now;
    } catch (_) {
      // The host restarting: the next poll tries again.
    }
  }
  if (document.getElementById("rates")) {
    poll();
    setInterval(poll, 2000);
  }
})();

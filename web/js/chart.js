// The daily usage chart: an inline SVG bar chart (no library), one bar per UTC day of the cycle,
// with a table of the same figures for screen readers and for anyone who prefers numbers.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

/** A round top for the y axis: 1, 2, 5 x 10^n at or above `value`. */
function niceMax(value) {
  if (value <= 10) return 10;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((step) => step * power).find((top) => top >= value);
}

function shortDay(date) {
  return new Date(`${date}T00:00:00Z`).toLocaleDateString(undefined, { day: "numeric", month: "short", timeZone: "UTC" });
}

/** Draw `days` ([{date, minutes}], minutes null: a day still to come) into `container`;
 * `today` (YYYY-MM-DD) is highlighted. */
export function drawDailyUsage(container, days, today) {
  if (!container.dataset.redraws) {
    // Drawn at the box's own width so labels stay legible on a phone; again when it changes.
    container.dataset.redraws = "true";
    let timer = null;
    window.addEventListener("resize", () => {
      clearTimeout(timer);
      timer = setTimeout(() => container.lastDraw && drawDailyUsage(container, ...container.lastDraw), 150);
    });
  }
  container.lastDraw = [days, today];
  container.replaceChildren();
  if (!days.length) {
    container.append(Object.assign(document.createElement("p"), { className: "muted", textContent: "No usage yet in this cycle." }));
    return;
  }
  const width = Math.max(280, Math.min(960, Math.round(container.clientWidth || 640)));
  const height = width < 480 ? 180 : 220;
  const pad = { left: 44, right: 8, top: 12, bottom: 28 };
  const top = niceMax(Math.max(0, ...days.map((d) => d.minutes || 0)));
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const slot = plotW / days.length;
  const total = days.reduce((sum, d) => sum + (d.minutes || 0), 0);
  const sofar = days.filter((d) => d.minutes !== null).length;

  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-labelledby": "chart-title",
    class: "chart",
    preserveAspectRatio: "xMidYMid meet",
  });
  chart.append(svg("title", { id: "chart-title" }, `Minutes used per day: ${total} minutes over the ${sofar} days so far`));
  for (const fraction of [0, 0.5, 1]) {
    const y = pad.top + plotH * (1 - fraction);
    chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    chart.append(svg("text", { x: pad.left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, String(Math.round(top * fraction))));
  }
  const labelEvery = Math.ceil(days.length / Math.max(3, Math.floor(plotW / 64)));
  days.forEach((d, i) => {
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: (pad.left + i * slot + slot / 2).toFixed(1), y: height - 8, "text-anchor": "middle", class: "axis" }, shortDay(d.date)));
    }
    if (d.minutes === null) return;
    const h = (d.minutes / top) * plotH;
    const x = pad.left + i * slot + slot * 0.15;
    const bar = svg("rect", {
      x: x.toFixed(1),
      y: (pad.top + plotH - h).toFixed(1),
      width: Math.max(slot * 0.7, 1).toFixed(1),
      height: h.toFixed(1),
      class: d.date === today ? "bar today" : "bar",
      "data-date": d.date,
      "data-minutes": d.minutes,
    });
    bar.append(svg("title", {}, `${shortDay(d.date)}: ${d.minutes} min`));
    chart.append(bar);
  });
  container.append(chart);

  const rows = days
    .filter((d) => d.minutes > 0)
    .map((d) => `<tr><th scope="row">${shortDay(d.date)}</th><td>${d.minutes}</td></tr>`)
    .join("");
  const details = document.createElement("details");
  details.innerHTML =
    `<summary>Show the figures</summary><table class="compact"><thead><tr><th scope="col">Day</th><th scope="col">Minutes</th></tr></thead>` +
    `<tbody>${rows || '<tr><td colspan="2">No usage yet.</td></tr>'}</tbody></table>`;
  container.append(details);
}

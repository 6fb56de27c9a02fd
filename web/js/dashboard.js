// The billing dashboard: plan and status, this cycle's minutes and overage, a daily chart, the
// usage banner (80, 100, 120 percent), invoices, the scheduled change and the billing portal.

import { callFunction, loadOverview, withOrganisation } from "./api.js";
import { drawDailyUsage } from "./chart.js";
import { clearError, day, el, isLive, money, periodName, renderAccount, showError, showStatus, statusText, withBusy } from "./ui.js";

const THRESHOLDS = [120, 100, 80];

/** The highest threshold reached: from the cycle's figures, or the alerts recorded for it. */
function reachedThreshold(cycle, alerts) {
  const recorded = (alerts || []).map((alert) => alert.threshold_percent);
  const percent = cycle.included_minutes > 0 ? (cycle.minutes_used / cycle.included_minutes) * 100 : 0;
  return THRESHOLDS.find((t) => percent >= t || recorded.includes(t)) || null;
}

function renderBanner(overview) {
  const banner = document.getElementById("usage-banner");
  const cycle = overview.cycle;
  const threshold = cycle && isLive(overview.subscription) ? reachedThreshold(cycle, overview.alerts) : null;
  banner.hidden = !threshold;
  if (!threshold) return;
  const used = `${cycle.minutes_used.toLocaleString()} of ${cycle.included_minutes.toLocaleString()} included minutes`;
  const rate = overview.subscription.plan ? money(overview.subscription.plan.overage_rate_cents, cycle.currency) : null;
  const text = {
    80: `80% of your included minutes used (${used}). Past 100%, each minute costs ${rate || "the overage rate"}.`,
    100: `100% of your included minutes used (${used}): further minutes are billed at ${rate || "the overage rate"} each.`,
    120: `120% of your included minutes used (${used}): ${cycle.overage_minutes.toLocaleString()} overage minutes so far, ${money(cycle.overage_cost_cents, cycle.currency)}.`,
  }[threshold];
  banner.dataset.threshold = threshold;
  banner.className = `banner level-${threshold}`;
  banner.replaceChildren(el("strong", {}, "Usage: "), text, " ", el("a", { href: "index.html" }, "Compare plans"));
}

function renderPlan(overview) {
  const box = document.getElementById("plan");
  const sub = overview.subscription;
  const canManage = ["owner", "admin"].includes(overview.organisation.role);
  document.getElementById("org-name").textContent = overview.organisation.name;
  if (!sub) {
    box.replaceChildren(el("p", {}, "No plan yet. ", el("a", { href: "index.html" }, "Choose a plan")));
    return;
  }
  const plan = sub.plan || { name: "Unknown plan" };
  const parts = [
    el("p", { class: "plan-name" }, el("strong", { id: "plan-name" }, plan.name), ` (${periodName(sub.billing_period)})`),
    el("p", {}, "Status: ", el("strong", { id: "plan-status", "data-status": sub.status }, statusText(sub.status))),
  ];
  if (sub.status === "past_due" || sub.status === "unpaid") {
    parts.push(el("p", { class: "warning" }, "The last payment failed. Update your card in Manage billing to keep your plan."));
  }
  if (isLive(sub)) {
    parts.push(
      el(
        "p",
        { id: "renewal" },
        sub.cancel_at_period_end ? `Ends on ${day(sub.current_period_end)} (canceled at period end).` : `Renews on ${day(sub.current_period_end)}.`,
      ),
    );
  } else {
    parts.push(el("p", {}, el("a", { href: "index.html" }, "Choose a plan"), " to subscribe again."));
  }
  if (sub.pending) {
    const pendingPlan = (sub.pending.plan && sub.pending.plan.name) || "another plan";
    parts.push(
      el(
        "div",
        { class: "pending", id: "pending-change" },
        el("p", {}, `Scheduled change: ${pendingPlan} (${periodName(sub.pending.billing_period)}) from ${day(sub.pending.effective_at)}.`),
        el("button", { type: "button", class: "secondary", disabled: !canManage, onclick: (e) => cancelPending(e.currentTarget) }, "Cancel scheduled change"),
      ),
    );
  }
  const actions = el("p", { class: "actions" });
  if (isLive(sub)) actions.append(el("a", { href: "index.html", class: "button secondary" }, "Change plan"));
  actions.append(el("button", { type: "button", id: "manage-billing", disabled: !canManage, onclick: (e) => openPortal(e.currentTarget) }, "Manage billing"));
  parts.push(actions);
  if (!canManage) parts.push(el("p", { class: "muted" }, "Only owners and admins can change the plan or open billing."));
  box.replaceChildren(...parts);
}

function figure(label, value, attributes) {
  return el("div", { class: "figure" }, el("dt", {}, label), el("dd", attributes, value));
}

function renderCycle(overview) {
  const box = document.getElementById("cycle");
  const cycle = overview.cycle;
  const chart = document.getElementById("chart");
  if (!cycle || !cycle.period_start) {
    box.replaceChildren(el("p", { class: "muted" }, "No billing cycle yet: usage shows here once you have a plan."));
    chart.replaceChildren(el("p", { class: "muted" }, "No usage yet."));
    return;
  }
  const percent = cycle.included_minutes > 0 ? Math.round((cycle.minutes_used / cycle.included_minutes) * 100) : 0;
  box.replaceChildren(
    el("p", { class: "period" }, `${day(cycle.period_start)} to ${day(cycle.period_end)}`),
    el(
      "dl",
      { class: "figures" },
      figure("Included", `${cycle.included_minutes.toLocaleString()} min`, { id: "included-minutes", "data-minutes": cycle.included_minutes }),
      figure("Used", `${cycle.minutes_used.toLocaleString()} min`, { id: "used-minutes", "data-minutes": cycle.minutes_used }),
      figure("Overage", `${cycle.overage_minutes.toLocaleString()} min`, { id: "overage-minutes", "data-minutes": cycle.overage_minutes }),
      figure("Overage cost so far", money(cycle.overage_cost_cents, cycle.currency), { id: "overage-cost", "data-cents": cycle.overage_cost_cents }),
    ),
    el(
      "div",
      { class: "meter", role: "progressbar", "aria-label": "Included minutes used", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.min(percent, 100), "aria-valuetext": `${percent}%` },
      el("span", { style: `width: ${Math.min(percent, 100)}%`, class: percent >= 100 ? "over" : percent >= 80 ? "near" : "" }),
    ),
    el("p", { class: "muted" }, `${percent}% of the included minutes used.`),
  );
  const today = new Date().toISOString().slice(0, 10);
  const days = overview.daily_usage || [];
  drawDailyUsage(chart, wholePeriod(days, cycle), today);
  const earlier = days.reduce((sum, d) => sum + d.minutes, 0) - cycle.minutes_used;
  if (earlier > 0) {
    // A plan change this period: its earlier part was billed at the change, under the old plan.
    chart.append(
      el("p", { class: "muted", id: "chart-note" }, `The chart covers the whole period: ${earlier.toLocaleString()} of its minutes came before your last plan change and were billed with it (see Invoices).`),
    );
  }
}

/** The days so far, then the rest of the period as empty slots: the chart spans the cycle. */
function wholePeriod(days, cycle) {
  const all = [...days];
  const dayMs = 86400000;
  const end = new Date(cycle.period_end).getTime();
  let next = all.length ? Date.parse(`${all[all.length - 1].date}T00:00:00Z`) + dayMs : Date.parse(cycle.period_start.slice(0, 10));
  while (next < end && all.length < 400) {
    all.push({ date: new Date(next).toISOString().slice(0, 10), minutes: null });
    next += dayMs;
  }
  return all;
}

const INVOICE_STATUS = { paid: "Paid", open: "Due", void: "Void", uncollectible: "Uncollectible", draft: "Draft" };

function renderInvoices(overview) {
  const box = document.getElementById("invoices");
  const invoices = overview.invoices || [];
  if (!invoices.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No invoices yet."));
    return;
  }
  const rows = invoices.map((invoice) =>
    el(
      "tr",
      { "data-invoice-id": invoice.id },
      el("th", { scope: "row" }, invoice.number || invoice.id),
      el("td", {}, day(invoice.created)),
      el("td", {}, INVOICE_STATUS[invoice.status] || invoice.status),
      el("td", { class: "amount", "data-cents": invoice.total }, money(invoice.total, invoice.currency)),
      el(
        "td",
        {},
        invoice.hosted_invoice_url ? el("a", { href: invoice.hosted_invoice_url, target: "_blank", rel: "noopener" }, "View", el("span", { class: "visually-hidden" }, ` invoice ${invoice.number || ""}`)) : "",
        invoice.invoice_pdf ? [" ", el("a", { href: invoice.invoice_pdf, target: "_blank", rel: "noopener" }, "PDF")] : "",
      ),
    ),
  );
  box.replaceChildren(
    el(
      "div",
      { class: "table-scroll" },
      el(
        "table",
        {},
        el("caption", { class: "visually-hidden" }, "Invoices, newest first"),
        el("thead", {}, el("tr", {}, ...["Number", "Date", "Status", "Total", "Links"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows),
      ),
    ),
  );
}

function render(overview) {
  renderBanner(overview);
  renderPlan(overview);
  renderCycle(overview);
  renderInvoices(overview);
}

async function refresh() {
  const overview = await loadOverview();
  render(overview);
  return overview;
}

async function cancelPending(button) {
  await withBusy(button, async () => {
    const answer = await callFunction("change-plan", { body: withOrganisation({ cancel_pending: true }) });
    await refresh();
    showStatus(`Scheduled change canceled: you stay on your current plan (${answer.billing_period}).`);
    document.getElementById("manage-billing")?.focus();
  });
}

async function openPortal(button) {
  await withBusy(button, async () => {
    showStatus("Opening the billing portal…");
    const answer = await callFunction("create-portal-session", { body: withOrganisation({ return_path: "/dashboard.html" }) });
    window.location.assign(answer.portal_url);
  });
}

/** After Checkout: the webhook may land a moment after the customer does; look a few times. */
async function waitForSubscription(overview) {
  showStatus("Payment received. Setting up your plan…");
  for (let attempt = 0; attempt < 10 && !isLive(overview.subscription); attempt++) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    overview = await refresh();
  }
  showStatus(isLive(overview.subscription) ? `Welcome to ${overview.subscription.plan.name}.` : "Your payment is being processed: reload in a minute.");
  // A reload is then an ordinary visit, not another arrival from Checkout.
  const url = new URL(window.location.href);
  url.searchParams.delete("checkout");
  url.searchParams.delete("session_id");
  window.history.replaceState(null, "", url);
}

async function main() {
  if (!(await renderAccount())) return;
  let overview;
  try {
    overview = await refresh();
  } catch (error) {
    showError(error.message);
    return;
  }
  clearError();
  if (new URLSearchParams(window.location.search).get("checkout") === "success") await waitForSubscription(overview);
  document.body.dataset.ready = "true";
}

main().catch((error) => showError(error.message || String(error)));

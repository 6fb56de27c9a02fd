// The pricing page: the plans on sale as cards, monthly or yearly. "Buy" opens Stripe Checkout
// (create-checkout-session); an organisation with a subscription gets "Switch" (change-plan).

import { callFunction, loadOverview, withOrganisation } from "./api.js";
import { clearError, day, el, isLive, money, periodName, renderAccount, showError, showStatus, withBusy } from "./ui.js";

let overview = null;

function selectedPeriod() {
  return document.querySelector('input[name="period"]:checked').value;
}

function yearlySaving(plan) {
  if (plan.yearly_price_cents == null) return null;
  const cents = plan.monthly_price_cents * 12 - plan.yearly_price_cents;
  return cents > 0 ? { cents, percent: Math.round((cents / (plan.monthly_price_cents * 12)) * 100) } : null;
}

function canManage() {
  return ["owner", "admin"].includes(overview.organisation && overview.organisation.role);
}

function planCard(plan, period) {
  const subscription = overview.subscription;
  const subscribed = isLive(subscription);
  const yearly = period === "yearly";
  const price = yearly ? plan.yearly_price_cents : plan.monthly_price_cents;
  const saving = yearlySaving(plan);
  const current = subscribed && subscription.plan && subscription.plan.id === plan.id;
  const currentHere = current && subscription.billing_period === period;
  const pending = subscribed && subscription.pending;
  const pendingHere = pending && pending.plan && pending.plan.id === plan.id && pending.billing_period === period;

  let button;
  if (yearly && price == null) {
    button = el("button", { type: "button", disabled: true }, "No yearly price");
  } else if (currentHere) {
    button = el("button", { type: "button", disabled: true, class: "current" }, "Your current plan");
  } else if (subscribed) {
    button = el(
      "button",
      { type: "button", class: "switch", "data-plan-id": plan.id, disabled: !canManage(), onclick: (e) => switchPlan(e.currentTarget, plan, period) },
      `Switch to ${plan.name}`,
    );
  } else {
    button = el(
      "button",
      { type: "button", class: "buy", "data-plan-id": plan.id, disabled: !canManage(), onclick: (e) => buy(e.currentTarget, plan, period) },
      `Buy ${plan.name}`,
    );
  }
  return el(
    "li",
    { class: `plan${current ? " is-current" : ""}`, "data-plan-id": plan.id, "aria-labelledby": `plan-${plan.id}` },
    el("h2", { id: `plan-${plan.id}` }, plan.name),
    current ? el("p", { class: "tag" }, `Current plan (${periodName(subscription.billing_period)})`) : null,
    pendingHere ? el("p", { class: "tag pending" }, `Starts ${day(pending.effective_at)}`) : null,
    el(
      "p",
      { class: "price" },
      price == null ? "-" : el("span", { class: "amount", "data-cents": price }, money(price, plan.currency)),
      el("span", { class: "per" }, yearly ? " a year" : " a month"),
    ),
    yearly && saving
      ? el("p", { class: "saving" }, `Save ${money(saving.cents, plan.currency)} a year (${saving.percent}%)`)
      : el("p", { class: "saving muted" }, saving ? `or ${money(plan.yearly_price_cents, plan.currency)} a year` : ""),
    el(
      "ul",
      { class: "features" },
      el("li", {}, `${plan.included_minutes.toLocaleString()} call minutes included each month`),
      el("li", {}, `then ${money(plan.overage_rate_cents, plan.currency)} a minute`),
    ),
    button,
  );
}

function render() {
  const period = selectedPeriod();
  const plans = overview.plans || [];
  const best = Math.max(0, ...plans.map((plan) => (yearlySaving(plan) || { percent: 0 }).percent));
  document.getElementById("yearly-saving").textContent = best ? `save up to ${best}%` : "";
  const list = document.getElementById("plans");
  list.replaceChildren(...plans.map((plan) => planCard(plan, period)));
  if (!plans.length) list.replaceChildren(el("li", { class: "empty" }, "No plans are on sale right now."));
  const note = document.getElementById("role-note");
  note.hidden = canManage();
}

async function buy(button, plan, period) {
  await withBusy(button, async () => {
    showStatus(`Opening checkout for ${plan.name} (${period})…`);
    const answer = await callFunction(
      "create-checkout-session",
      {
        body: withOrganisation({
          plan_id: plan.id,
          billing_period: period,
          success_path: "/dashboard.html?checkout=success&session_id={CHECKOUT_SESSION_ID}",
          cancel_path: "/index.html?checkout=canceled",
        }),
      },
    );
    window.location.assign(answer.checkout_url);
  });
}

async function switchPlan(button, plan, period) {
  await withBusy(button, async () => {
    showStatus(`Switching to ${plan.name} (${period})…`);
    const answer = await callFunction("change-plan", { body: withOrganisation({ plan_id: plan.id, billing_period: period }) });
    overview = await loadOverview();
    render();
    showStatus(
      answer.effective === "now"
        ? `You are on ${plan.name} (${period}) now. The difference for the rest of this period was charged.`
        : `Your plan changes to ${plan.name} (${period}) on ${day(answer.effective_at)}, at the end of the paid period.`,
    );
    document.getElementById("status").focus();
  });
}

async function main() {
  const params = new URLSearchParams(window.location.search);
  if (params.get("checkout") === "canceled") showStatus("Checkout canceled: nothing was charged.");
  for (const input of document.querySelectorAll('input[name="period"]')) input.addEventListener("change", () => overview && render());
  if (!(await renderAccount())) return;
  try {
    overview = await loadOverview();
  } catch (error) {
    showError(error.message);
    return;
  }
  clearError();
  if (isLive(overview.subscription)) {
    document.getElementById(`period-${overview.subscription.billing_period}`).checked = true;
  }
  render();
  document.body.dataset.ready = "true";
}

main().catch((error) => showError(error.message || String(error)));

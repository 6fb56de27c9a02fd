// Small helpers both pages share: formatting money and dates, messages, busy buttons, sign-in.

import { canSignIn, currentSession, signIn, signOut } from "./api.js";

export const LIVE_STATUSES = ["active", "trialing", "past_due", "unpaid", "incomplete"];

export function money(cents, currency) {
  return new Intl.NumberFormat(undefined, { style: "currency", currency: (currency || "eur").toUpperCase() }).format(
    cents / 100,
  );
}

/** A date in UTC (billing periods are UTC), e.g. "30 Nov 2026". */
export function day(value) {
  if (!value) return "-";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toLocaleDateString(undefined, { day: "numeric", month: "short", year: "numeric", timeZone: "UTC" });
}

export function periodName(period) {
  return period === "yearly" ? "yearly" : "monthly";
}

export function isLive(subscription) {
  return Boolean(subscription) && LIVE_STATUSES.includes(subscription.status);
}

const STATUS_TEXT = {
  active: "Active",
  trialing: "Trial",
  past_due: "Payment overdue",
  unpaid: "Unpaid",
  incomplete: "Waiting for the first payment",
  incomplete_expired: "Expired before the first payment",
  canceled: "Canceled",
  paused: "Paused",
};

export function statusText(status) {
  return STATUS_TEXT[status] || status;
}

/** Build an element: el("p", {class: "x"}, "text", child). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

/** The page's one error region (role=alert) and one status region (role=status). */
export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
  clearStatus();
}

export function clearError() {
  const box = document.getElementById("error");
  box.hidden = true;
  box.textContent = "";
}

export function showStatus(message) {
  const box = document.getElementById("status");
  box.textContent = message;
  box.hidden = !message;
}

export function clearStatus() {
  showStatus("");
}

/** Run `action` with `button` disabled and marked busy; errors go to the error region. */
export async function withBusy(button, action) {
  clearError();
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await action();
  } catch (error) {
    showError(error.message || String(error));
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** The header's "signed in as" line and, in production, the sign-in form when nobody is. */
export async function renderAccount() {
  const who = document.getElementById("who");
  const session = await currentSession();
  if (session) {
    const email = (session.user && session.user.email) || "signed in";
    who.replaceChildren(`Signed in as ${email}`);
    if (canSignIn()) {
      who.append(" ", el("button", { type: "button", class: "link", onclick: () => signOut().then(() => location.reload()) }, "Sign out"));
    }
    return true;
  }
  who.replaceChildren("Not signed in");
  const form = document.getElementById("sign-in");
  if (form && canSignIn()) {
    form.hidden = false;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      await withBusy(form.querySelector("button"), async () => {
        await signIn(data.get("email"), data.get("password"));
        location.reload();
      });
    });
  }
  return false;
}

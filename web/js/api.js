// Talking to the billing functions as the signed-in user. Every failure becomes an ApiError
// whose message is for a person: the function's own {"error": {"message"}}, or what went wrong
// on the way (no network, an answer that is not JSON).

const config = window.BILLING_CONFIG || {};

export class ApiError extends Error {
  constructor(message, { code = "error", status = 0 } = {}) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

/** The organisation the pages are about: ?organisation_id=, else config, else the user's only one. */
export function organisationId() {
  return new URLSearchParams(window.location.search).get("organisation_id") || config.organisationId || null;
}

export function functionUrl(name) {
  const own = config.functions && config.functions[name];
  if (own) return own;
  if (!config.functionsBaseUrl) {
    throw new ApiError(`The pages are not configured: config.js has no URL for ${name}.`, { code: "not_configured" });
  }
  return `${config.functionsBaseUrl.replace(/\/+$/, "")}/${name}`;
}

let supabase = null;

/** supabase-js, loaded on first use (production only: the local run injects a session). */
async function supabaseClient() {
  if (!config.supabaseUrl || !config.supabaseAnonKey) return null;
  if (!supabase) {
    const url = config.supabaseJsUrl || "https://cdn.jsdelivr.net/npm/@supabase/supabase-js@2/+esm";
    try {
      const loaded = await import(url);
      // The ES module build exports createClient; the UMD file (dist/umd) sets window.supabase.
      const createClient = loaded.createClient || (window.supabase && window.supabase.createClient);
      supabase = createClient(config.supabaseUrl, config.supabaseAnonKey);
    } catch {
      throw new ApiError("Could not load the sign-in library (supabase-js). Check your connection and reload.", {
        code: "network_error",
      });
    }
  }
  return supabase;
}

/** The signed-in user's session ({access_token, user}), or null when nobody is signed in. */
export async function currentSession() {
  if (config.localSession) return config.localSession;
  const client = await supabaseClient();
  if (!client) return null;
  const { data } = await client.auth.getSession();
  return data.session;
}

export function canSignIn() {
  return !config.localSession && Boolean(config.supabaseUrl);
}

export async function signIn(email, password) {
  const client = await supabaseClient();
  if (!client) throw new ApiError("Sign-in is not configured (supabaseUrl in config.js).", { code: "not_configured" });
  const { error } = await client.auth.signInWithPassword({ email, password });
  if (error) throw new ApiError(error.message, { code: "sign_in_failed", status: error.status || 0 });
}

export async function signOut() {
  const client = await supabaseClient();
  if (client) await client.auth.signOut();
}

/**
 * Call a billing function: POST with a JSON body, or GET with a query. Answers the parsed JSON
 * of a 2xx; throws ApiError otherwise.
 */
export async function callFunction(name, { method = "POST", body = null, query = null } = {}) {
  const session = await currentSession();
  if (!session) throw new ApiError("Sign in to see your billing.", { code: "not_signed_in", status: 401 });
  let url = functionUrl(name);
  if (query) {
    const params = new URLSearchParams(Object.entries(query).filter(([, value]) => value != null));
    if ([...params].length) url += `${url.includes("?") ? "&" : "?"}${params}`;
  }
  const headers = { Authorization: `Bearer ${session.access_token}` };
  if (body !== null) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === null ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError("Could not reach the billing service. Check your connection and try again.", {
      code: "network_error",
    });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && data.error;
    const message =
      (error && error.message) ||
      `The billing service answered ${response.status} without saying why. Try again in a moment.`;
    throw new ApiError(message, { code: (error && error.code) || `http_${response.status}`, status: response.status });
  }
  if (data === null) {
    throw new ApiError("The billing service sent an answer that could not be read. Try again in a moment.", {
      code: "bad_answer",
      status: response.status,
    });
  }
  return data;
}

/** GET billing-overview: everything both pages show, in one read. */
export function loadOverview() {
  return callFunction("billing-overview", { method: "GET", query: { organisation_id: organisationId() } });
}

/** POST body with the organisation when the page names one. */
export function withOrganisation(body) {
  const id = organisationId();
  return id ? { ...body, organisation_id: id } : body;
}

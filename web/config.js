// Configuration of the billing pages (README, "The billing pages"). Fill it in for production;
// `./deploy.sh local` serves a generated config.js of its own instead (with the demo owner
// signed in), so this file holds no secret: only public URLs and the anon key.
window.BILLING_CONFIG = {
  // Where the functions are: one base URL to which each function's name is appended
  // (Cloud Run functions: https://REGION-PROJECT.cloudfunctions.net), and/or one URL per
  // function in `functions`, which wins, e.g. {"change-plan": "https://.../change-plan"}.
  functionsBaseUrl: "https://europe-west1-YOUR-GCP-PROJECT.cloudfunctions.net",
  functions: {},
  // The Supabase project (Settings > API): supabase-js signs the user in with these.
  supabaseUrl: "https://YOUR-PROJECT-REF.supabase.co",
  supabaseAnonKey: "YOUR-SUPABASE-ANON-KEY",
  // supabase-js v2 as an ES module: this CDN, or a copy served beside the pages.
  supabaseJsUrl: "https://cdn.jsdelivr.net/npm/@supabase/supabase-js@2/+esm",
  // For users in several organisations: which one (else ?organisation_id= in the page URL).
  organisationId: null,
};

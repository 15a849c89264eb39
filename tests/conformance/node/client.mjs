// A real Node Azure SDK client (@azure/identity), run as a subprocess by the conformance suite
// (tests/conformance/test_clients.py). Same interface as ../clients/py_client.py:
//
//   node client.mjs CLIENT STEPS_JSON
//     CLIENT: mic (ManagedIdentityCredential) or dac (DefaultAzureCredential)
//     STEPS_JSON: [{"resource": "...", "client_id": null|"...", "until_ok_secs": null|N}]
//
// The SDK picks the protocol from the environment as in a pod (IDENTITY_ENDPOINT +
// IDENTITY_HEADER → App Service; else IMDS at AZURE_POD_IDENTITY_AUTHORITY_HOST or
// http://169.254.169.254). Each step builds a new credential; for dac the client id goes
// through AZURE_CLIENT_ID. Prints ONE JSON line {"results": [...]}; never prints a token.

import { DefaultAzureCredential, ManagedIdentityCredential } from "@azure/identity";

const scopeOf = (resource) => resource.replace(/\/+$/, "") + "/.default";

function credential(kind, step) {
  if (kind === "mic") {
    return step.client_id
      ? new ManagedIdentityCredential({ clientId: step.client_id })
      : new ManagedIdentityCredential();
  }
  if (kind === "dac") {
    if (step.client_id) process.env.AZURE_CLIENT_ID = step.client_id;
    else delete process.env.AZURE_CLIENT_ID;
    return new DefaultAzureCredential();
  }
  throw new Error(`unknown client ${kind}`);
}

async function runStep(kind, step) {
  const started = Date.now();
  const deadline = started + 1000 * (step.until_ok_secs || 0);
  const errors = [];
  let attempts = 0;
  for (;;) {
    attempts += 1;
    try {
      const token = await credential(kind, step).getToken(scopeOf(step.resource));
      return {
        ok: true,
        expires_on: Math.floor(token.expiresOnTimestamp / 1000),
        token_len: token.token.length,
        attempts,
        errors,
        elapsed_ms: Date.now() - started,
      };
    } catch (e) {
      errors.push(`${e.name}: ${e.message}`.slice(0, 2000));
      if (Date.now() >= deadline) {
        return {
          ok: false,
          error: errors[errors.length - 1],
          error_type: e.name,
          attempts,
          errors,
          elapsed_ms: Date.now() - started,
        };
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

const [kind, stepsJson] = process.argv.slice(2);
const results = [];
for (const step of JSON.parse(stepsJson)) {
  results.push(await runStep(kind, step));
}
console.log(JSON.stringify({ results }));

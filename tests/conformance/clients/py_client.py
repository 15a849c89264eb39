"""A real Python Azure SDK client, run as a subprocess by the conformance suite.

The SDK picks the managed-identity protocol from the environment, exactly as in a pod:
IDENTITY_ENDPOINT + IDENTITY_HEADER select App Service; otherwise IMDS at
AZURE_POD_IDENTITY_AUTHORITY_HOST (or the real http://169.254.169.254 when unset, which is what
transparent mode serves).

Usage: py_client.py CLIENT STEPS_JSON
  CLIENT: mic (azure.identity.ManagedIdentityCredential), dac (DefaultAzureCredential),
          msal (msal.ManagedIdentityClient with a requests.Session, as MSAL documents it).
  STEPS_JSON: a list of {"resource": str, "client_id": str|null, "until_ok_secs": float|null}.
          Each step builds a NEW credential (nothing cached between steps). For dac the client id
          goes through AZURE_CLIENT_ID, as a pod would set it. until_ok_secs: call again until a
          token comes back or the time is up (what an application's own loop does; used for
          MSAL, which has no retry of its own).

Prints ONE JSON line: {"results": [{"ok", "expires_on", "token_len", "error", "error_type",
"attempts", "elapsed_ms"}, ...]}. Tokens are never printed.
"""

import json
import os
import sys
import time


def scope_of(resource):
    return resource.rstrip("/") + "/.default"


def get_mic(step):
    from azure.identity import ManagedIdentityCredential

    kwargs = {}
    if step.get("client_id"):
        kwargs["client_id"] = step["client_id"]
    cred = ManagedIdentityCredential(**kwargs)
    tok = cred.get_token(scope_of(step["resource"]))
    return tok.token, int(tok.expires_on)


def get_dac(step):
    from azure.identity import DefaultAzureCredential

    if step.get("client_id"):
        os.environ["AZURE_CLIENT_ID"] = step["client_id"]
    else:
        os.environ.pop("AZURE_CLIENT_ID", None)
    cred = DefaultAzureCredential()
    tok = cred.get_token(scope_of(step["resource"]))
    return tok.token, int(tok.expires_on)


def new_msal_client(step):
    import msal
    import requests

    if step.get("client_id"):
        identity = msal.UserAssignedManagedIdentity(client_id=step["client_id"])
    else:
        identity = msal.SystemAssignedManagedIdentity()
    return msal.ManagedIdentityClient(identity, http_client=requests.Session())


def msal_call(client, step):
    # MSAL takes a resource, not a scope; it normalises nothing.
    result = client.acquire_token_for_client(resource=step["resource"].rstrip("/"))
    if "access_token" not in result:
        raise RuntimeError(
            "MSAL error: ({}) {}".format(result.get("error"), result.get("error_description"))
        )
    return result["access_token"], int(time.time()) + int(result["expires_in"])


CLIENTS = {"mic": get_mic, "dac": get_dac, "msal": None}


def run_step(kind, step):
    started = time.monotonic()
    deadline = started + float(step.get("until_ok_secs") or 0)
    attempts = 0
    errors = []
    # One client object for the whole loop, so MSAL's own caches (tokens, throttled
    # responses) behave as they would in a long-running application.
    msal_client = None
    while True:
        attempts += 1
        try:
            if kind == "msal":
                if msal_client is None:
                    msal_client = new_msal_client(step)
                token, expires_on = msal_call(msal_client, step)
            else:
                token, expires_on = CLIENTS[kind](step)
            return {
                "ok": True,
                "expires_on": expires_on,
                "token_len": len(token),
                "attempts": attempts,
                "errors": errors,
                "elapsed_ms": int((time.monotonic() - started) * 1000),
            }
        except Exception as e:  # noqa: BLE001 - report whatever the SDK raised
            errors.append("{}: {}".format(type(e).__name__, e)[:2000])
            if time.monotonic() >= deadline:
                return {
                    "ok": False,
                    "error": errors[-1],
                    "error_type": type(e).__name__,
                    "attempts": attempts,
                    "errors": errors,
                    "elapsed_ms": int((time.monotonic() - started) * 1000),
                }
            time.sleep(0.2)


def main():
    kind, steps = sys.argv[1], json.loads(sys.argv[2])
    if kind not in CLIENTS:
        raise SystemExit("unknown client " + kind)
    results = [run_step(kind, s) for s in steps]
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()

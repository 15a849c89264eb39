"""A Storage endpoint that checks the token: Azurite (npm `azurite` 3.35.0, HTTPS, `--oauth
basic`) with tokens from the emulated broker (`imds-broker serve --emulate`), through the real
SDKs' ManagedIdentityCredential over the App Service env (what the webhook injects).

- Each SDK (Python azure-storage-blob, Node @azure/storage-blob) creates a container, uploads
  8 MiB in blocks, downloads and compares; the broker's metrics show the token came from it.
- Azurite is shown to enforce OAuth: no token, a garbage token, an expired one, the issuer the
  emulator used to mint, a v2 issuer and a wrong audience are each refused (403), and nothing
  was created.

Run by scripts/test-storage.sh (which installs Azurite and the SDKs and sets
IMDS_BROKER_STORAGE_E2E=1); the conformance stage's pytest run collects this file too and skips it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage_support import (
    ACCOUNT,
    EMULATOR_CLIENT_ID,
    EMULATOR_TENANT_ID,
    HERE,
    STORAGE_NODE,
    Azurite,
    EmulatedBroker,
    jwt_claims,
    make_test_pki,
    unsigned_jwt,
)

if os.environ.get("IMDS_BROKER_STORAGE_E2E") != "1":
    pytest.skip("storage end-to-end tests run in scripts/test-storage.sh (IMDS_BROKER_STORAGE_E2E=1)", allow_module_level=True)

EIGHT_MIB = 8 * 1024 * 1024
PY_CLIENT = HERE / "storage_py_client.py"
NODE_CLIENT = STORAGE_NODE / "blob.mjs"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def azurite(pki, tmp_path_factory):
    a = Azurite(pki, tmp_path_factory.mktemp("azurite"))
    yield a
    a.stop()


@pytest.fixture(scope="module")
def broker():
    b = EmulatedBroker()
    yield b
    b.stop()


def sdk_env(broker, home, extra=None):
    """A pod's environment: the broker's App Service endpoint and nothing Azure-ish else."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    env.update(broker.app_service_env())
    env.update(extra or {})
    return env


def test_emulator_mints_v1_tokens_that_azurite_accepts(broker, azurite):
    token = broker.token()
    c = jwt_claims(token)
    assert c["iss"] == f"https://sts.windows.net/{EMULATOR_TENANT_ID}/"
    assert c["ver"] == "1.0"
    assert c["aud"] == "https://storage.azure.com"  # as requested (Go's spelling, no slash)
    assert c["appid"] == EMULATOR_CLIENT_ID and c["tid"] == EMULATOR_TENANT_ID
    assert c["imds_broker_emulated"] is True
    assert c["nbf"] <= time.time() <= c["exp"]
    # A raw request (no SDK) with that bearer token: Azurite creates the container...
    status, code, body = azurite.request("PUT", "/raw-v1-token?restype=container", token=token)
    assert status == 201, (status, code, body)
    # ...and it is really there (listed with the same token).
    status, code, body = azurite.request("GET", "/raw-v1-token?restype=container&comp=list", token=token)
    assert status == 200, (status, code, body)
    # The account-scoped audience form Storage also accepts.
    account_token = broker.token(f"https://{ACCOUNT}.blob.core.windows.net/")
    status, code, body = azurite.request("GET", "/raw-v1-token?restype=container&comp=list", token=account_token)
    assert status == 200, (status, code, body)


REFUSALS = {
    # name: (token or None, expected x-ms-error-code, text in Azurite's message)
    "no_token": (None, "AuthorizationFailure", "Server failed to authenticate"),
    "garbage": ("garbage-not-a-jwt", "AuthenticationFailed", "Bearer is not supported"),
    "expired": (unsigned_jwt(nbf=int(time.time()) - 7200, iat=int(time.time()) - 7200, exp=int(time.time()) - 60), "AuthenticationFailed", "expired"),
    "not_yet_valid": (unsigned_jwt(nbf=int(time.time()) + 3600, exp=int(time.time()) + 7200), "AuthenticationFailed", "Lifetime validation failed"),
    "no_lifetime": (unsigned_jwt(nbf=None), "AuthenticationFailed", "Bearer is not supported"),
    # What the emulator minted before it minted v1 tokens: Azurite refused it.
    "old_emulator_issuer": (unsigned_jwt(iss=f"https://sts.emulator.imds-broker.invalid/{EMULATOR_TENANT_ID}/"), "AuthenticationFailed", "Invalid token issuer"),
    "v2_issuer": (unsigned_jwt(iss=f"https://login.microsoftonline.com/{EMULATOR_TENANT_ID}/v2.0", ver="2.0"), "AuthenticationFailed", "Invalid token issuer"),
    "wrong_audience": (unsigned_jwt(aud="https://management.azure.com/"), "AuthenticationFailed", "Invalid token audience"),
    "other_account_audience": (unsigned_jwt(aud="https://someoneelse.blob.core.windows.net/"), "AuthenticationFailed", "Invalid token audience"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_azurite_refuses_requests_without_a_valid_token(case, azurite, broker):
    token, want_code, want_text = REFUSALS[case]
    name = "refused-" + case.replace("_", "-")
    status, code, body = azurite.request("PUT", f"/{name}?restype=container", token=token)
    assert (status, code) == (403, want_code), (status, code, body[:500])
    assert want_text in body, body[:500]
    # Nothing was created: with a valid token from the broker the container does not exist.
    status, code, body = azurite.request("GET", f"/{name}?restype=container", token=broker.token())
    assert (status, code) == (404, "ContainerNotFound"), (status, code, body[:500])


SDKS = {
    "python": lambda url, container, ca: ([sys.executable, str(PY_CLIENT), url, container, str(EIGHT_MIB), ca, EMULATOR_CLIENT_ID], {}),
    "node": lambda url, container, ca: (["node", str(NODE_CLIENT), url, container, str(EIGHT_MIB), EMULATOR_CLIENT_ID], {"NODE_EXTRA_CA_CERTS": ca}),
}


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_sdk_writes_and_reads_8_mib_with_the_brokers_token(sdk, azurite, broker, pki, tmp_path):
    container = f"sdk-{sdk}-{int(time.time() * 1000) % 10**9}"
    before = broker.token_requests()
    argv, extra = SDKS[sdk](azurite.account_url, container, pki["ca"])
    started = time.monotonic()
    p = subprocess.run(argv, env=sdk_env(broker, tmp_path, extra), capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    elapsed = time.monotonic() - started
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no result line; rc={p.returncode}\nstdout:{p.stdout[-2000:]}\nstderr:{p.stderr[-4000:]}"
    r = json.loads(lines[-1])
    assert r["ok"], r
    assert r["bytes"] == r["downloaded_bytes"] == r["content_length"] == EIGHT_MIB, r
    assert r["sha256"] == r["downloaded_sha256"]
    # The SDK's credential went to the broker (App Service endpoint) and got a token there.
    assert broker.token_requests() > before, broker.log_text()[-2000:]
    # Azurite holds the blob: read it back without the SDK, with a fresh broker token.
    status, code, body = azurite.request("GET", f"/{container}?restype=container&comp=list", token=broker.token())
    assert status == 200 and "<Name>payload.bin</Name>" in body and f"<Content-Length>{EIGHT_MIB}</Content-Length>" in body, body[:1000]
    print(f"{sdk}: 8 MiB up+down in {elapsed:.1f}s")

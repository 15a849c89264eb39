"""Real Azure SDK clients against the broker (with the fake Entra behind it), for both
protocols: App Service (IDENTITY_ENDPOINT + IDENTITY_HEADER) and IMDS (at
AZURE_POD_IDENTITY_AUTHORITY_HOST; the Rust SDK and Go azidentity have no IMDS override, so
their IMDS path is covered in test_transparent.py).

Go azidentity (the versions Velero 1.15-1.18 pin) also gets Velero's own cases: both scopes
Velero asks for with Velero's `ClientID(creds["AZURE_CLIENT_ID"])`, `ClientID("")` (the
credentials file without AZURE_CLIENT_ID), a ResourceID and an ObjectID selector.

Each client must: obtain a token, with and without a client_id; report the broker's expiry
(within seconds); fail clearly and quickly for an unknown client_id and for a resource the
broker refuses; and recover after the broker's "not ready" 503 (token file missing), through
its own retry where it has one.
"""

import os
import shutil
import time

import pytest

from conftest import (
    ARM,
    CLIENTS,
    GO_STEP,
    GO_VERSIONS,
    check_go_velero_case,
    REFUSED,
    STORAGE,
    TOKEN_LIFETIME,
    UNKNOWN_CLIENT_ID,
    Broker,
    broker_args,
    client_env,
    finish_client,
    go_extra_steps,
    run_client,
    start_client,
    wait_for,
)

PROTOCOLS = ("appservice", "imds")
# Clients whose own retry policy retries a 503 (so one get_token call must succeed). Plain MSAL
# Python has none: the application calls again, as a long-running program does.
SDK_RETRIES_503 = {("python", "mic"), ("python", "dac"), ("node", "mic"), ("node", "dac"), ("rust", "mic"),
                   *(("go", v) for v in GO_VERSIONS)}


def combos():
    for (lang, kind) in CLIENTS:
        for protocol in PROTOCOLS:
            if lang in ("rust", "go") and protocol == "imds":
                continue  # hard-coded 169.254.169.254: see test_transparent.py
            yield lang, kind, protocol


def params(case):
    return [
        pytest.param(lang, kind, protocol, id=f"{lang}-{kind}-{protocol}",
                     marks=pytest.mark.matrix(CLIENTS[(lang, kind)], protocol, case))
        for lang, kind, protocol in combos()
    ]


@pytest.fixture(scope="module")
def shared(fake_entra, tmp_path_factory):
    """One broker for the token/failure cases, and a cache of client runs: each client process
    runs four steps (default identity, configured client_id, unknown client_id, refused
    resource), each with a fresh credential."""
    tmp = tmp_path_factory.mktemp("shared")
    token = tmp / "sa-token"
    shutil.copy(fake_entra["token_file"], token)
    broker = Broker(broker_args(fake_entra, token))
    runs = {"broker_started": time.time()}

    def run(lang, kind, protocol):
        key = (lang, kind, protocol)
        if key not in runs:
            home = tmp_path_factory.mktemp(f"home-{lang}-{kind}-{protocol}")
            steps = [
                {"resource": STORAGE},
                {"resource": ARM, "client_id": fake_entra["client_id"]},
                {"resource": STORAGE, "client_id": UNKNOWN_CLIENT_ID},
                {"resource": REFUSED},
            ]
            if lang == "go":
                steps += go_extra_steps(fake_entra["client_id"])
            results = run_client(lang, kind, steps, client_env(protocol, broker.base, home))
            runs[key] = {"results": results, "started": runs["broker_started"], "finished": time.time()}
        return runs[key]

    yield broker, run
    broker.stop()


def describe(result):
    return result.get("error") or result


@pytest.mark.parametrize("lang,kind,protocol", params("token"))
def test_token(shared, lang, kind, protocol):
    _, run = shared
    r = run(lang, kind, protocol)["results"][0]
    assert r["ok"], describe(r)
    assert r["token_len"] > 100


@pytest.mark.parametrize("lang,kind,protocol", params("token_client_id"))
def test_token_client_id(shared, lang, kind, protocol):
    _, run = shared
    r = run(lang, kind, protocol)["results"][1]
    assert r["ok"], describe(r)
    assert r["token_len"] > 100


@pytest.mark.parametrize("lang,kind,protocol", params("expiry"))
def test_expiry(shared, lang, kind, protocol):
    """The client's idea of the expiry matches the broker's (same cached token) within a couple
    of seconds, and is the fake Entra's lifetime from issue: no client read a wrong field."""
    broker, run = shared
    runinfo = run(lang, kind, protocol)
    for step, resource in ((0, STORAGE), (1, ARM)):
        r = runinfo["results"][step]
        assert r["ok"], describe(r)
        # The clients strip "/.default" and the trailing slash; ask the broker the same way.
        status, _, body = broker.imds(resource.rstrip("/"))
        assert status == 200, body
        broker_exp = int(body["expires_on"])
        assert abs(r["expires_on"] - broker_exp) <= 2, (r["expires_on"], broker_exp)
        # Issued by this module's broker, with the fake's lifetime.
        assert runinfo["started"] + TOKEN_LIFETIME - 2 <= broker_exp <= runinfo["finished"] + TOKEN_LIFETIME + 2


@pytest.mark.parametrize("lang,kind,protocol", params("unknown_client_id"))
def test_unknown_client_id(shared, lang, kind, protocol):
    _, run = shared
    r = run(lang, kind, protocol)["results"][2]
    assert not r["ok"], "a token for an identity the broker does not serve"
    if lang == "rust":
        # azure_identity replaces a 400 body with its own fixed text; the status is kept.
        assert r["status"] == 400, r
        assert "has not been assigned" in r["error"], r["error"]
    else:
        assert "Identity not found" in r["error"], r["error"]
        assert UNKNOWN_CLIENT_ID in r["error"], r["error"]
    if lang == "go":
        assert r["error_type"] == "AuthenticationFailedError" and r["status"] == 400, r
        assert r["requests"] == 1, f"a 400 must not be retried: {r}"
    # Not retried: a configuration error must not take a client's whole retry budget.
    assert r["elapsed_ms"] < 5000, r


@pytest.mark.parametrize("lang,kind,protocol", params("refused_resource"))
def test_refused_resource(shared, lang, kind, protocol):
    _, run = shared
    r = run(lang, kind, protocol)["results"][3]
    assert not r["ok"], "a token for a resource outside --allow-resource"
    assert "not allowed by this broker's policy" in r["error"], r["error"]
    if lang == "go":
        # Not "unavailable": in a credential chain Go would otherwise move on silently.
        assert r["error_type"] == "AuthenticationFailedError" and r["status"] == 403, r
    assert r["elapsed_ms"] < 5000, r


@pytest.mark.parametrize("lang,kind,protocol", params("recovers_after_503"))
def test_recovers_after_503(fake_entra, token_file, start_broker, tmp_path, lang, kind, protocol):
    """Token file missing → the broker answers 503 "not ready" with Retry-After: 1. Once the
    file is back, the client gets its token: through its own retry (one get_token call) for
    the SDKs, through the application calling again for plain MSAL."""
    broker = start_broker(broker_args(fake_entra, token_file))
    endpoint = "app_service" if protocol == "appservice" else "imds"
    hidden = token_file.with_suffix(".hidden")
    os.rename(token_file, hidden)

    step = {"resource": STORAGE}
    if (lang, kind) not in SDK_RETRIES_503:
        step["until_ok_secs"] = 30
    home = tmp_path / "home"
    home.mkdir()
    proc = start_client(lang, kind, [step], client_env(protocol, broker.base, home))
    try:
        wait_for(lambda: broker.requests_served(503, endpoint) >= 1, 30, "the broker to answer 503")
    finally:
        os.rename(hidden, token_file)
    r = finish_client(proc)
    print(f"{lang}-{kind}-{protocol}: attempts={r['attempts']} elapsed_ms={r['elapsed_ms']} "
          f"503s_served={broker.requests_served(503, endpoint)}")
    assert r["ok"], describe(r)
    assert broker.requests_served(503, endpoint) >= 1
    assert broker.requests_served(200, endpoint) >= 1
    if (lang, kind) in SDK_RETRIES_503:
        assert r["attempts"] == 1, f"the SDK did not retry the 503 itself: {r}"
    else:
        # MSAL Python caches any response carrying Retry-After and replays it, without asking
        # the broker, for that many seconds: the broker's 1 s keeps that stall short.
        assert r["elapsed_ms"] < 3000, r
    # Retry-After is 1 s: recovery must not take a client's long backoff.
    assert r["elapsed_ms"] < 20000, r


# --- Go azidentity: what Velero itself does ------------------------------------------------

def go_params(case, protocols=("appservice",)):
    return [
        pytest.param(version, protocol, id=f"go-{version}-{protocol}",
                     marks=pytest.mark.matrix(CLIENTS[("go", version)], protocol, case))
        for version in GO_VERSIONS for protocol in protocols
    ]


@pytest.mark.parametrize("version,protocol", go_params("velero_storage_scope"))
def test_go_velero_storage_scope(shared, fake_entra, version, protocol):
    _, run = shared
    check_go_velero_case("velero_storage_scope", version,
                         run("go", version, protocol)["results"][GO_STEP["velero_storage_scope"]], fake_entra)


@pytest.mark.parametrize("version,protocol", go_params("velero_arm_scope"))
def test_go_velero_arm_scope(shared, fake_entra, version, protocol):
    _, run = shared
    check_go_velero_case("velero_arm_scope", version,
                         run("go", version, protocol)["results"][GO_STEP["velero_arm_scope"]], fake_entra)


@pytest.mark.parametrize("version,protocol", go_params("client_id_empty"))
def test_go_client_id_empty(shared, fake_entra, version, protocol):
    _, run = shared
    check_go_velero_case("client_id_empty", version,
                         run("go", version, protocol)["results"][GO_STEP["client_id_empty"]], fake_entra)


@pytest.mark.parametrize("version,protocol", go_params("resource_id"))
def test_go_resource_id(shared, fake_entra, version, protocol):
    _, run = shared
    check_go_velero_case("resource_id", version,
                         run("go", version, protocol)["results"][GO_STEP["resource_id"]], fake_entra)


@pytest.mark.parametrize("version,protocol", go_params("object_id"))
def test_go_object_id(shared, fake_entra, version, protocol):
    _, run = shared
    check_go_velero_case("object_id", version,
                         run("go", version, protocol)["results"][GO_STEP["object_id"]], fake_entra)

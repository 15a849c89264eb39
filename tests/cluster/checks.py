"""Assertions on pods as the API server stored them."""

import copy
import json
import os
import time

from harness import ApiError, pods_path, wait_for

SIDECAR = "imds-broker"
TOKEN_AUDIENCE = "api://AzureADTokenExchange"
TOKEN_DIR = "/var/run/secrets/imds-broker/serviceaccount"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def token_volumes(pod):
    """Names of projected volumes carrying a service-account token for Entra's audience."""
    names = []
    for v in pod["spec"].get("volumes", []):
        for src in (v.get("projected") or {}).get("sources", []):
            sat = src.get("serviceAccountToken")
            if sat and sat.get("audience") == TOKEN_AUDIENCE:
                names.append(v["name"])
    return names


def assert_injected(pod, client_id=None, tenant_id=None):
    """The sidecar as a native sidecar with its probe; the token volume mounted only in it;
    IDENTITY_ENDPOINT/IDENTITY_HEADER in every app container. Returns the sidecar."""
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR]
    assert len(sidecars) == 1, f"{name}: {len(sidecars)} imds-broker init containers"
    sidecar = sidecars[0]
    # Native sidecar: kept by the API server (a pre-1.29 server would have dropped it).
    assert sidecar.get("restartPolicy") == "Always", f"{name}: sidecar restartPolicy {sidecar.get('restartPolicy')}"
    assert spec["initContainers"][0]["name"] == SIDECAR, f"{name}: sidecar is not the first init container"
    probe = sidecar.get("startupProbe") or {}
    assert probe.get("httpGet", {}).get("path") == "/readyz", f"{name}: startupProbe {probe}"
    assert pod["metadata"].get("annotations", {}).get("imds-broker.io/injected") == "true"

    volumes = token_volumes(pod)
    assert len(volumes) == 1, f"{name}: token volumes {volumes}"
    every = spec.get("initContainers", []) + spec["containers"]
    mounting = [c["name"] for c in every
                if any(m["name"] == volumes[0] for m in c.get("volumeMounts", []))]
    assert mounting == [SIDECAR], f"{name}: token volume mounted by {mounting}"
    mount = [m for m in sidecar["volumeMounts"] if m["name"] == volumes[0]][0]
    sidecar_env = env_of(sidecar)
    assert sidecar_env["AZURE_FEDERATED_TOKEN_FILE"].startswith(mount["mountPath"] + "/")

    header = sidecar_env.get("IDENTITY_HEADER")
    assert header and len(header) >= 32, f"{name}: sidecar IDENTITY_HEADER missing/short"
    port = sidecar_env["IMDS_BROKER_LISTEN"].rsplit(":", 1)[1]
    for c in spec["containers"]:
        env = env_of(c)
        assert env.get("IDENTITY_ENDPOINT") == f"http://127.0.0.1:{port}/msi/token", \
            f"{name}/{c['name']}: IDENTITY_ENDPOINT {env.get('IDENTITY_ENDPOINT')}"
        assert env.get("IDENTITY_HEADER") == header, f"{name}/{c['name']}: IDENTITY_HEADER differs"
    if client_id:
        assert sidecar_env.get("AZURE_CLIENT_ID") == client_id
    if tenant_id:
        assert sidecar_env.get("AZURE_TENANT_ID") == tenant_id
    return sidecar


def assert_untouched(pod):
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    assert not [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR], \
        f"{name}: injected"
    assert not token_volumes(pod), f"{name}: has a token volume"
    for c in spec["containers"]:
        env = env_of(c)
        assert "IDENTITY_ENDPOINT" not in env and "IDENTITY_HEADER" not in env, \
            f"{name}/{c['name']}: got identity env"
    assert "imds-broker.io/injected" not in (pod["metadata"].get("annotations") or {})


def fixture_pod(file_name):
    """A pod of tests/fixtures/velero as a client would create it: without what the API server
    and its admission plugins add (the kube-api-access volume, status, uid) and without owner
    references (their owners do not exist here; the garbage collector would delete the pod)."""
    with open(os.path.join(ROOT, "tests/fixtures/velero", file_name)) as f:
        pod = json.load(f)
    pod = copy.deepcopy(pod)
    pod.pop("status", None)
    meta = pod["metadata"]
    for k in ("uid", "resourceVersion", "creationTimestamp", "ownerReferences", "managedFields"):
        meta.pop(k, None)
    spec = pod["spec"]
    access = {v["name"] for v in spec.get("volumes", []) if v["name"].startswith("kube-api-access-")}
    spec["volumes"] = [v for v in spec.get("volumes", []) if v["name"] not in access]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in access]
    return pod


def create_pod(api, pod, ns="velero", **kw):
    return api.post(pods_path(ns), pod, **kw)


def delete_pod(api, ns, name):
    try:
        api.delete(pods_path(ns, name), query={"gracePeriodSeconds": "0"})
    except ApiError as e:
        if e.status != 404:
            raise


def get_if_exists(api, path):
    """The object at path, or None when the API server answers 404."""
    try:
        return api.get(path)
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def ensure_namespace(api, ns):
    try:
        api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": ns}})
    except ApiError as e:
        if e.status != 409:  # already there (another Velero version's tests made it)
            raise


def make_target_pvc(api, ns, name):
    """The PVC a restore writes into (the restore exposer creates its pod for it)."""
    ensure_namespace(api, ns)
    api.post(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}})


def wait_pod(api, ns, selector, timeout=60):
    """The first pod matching a label selector (made by a controller), waiting for it."""
    def find():
        items = api.get(pods_path(ns), query={"labelSelector": selector})["items"]
        return items[0] if items else None
    return wait_for(f"pod {ns}/{selector}", find, timeout, interval=0.2)


def events_for(api, ns, kind, name):
    items = api.get(f"/api/v1/namespaces/{ns}/events")["items"]
    return [e for e in items
            if e["involvedObject"]["kind"] == kind and e["involvedObject"]["name"] == name]


def elapsed(fn):
    start = time.monotonic()
    try:
        return fn(), None, time.monotonic() - start
    except ApiError as e:
        return None, e, time.monotonic() - start


def normalized(entries):
    """Env entries as the API server stores them (it defaults fieldRef.apiVersion to v1)."""
    out = json.loads(json.dumps(entries))
    for e in out:
        field = (e.get("valueFrom") or {}).get("fieldRef")
        if field is not None:
            field.setdefault("apiVersion", "v1")
    return out


def create_annotated_velero_sa(api, ns, entra):
    """Namespace `ns` and its ServiceAccount velero-server annotated with the fake Entra's
    client and tenant IDs, as docs/velero-on-aks.md's ServiceAccount annotations."""
    api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": ns}})
    api.post(f"/api/v1/namespaces/{ns}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "velero-server", "annotations": {
            "azure.workload.identity/client-id": entra["client_id"],
            "azure.workload.identity/tenant-id": entra["tenant_id"]}}})

"""A Kubernetes API server stand-in for Helm's `lookup`, on 127.0.0.1 (plain HTTP).

The chart reads objects back from the cluster with `lookup` during `helm install/upgrade`;
`helm template --dry-run=server` runs the same lookups through the real helm binary against the
kubeconfig's server. This serves what those lookups ask, and nothing else: the discovery
documents of the group versions looked up (helm maps a kind to its resource through them) and
GET of stored objects (404 Status otherwise). Any other request fails the test that made it,
so a new kind of lookup in the chart shows up here instead of silently finding nothing.

The real API server (kube-apiserver, the cluster stage's tests/cluster/test_04_helm.py) is
where install, upgrade and a rotation under admission are tested.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group version -> [(resource, kind, namespaced)] for the discovery documents.
RESOURCES = {
    "v1": [("secrets", "Secret", True), ("namespaces", "Namespace", False)],
    "admissionregistration.k8s.io/v1": [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False)],
}


def _path(group_version):
    return "/api/v1" if group_version == "v1" else f"/apis/{group_version}"


class FakeAPIServer:
    """Context manager: `with FakeAPIServer() as api: api.put(obj); api.kubeconfig(dir)`."""

    def __init__(self):
        self.objects = {}  # path -> object
        self.requests = []  # (method, path) served
        self.unexpected = []  # (method, path) it had no answer for
        self._server = None

    def put(self, obj):
        """Stores obj (a dict with apiVersion, kind, metadata.name and .namespace)."""
        gv = obj["apiVersion"]
        (resource, _, namespaced), = [r for r in RESOURCES[gv] if r[1] == obj["kind"]]
        meta = obj["metadata"]
        ns = f"/namespaces/{meta['namespace']}" if namespaced else ""
        self.objects[f"{_path(gv)}{ns}/{resource}/{meta['name']}"] = obj

    def remove(self, kind, name):
        for path, obj in list(self.objects.items()):
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                del self.objects[path]

    def kubeconfig(self, directory):
        """Writes a kubeconfig for this server into directory; returns its path."""
        host, port = self._server.server_address
        path = f"{directory}/kubeconfig"
        with open(path, "w") as f:
            json.dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://{host}:{port}"}}],
                "users": [{"name": "fake", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            }, f)
        return path

    def __enter__(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                fake.requests.append(("GET", path))
                for gv, resources in RESOURCES.items():
                    if path == _path(gv):
                        return self.send(200, {
                            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                            "resources": [{"name": r, "singularName": "", "namespaced": n, "kind": k,
                                           "verbs": ["get", "list"]} for r, k, n in resources]})
                if path in fake.objects:
                    return self.send(200, fake.objects[path])
                if any(path.startswith(_path(gv) + "/") for gv in RESOURCES):
                    return self.send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                           "reason": "NotFound", "code": 404,
                                           "message": f"{path} not found"})
                fake.unexpected.append(("GET", path))
                return self.send(501, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "code": 501, "message": f"the fake API server does not serve {path}"})

            def do_POST(self):
                fake.unexpected.append(("POST", self.path))
                self.send(405, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405})

            do_PUT = do_PATCH = do_DELETE = do_POST

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

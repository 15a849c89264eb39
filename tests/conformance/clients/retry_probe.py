"""A measuring endpoint for a managed-identity client's OWN retry budget (test_go_faults.py).

It never issues a token and stands in for nothing the broker does: it answers every request by
a fixed plan, so how often and when a client asks again, and when it gives up, is the client's
own policy (retries, backoff, Retry-After cap, per-try timeout), free of any broker behaviour.

Usage: retry_probe.py HOST PORT PLAN_JSON
  PLAN_JSON: a list of {"status": 503, "retry_after": N|null, "hold_secs": S|null}; request i
  gets entry i (the last one repeats). hold_secs: wait that long before answering (a try
  timeout cuts the connection first).

Prints {"listening": "HOST:PORT"} once, then one JSON line per request as it arrives:
{"n": i, "t_ms": ms since start, "path": ...}.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, PLAN = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
STARTED = time.monotonic()
LOCK = threading.Lock()
COUNT = [0]


def emit(obj):
    with LOCK:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's naming
        with LOCK:
            n = COUNT[0]
            COUNT[0] += 1
        emit({"n": n, "t_ms": int((time.monotonic() - STARTED) * 1000), "path": self.path.split("?")[0]})
        step = PLAN[min(n, len(PLAN) - 1)]
        if step.get("hold_secs"):
            time.sleep(step["hold_secs"])
        body = json.dumps({"error": "probe", "error_description": "retry probe: no token here"}).encode()
        try:
            self.send_response(step.get("status", 503))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if step.get("retry_after") is not None:
                self.send_header("Retry-After", str(step["retry_after"]))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up on this try (its per-try timeout) and closed

    do_POST = do_GET

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer((HOST, PORT), Handler)
server.daemon_threads = True
emit({"listening": "{}:{}".format(*server.server_address)})
server.serve_forever()

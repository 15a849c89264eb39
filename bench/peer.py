#!/usr/bin/env python3
"""The nearest peer, side by side (issue 16 item 1): azure-workload-identity's proxy sidecar
(azwi-proxy) and its mutating webhook (azwi-webhook) next to imds-broker and nginx, in one run,
with bench/bench.py's components (process registry, pinning, wrk + report.lua, fake Entra,
examples/bench_client).

  proxy:   hot path at 1/16/64/256 keep-alive connections (req/s, p50/p99/p99.9), cold path
           (N concurrent first requests: Entra calls, first -> last answer), idle and peak RSS,
           start-up to ready, binary size — broker, azwi-proxy, nginx.
  webhook: the same AdmissionReview (a Velero 1.15 data-mover pod, labelled and with an
           annotated ServiceAccount so azwi mutates) at 1/16/64 concurrent reviews (p50/p99,
           reviews/s, RSS) — `imds-broker webhook` and azwi-webhook (which needs a
           kube-apiserver: tests/cluster/harness.py starts one).

bench/peer.sh builds everything and runs this. Writes OUT/peer.json and OUT/peer.md and prints
the table. Exit status is non-zero only on functional failures (a target that errors, does not
answer, or a webhook that does not mutate), never on a performance number.

Why a mount namespace for azwi-proxy: MSAL for Go validates an authority host it does not
know by asking Entra's instance discovery at login.microsoftonline.com, whatever
AZURE_AUTHORITY_HOST says. The proxy therefore runs with its own /etc/hosts (`unshare
--mount`, a bind mount visible to that process only) mapping that name to 127.0.0.1, where a
TLS forwarder started here (a throw-away CA the proxy trusts through SSL_CERT_FILE) passes the
request to the fake Entra. Nothing leaves 127.0.0.1; the start refuses to run the proxy when
the override is not in place.
"""

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (bench/bench.py: the harness this extends)

ROOT = B.ROOT
DISCOVERY_HOST = "login.microsoftonline.com"

MODES = {
    # hot path: concurrencies, rounds x seconds (and at 1 connection), warm-up; cold callers;
    # start-up runs; webhook: concurrencies, seconds per level
    "full": dict(conns=[1, 16, 64, 256], rounds=3, wrk_secs=5, c1_rounds=10, c1_secs=3,
                 warmup_secs=1, cold_n=1000, startup_runs=20,
                 wh_conns=[1, 16, 64], wh_secs=5, wh_rounds=3),
    "smoke": dict(conns=[1, 16, 64, 256], rounds=1, wrk_secs=1, c1_rounds=1, c1_secs=1,
                  warmup_secs=0, cold_n=200, startup_runs=3,
                  wh_conns=[1, 16, 64], wh_secs=1, wh_rounds=1),
}

log = B.log


# ---------------------------------------------------------------- the discovery forwarder


def make_ca_and_cert(d, name):
    """A throw-away CA and a server certificate for `name` (openssl CLI)."""
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "2", "-subj", "/CN=imds-broker bench peer CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", f"/CN={name}", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


class Forwarder:
    """TLS on 127.0.0.1:443 as `login.microsoftonline.com`, re-encrypted to the fake Entra
    (which answers /common/discovery/instance). Counts connections and the bytes of requests."""

    def __init__(self, cert, key, fake_port, fake_ca, port=443):
        self.fake_port, self.connections, self.requests = fake_port, 0, []
        self.answer_ms, self.tasks = [], set()
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ctx.load_cert_chain(cert, key)
        self.client_ctx = ssl.create_default_context(cafile=str(fake_ca))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.error = None

        def main():
            asyncio.set_event_loop(self.loop)
            try:
                self.server = self.loop.run_until_complete(asyncio.start_server(
                    self.handle, "127.0.0.1", port, ssl=self.server_ctx))
            except OSError as e:
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)
        if self.error:
            raise B.Failure(f"discovery forwarder: cannot listen on 127.0.0.1:{port}: {self.error}")

    async def handle(self, reader, writer):
        self.connections += 1
        accepted = time.monotonic()
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.fake_port, ssl=self.client_ctx,
                                                   server_hostname="localhost")
        except OSError:
            writer.close()
            return

        async def pipe(r, w, record):
            try:
                while data := await r.read(65536):
                    if record and data[:4] in (b"GET ", b"POST"):
                        self.requests.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                    if not record and data[:5] == b"HTTP/":
                        # TLS accept to the first answer byte: what the detour costs the peer.
                        self.answer_ms.append(round((time.monotonic() - accepted) * 1000, 2))
                    w.write(data)
                    await w.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                try:
                    w.close()
                except (OSError, RuntimeError):
                    pass
        try:
            await asyncio.gather(pipe(reader, uw, True), pipe(ur, writer, False))
        finally:
            self.tasks.discard(task)

    async def _shutdown(self):
        self.server.close()
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self):
        """Stops listening, ends open connections, then the loop and its thread."""
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# ---------------------------------------------------------------- azwi-proxy


class Peer:
    """azwi-proxy with the environment the azwi webhook injects, pointed at the fake Entra."""

    def __init__(self, procs, binary, out, name, fake, ca_bundle, hosts, cpu=None):
        self.port = B.free_port()
        i = fake.info
        env = dict(os.environ, AZURE_CLIENT_ID=i["client_id"], AZURE_TENANT_ID=i["tenant_id"],
                   AZURE_FEDERATED_TOKEN_FILE=i["token_file"],
                   AZURE_AUTHORITY_HOST=i["authority"] + "/", SSL_CERT_FILE=str(ca_bundle))
        self.log = out / f"azwi-proxy-{name}.log"
        # unshare (no --fork) execs sh, sh execs taskset, taskset execs the proxy: one PID.
        # The grep refuses to start the proxy unless the name resolves to loopback here.
        script = (f'mount --bind "$1" /etc/hosts && grep -q "^127.0.0.1 {DISCOVERY_HOST}$" /etc/hosts '
                  '|| { echo "hosts override failed" >&2; exit 97; }; shift; exec "$@"')
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(hosts)] + B.pinned([str(binary), f"--proxy-port={self.port}"], cpu)
        self.proc = procs.start(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        B.wait_until(f"azwi-proxy {name} /readyz", self.ready, 15)

    def ready(self):
        if self.proc.poll() is not None:
            raise B.Failure(f"azwi-proxy exited ({self.proc.returncode}); see {self.log}")
        return B.http_get(self.port, "/readyz", timeout=1)[0] == 200

    def get(self):
        return B.http_get(self.port, B.IMDS_TARGET, {"Metadata": "true"}, timeout=30)


def hosts_file(out):
    """This machine's /etc/hosts plus the discovery name on 127.0.0.1 (for the proxy only)."""
    p = out / "peer-hosts"
    base = Path("/etc/hosts").read_text()
    p.write_text(base.rstrip("\n") + f"\n127.0.0.1 {DISCOVERY_HOST}\n")
    return p


# ---------------------------------------------------------------- proxy measurements


def hot(cfg, targets, pin):
    """wrk -t1 against each target, interleaved per round and concurrency (bench.py's loop);
    peak RSS over the top-concurrency runs (VmHWM reset through clear_refs first)."""
    names = list(targets)
    runs, peak, _ = B.interleaved_wrk(
        cfg, {n: (port, B.IMDS_TARGET, B.IMDS_HEADER, pid) for n, (port, pid) in targets.items()},
        pin)
    summary = {}
    for n in names:
        summary[n] = {}
        for c in cfg["conns"]:
            rs = runs[n][c]
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            summary[n][str(c)] = {
                "rps": med(B.req_per_s),
                "p50_us": med(lambda r: r["latency_us"]["p50"]),
                "p99_us": med(lambda r: r["latency_us"]["p99"]),
                "p999_us": med(lambda r: r["latency_us"]["p999"]),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "bytes_per_response": sum(r["bytes"] for r in rs) / max(sum(r["requests"] for r in rs), 1),
                "server_cpu_us_per_req": med(lambda r: 1e6 * r["server_cpu_s"] / max(r["requests"], 1)),
                "rounds": len(rs),
            }
    return summary, peak


def cold(cfg, procs, out, paths, pin, kind, ca_bundle=None, hosts=None, forwarder_state=None,
         extra=()):
    """N connections opened, then N first requests at once; the fake answers after 100 ms."""
    fake = B.Fake(procs, paths["fake"], delay_ms=100, cpu=pin[0])
    fwd = None
    try:
        if kind == "broker":
            srv = B.Broker(procs, paths["broker"], out, "peer-cold", fake=fake, cpu=pin[1],
                           workers=1 if pin[1] is not None else None, extra=extra)
        else:
            fwd = Forwarder(forwarder_state["cert"], forwarder_state["key"], fake_port(fake),
                            fake.info["ca_file"])
            # Every fake Entra makes its own CA: this one's, plus the forwarder's.
            ca_bundle = ca_bundle_for(out, fake, forwarder_state["ca"], "cold")
            srv = Peer(procs, paths["peer"], out, "cold", fake, ca_bundle, hosts, cpu=pin[1])
        before = fake.calls()
        r = B.burst(paths, srv.port, cfg["cold_n"], pin[0])
        time.sleep(0.3)  # late Entra calls still in flight are counted too
        r["entra_calls"] = fake.calls() - before
        r["peak_rss_kib"] = B.vm_kib(srv.pid, "VmHWM")
        if fwd:
            r["discovery_requests"] = list(fwd.requests)
            r["discovery_answer_ms"] = list(fwd.answer_ms)
        procs.stop(srv.proc)
    finally:
        if fwd:
            fwd.close()
        procs.stop(fake.proc)
    return r


def ca_bundle_for(out, fake, forwarder_ca, name):
    """SSL_CERT_FILE for the proxy: the fake Entra's CA and the discovery forwarder's."""
    p = out / f"peer-ca-bundle-{name}.pem"
    p.write_text(Path(fake.info["ca_file"]).read_text() + Path(forwarder_ca).read_text())
    return p


def fake_port(fake):
    return int(fake.info["authority"].rsplit(":", 1)[1].rstrip("/"))


def startup(cfg, paths, fake, kind, ca_bundle):
    """Process start to the first /readyz 200 (bench_client startup). Neither contacts Entra
    to become ready, so the proxy runs without the hosts override here."""
    env = dict(os.environ)
    if kind == "broker":
        env = B.image_env()
        admin = B.free_port()
        cmd = [str(paths["broker"]), "serve", "--listen", f"127.0.0.1:{B.free_port()}",
               "--admin-listen", f"127.0.0.1:{admin}", "--identity-header", B.SECRET] + fake.broker_args()
    else:
        admin = B.free_port()
        i = fake.info
        env.update(AZURE_CLIENT_ID=i["client_id"], AZURE_TENANT_ID=i["tenant_id"],
                   AZURE_FEDERATED_TOKEN_FILE=i["token_file"], AZURE_AUTHORITY_HOST=i["authority"] + "/",
                   SSL_CERT_FILE=str(ca_bundle))
        cmd = [str(paths["peer"]), f"--proxy-port={admin}"]
    argv = [str(paths["client"]), "startup", "--admin", f"127.0.0.1:{admin}",
            "--runs", str(cfg["startup_runs"]), "--"] + cmd
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        raise B.Failure(f"start-up ({kind}): {p.stderr.strip()}")
    return json.loads(p.stdout)


def stripped_size(binary, out):
    copy = out / (Path(binary).name + ".stripped")
    subprocess.run(["objcopy", "--strip-all", str(binary), str(copy)], check=True)
    n = copy.stat().st_size
    copy.unlink()
    return n


def proxy_part(cfg, procs, out, paths, pin, res):
    pki = make_ca_and_cert(out / "peer-pki", DISCOVERY_HOST)
    hosts = hosts_file(out)
    fake = B.Fake(procs, paths["fake"], cpu=pin[0])
    bundle = ca_bundle_for(out, fake, pki[0], "hot")
    fstate = {"ca": pki[0], "cert": pki[1], "key": pki[2]}
    fwd = Forwarder(pki[1], pki[2], fake_port(fake), fake.info["ca_file"])
    workers = 1 if pin[1] is not None else None
    broker = B.Broker(procs, paths["broker"], out, "peer-hot", fake=fake, cpu=pin[1], workers=workers)
    peer = Peer(procs, paths["peer"], out, "hot", fake, bundle, hosts, cpu=pin[1])
    bodies = {}
    for n, get in (("broker", lambda: broker.get("imds")), ("azwi-proxy", peer.get)):
        status, body = get()
        if status != 200:
            raise B.Failure(f"{n} first token answered {status}: {body[:300]!r}")
        bodies[n] = body
        tok = json.loads(body)
        if not tok.get("access_token"):
            raise B.Failure(f"{n}: no access_token in {body[:200]!r}")
    res["first_token_entra_calls"] = fake.calls()
    res["discovery_requests_hot"] = list(fwd.requests)
    time.sleep(2)
    res["idle"] = {"broker": B.memory_breakdown(broker.pid), "azwi-proxy": B.memory_breakdown(peer.pid)}
    res["threads"] = {"broker": B.threads(broker.pid), "azwi-proxy": B.threads(peer.pid)}
    nginx = B.Nginx(procs, out, bodies["broker"], cpu=pin[1])
    res["idle"]["nginx"] = B.memory_breakdown(nginx.worker)
    res["body_bytes"] = {k: len(v) for k, v in bodies.items()}
    targets = {"broker": (broker.port, broker.pid), "azwi-proxy": (peer.port, peer.pid),
               "nginx": (nginx.port, nginx.worker)}
    log("proxy hot path: broker, azwi-proxy, nginx")
    res["hot"], res["peak_rss_kib"] = hot(cfg, targets, pin)
    res["entra_calls_after_hot"] = fake.calls()
    for p in (nginx, peer, broker):
        procs.stop(p.proc)
    fwd.close()
    log("start-up")
    res["startup"] = {k: startup(cfg, paths, fake, k, bundle) for k in ("broker", "azwi-proxy")}
    procs.stop(fake.proc)
    res["binary"] = {
        "broker": {"path": str(paths["broker"]), "bytes": Path(paths["broker"]).stat().st_size,
                   "stripped_bytes": stripped_size(paths["broker"], out),
                   "linking": B.linking(Path(paths["broker"]).read_bytes())},
        "azwi-proxy": {"path": str(paths["peer"]), "bytes": Path(paths["peer"]).stat().st_size,
                       "stripped_bytes": stripped_size(paths["peer"], out),
                       "linking": B.linking(Path(paths["peer"]).read_bytes())},
    }
    log(f"cold path: {cfg['cold_n']} concurrent first requests, broker then azwi-proxy")
    res["cold"] = {"broker": cold(cfg, procs, out, paths, pin, "broker"),
                   "azwi-proxy": cold(cfg, procs, out, paths, pin, "peer", None, hosts, fstate)}
    # The broker's default --max-connections (512) is below a 1,000-caller burst: callers past
    # it wait in the kernel backlog until an answered connection has been idle long enough to
    # be evicted (1 s). The same burst with the cap above it shows that wait apart.
    if cfg["cold_n"] > 512:
        res["cold_broker_cap_1024"] = cold(cfg, procs, out, paths, pin, "broker",
                                           extra=["--max-connections", "1024"])


# ---------------------------------------------------------------- report


def mib(kib):
    return B.mib(kib)


def render(res):
    L = []
    m = res["machine"]
    L.append(f"Machine: {m['cpu']} ({m['cpus']} vCPU), {m['memory']} RAM, {m['os']}, kernel {m['kernel']}")
    L.append(f"Tools: {m['rustc']}; {m.get('go')}; {m['wrk']}; {m['nginx']}; peer: "
             f"azure-workload-identity {res.get('peer_version')}")
    L.append(f"Mode: {res['mode']}; load average at start {' '.join(res['load_start'])}, at end "
             f"{' '.join(res.get('load_end', ['?']))}")
    L.append(f"Pinning: {res['pinning']}")
    L.append("")
    if "hot" in res:
        s, prm = res["hot"], res["params"]
        L.append(f"Hot path: IMDS token request (`Metadata: true`), warm cache; wrk -t1, median of "
                 f"{prm['rounds']} interleaved rounds of {prm['wrk_secs']} s ({prm['c1_rounds']} of "
                 f"{prm['c1_secs']} s at 1 connection). Response bytes incl. headers: "
                 + ", ".join(f"{n} {s[n][next(iter(s[n]))]['bytes_per_response']:.0f}" for n in s))
        L.append("")
        L.append("| conns | target | req/s | ×broker | p50 µs | p99 µs | p99.9 µs | server CPU µs/req | errors |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in s["broker"]:
            for n in s:
                row = s[n][c]
                L.append(f"| {c} | {n} | {row['rps']:.0f} | {row['rps'] / s['broker'][c]['rps']:.2f} | "
                         f"{row['p50_us']:.0f} | {row['p99_us']:.0f} | {row['p999_us']:.0f} | "
                         f"{row['server_cpu_us_per_req']:.1f} | {row['errors']} |")
        L.append("")
    if "idle" in res or "cold" in res or "startup" in res:
        L.append("| measurement | broker | azwi-proxy | nginx |")
        L.append("|---|---:|---:|---:|")
    if "idle" in res:
        i = res["idle"]
        L.append("| RSS idle after the first token, MiB | " + " | ".join(
            f"{mib(i[n]['VmRSS']):.2f}" for n in ("broker", "azwi-proxy", "nginx")) + " |")
        L.append("| … anonymous / file-backed, MiB | " + " | ".join(
            f"{mib(i[n]['RssAnon']):.2f} / {mib(i[n]['RssFile']):.2f}" for n in ("broker", "azwi-proxy", "nginx")) + " |")
        top = max(res["params"]["conns"])
        pk = res["peak_rss_kib"]
        L.append(f"| peak RSS over the {top}-connection runs, MiB | " + " | ".join(
            f"{mib(pk[n]):.2f}" for n in ("broker", "azwi-proxy", "nginx")) + " |")
        L.append(f"| threads idle | {res['threads']['broker']} | {res['threads']['azwi-proxy']} | 1 (worker) |")
    if "cold" in res:
        c = res["cold"]
        n = c["broker"]["connections"]
        L.append(f"| cold: {n} concurrent first requests, Entra answering after 100 ms: answered | "
                 f"{c['broker']['ok']} | {c['azwi-proxy']['ok']} | |")
        L.append(f"| cold: Entra token calls | {c['broker']['entra_calls']} | {c['azwi-proxy']['entra_calls']} | |")
        L.append(f"| cold: distinct tokens served | {c['broker']['distinct_tokens']} | {c['azwi-proxy']['distinct_tokens']} | |")
        L.append("| cold: first request written → first / p50 / p99 / last answer, ms | " + " | ".join(
            "{min:.1f} / {p50:.1f} / {p99:.1f} / {max:.1f}".format(**c[k]["latency_ms"]) for k in ("broker", "azwi-proxy")) + " | |")
        if "cold_broker_cap_1024" in res:
            L.append("| cold: the same, broker with --max-connections 1024 set explicitly (the default now), first / p50 / p99 / last, ms | "
                     "{min:.1f} / {p50:.1f} / {p99:.1f} / {max:.1f}".format(**res["cold_broker_cap_1024"]["latency_ms"])
                     + f" ({res['cold_broker_cap_1024']['entra_calls']} Entra call) | | |")
        L.append(f"| cold: peak RSS, MiB | {mib(c['broker']['peak_rss_kib']):.2f} | {mib(c['azwi-proxy']['peak_rss_kib']):.2f} | |")
        L.append(f"| cold: instance-discovery requests (login.microsoftonline.com), TLS accept → answer ms | — | "
                 f"{len(c['azwi-proxy'].get('discovery_requests', []))}: "
                 f"{', '.join(str(x) for x in c['azwi-proxy'].get('discovery_answer_ms', []))} | |")
    if "startup" in res:
        st = res["startup"]
        L.append(f"| start-up to /readyz 200, median (min–max) of {len(st['broker']['runs_ms'])}, ms | " + " | ".join(
            f"{st[k]['median_ms']:.1f} ({st[k]['min_ms']:.1f}–{st[k]['max_ms']:.1f})" for k in ("broker", "azwi-proxy")) + " | |")
    if "binary" in res:
        b = res["binary"]
        L.append("| binary as built, MiB (linking) | " + " | ".join(
            f"{b[k]['bytes'] / 2**20:.2f} ({b[k]['linking']})" for k in ("broker", "azwi-proxy")) + " | |")
        L.append("| binary stripped, MiB | " + " | ".join(
            f"{b[k]['stripped_bytes'] / 2**20:.2f}" for k in ("broker", "azwi-proxy")) + " | |")
    if "webhook" in res:
        L.append("")
        L.extend(render_webhook(res["webhook"]))
    if res["failures"]:
        L.append("")
        L.append("FUNCTIONAL FAILURES:")
        L.extend(f"- {x}" for x in res["failures"])
    return "\n".join(L) + "\n"


def render_webhook(w):
    L = [f"Webhook: one AdmissionReview ({w['review_bytes']} bytes, {w['fixture']}) POSTed over "
         f"keep-alive TLS connections by the same client (wrk -t1, bench/report.lua), "
         f"{w['secs']} s per level, median of {w['rounds']} interleaved rounds. Patch: "
         + "; ".join(f"{n} {w['patch'][n]['ops']} ops / {w['patch'][n]['bytes']} bytes" for n in w["patch"]), "",
         "| concurrent reviews | webhook | reviews/s | ×ours | p50 ms | p99 ms | errors | RSS peak MiB |",
         "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in w["summary"]["imds-broker"]:
        for n in w["summary"]:
            r = w["summary"][n][c]
            L.append(f"| {c} | {n} | {r['rps']:.0f} | {r['rps'] / w['summary']['imds-broker'][c]['rps']:.2f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {mib(r['hwm_kib']):.1f} |")
    L.append("")
    L.append("| webhook | RSS idle (after one review), MiB | start-up to serving, ms |")
    L.append("|---|---:|---:|")
    for n in w["summary"]:
        L.append(f"| {n} | {mib(w['idle_rss_kib'][n]):.2f} | {w['startup_ms'].get(n, float('nan')):.0f} |")
    return L


def machine(res):
    m = B.machine_info()
    try:
        m["go"] = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        m["go"] = None
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="full")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--broker", type=Path, required=True)
    ap.add_argument("--client", type=Path, required=True)
    ap.add_argument("--fake", type=Path, required=True)
    ap.add_argument("--peer", type=Path, required=True, help="azwi-proxy binary")
    ap.add_argument("--peer-webhook", type=Path, help="azwi-webhook binary")
    ap.add_argument("--peer-version", default="?")
    ap.add_argument("--k8s-bin", type=Path, help="kube-apiserver, etcd, ... (scripts/test-cluster.sh builds them)")
    ap.add_argument("--only", default="proxy,webhook")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    cfg = dict(MODES[args.mode])
    only = set(args.only.split(","))
    paths = {"broker": args.broker, "client": args.client, "fake": args.fake, "peer": args.peer,
             "peer_webhook": args.peer_webhook, "k8s_bin": args.k8s_bin}
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    pin = (None, None) if args.no_pin or (os.cpu_count() or 1) < 2 else (0, 1)
    res = {"mode": args.mode, "params": cfg, "machine": machine(None), "peer_version": args.peer_version,
           "pinning": ("server (broker, azwi-proxy, nginx, webhooks) on CPU 1, clients (wrk, bench_client, "
                       "fake Entra) on CPU 0; broker IMDS_BROKER_WORKER_THREADS=1, Go GOMAXPROCS=1 "
                       "(from the CPU affinity), nginx worker_processes 1"
                       if pin[0] is not None else "none"),
           "load_start": B.loadavg()}
    procs = B.Procs()
    failures = []
    started = time.monotonic()
    try:
        if "proxy" in only:
            proxy_part(cfg, procs, args.out, paths, pin, res)
        if "webhook" in only:
            import peer_webhook  # noqa: PLC0415 (bench/peer_webhook.py; needs the cluster harness)
            res["webhook"] = peer_webhook.run(cfg, procs, args.out, paths, pin)
    except (B.Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        failures.append(f"run aborted: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        procs.stop_all()
    res["load_end"] = B.loadavg()
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    failures += functional(res)
    res["failures"] = failures
    (args.out / "peer.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    (args.out / "peer.md").write_text(text)
    print(text)
    log(f"done in {res['elapsed_s']} s; results in {args.out}/peer.json and peer.md")
    return 1 if failures else 0


def functional(res):
    f = []
    for n, rows in res.get("hot", {}).items():
        for c, row in rows.items():
            if row["errors"]:
                f.append(f"hot path {n} c={c}: {row['errors']} errors")
    for n, r in res.get("cold", {}).items():
        if r["ok"] != r["connections"]:
            f.append(f"cold path {n}: {r['connections'] - r['ok']} callers failed: {r.get('errors')}")
    if res.get("cold", {}).get("broker", {}).get("entra_calls", 1) != 1:
        f.append(f"cold path broker: {res['cold']['broker']['entra_calls']} Entra calls")
    w = res.get("webhook")
    if w:
        f += w.get("failures", [])
    return f


if __name__ == "__main__":
    shutil.which("unshare") or sys.exit("peer.py needs unshare (util-linux)")
    sys.exit(main())

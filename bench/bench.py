#!/usr/bin/env python3
"""imds-broker benchmark driver (Python standard library only).

Runs, in one go and side by side:
  1. hot path: wrk against the broker's IMDS and App Service endpoints (warm cache) and
     against nginx serving a static JSON file of the same size, at several concurrencies;
  2. cold path: N concurrent first requests while the fake Entra answers after 100 ms;
  3. memory: broker RSS idle after the first token, peak RSS during the 256-connection run;
  4. start-up: process start to /readyz 200, and the stripped binary size;
  5. soak: a steady request rate with short-lived tokens (refresh count, remaining lifetime,
     errors, RSS over time).

Writes OUT/results.json and OUT/results.md and prints a table. Exit status is non-zero only
for functional failures (errors, more than one Entra call on the cold path, refresh count
off, broker not answering), never for a missed performance target.

bench/run.sh (full) and bench/smoke.sh (~20 s) are the entry points; they install wrk and
nginx and build the binaries first. Every process started here is stopped by its PID.
Traffic goes to 127.0.0.1 only.
"""

import argparse
import functools
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

SECRET = "bench-identity-header-5ecr3t"
RESOURCE = "https://storage.azure.com/"
IMDS_TARGET = ("/metadata/identity/oauth2/token?api-version=2018-02-01"
               "&resource=https%3A%2F%2Fstorage.azure.com%2F")
APP_TARGET = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fstorage.azure.com%2F"
IMDS_HEADER = "Metadata: true"
APP_HEADER = f"X-IDENTITY-HEADER: {SECRET}"

# Targets of the issue.
TARGET_RPS_RATIO = 1.0
TARGET_P99_RATIO = 1.5
TARGET_COLD_EXTRA_MS = 20.0
TARGET_IDLE_MIB = 8.0
TARGET_PEAK_MIB = 24.0
TARGET_STARTUP_MS = 50.0

MODES = {
    # concurrencies, seconds per wrk run, rounds, (the same for 1 connection, whose round trip
    # is dominated by VM wake-ups and varies by +-10% between rounds: more, shorter rounds),
    # warm-up seconds, cold connections, start-up runs, soak: token lifetime, lead, seconds,
    # rate, connections, margin slack
    "full": dict(conns=[1, 16, 64, 256], wrk_secs=6, rounds=5, c1_secs=3, c1_rounds=30,
                 warmup_secs=1,
                 cold_n=1000, startup_runs=20, soak_lifetime=300, soak_lead=10,
                 soak_secs=600, soak_rate=1000, soak_conns=10, margin_slack=5,
                 soak_parallel=False),
    "smoke": dict(conns=[1, 16, 64, 256], wrk_secs=1, rounds=1, c1_secs=1, c1_rounds=1,
                  warmup_secs=0,
                  cold_n=200, startup_runs=3, soak_lifetime=24, soak_lead=1,
                  soak_secs=13, soak_rate=200, soak_conns=4, margin_slack=3,
                  soak_parallel=True),
}


def image_env():
    """The environment a broker under measurement runs with: this process's, with the trust-store
    variables replaced by what the shipped image sets (`--config.env` in scripts/build-image,
    PATH aside).

    So the broker loads trust roots as it does in a pod: the image sets SSL_CERT_FILE and no
    SSL_CERT_DIR, so the broker reads one CA bundle. A host that sets SSL_CERT_DIR (as some CI
    machines do) would make it also read every file of /etc/ssl/certs (~300), a start-up cost a
    pod never pays (bench/RESULTS.md, Fleet)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(_image_config_env())
    return env


@functools.cache
def _image_config_env():
    """The image's `--config.env` settings but PATH, read from scripts/build-image once."""
    text = (ROOT / "scripts" / "build-image").read_text()
    image = dict(m.split("=", 1) for m in re.findall(r"--config\.env (\S+)", text))
    image.pop("PATH", None)
    return image


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    """A functional failure: the run cannot continue or the broker misbehaved."""


# ---------------------------------------------------------------- processes


class Procs:
    """Every process this run starts, so each can be stopped by its own PID."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(reversed(self.procs)):
            try:
                self.stop(p, timeout=5)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log(f"could not stop pid {p.pid}: {e}")


def pinned(argv, cpu):
    return (["taskset", "-c", str(cpu)] + argv) if cpu is not None else argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, target, headers=None, timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", target, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_until(what, check, timeout, every=0.02):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError as e:
            last = e
        time.sleep(every)
    raise Failure(f"{what}: not within {timeout}s ({last})")


def vm_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_breakdown(pid):
    """VmRSS split into anonymous and file-backed pages, and PSS (shared pages divided by
    the number of processes mapping them)."""
    d = {k: vm_kib(pid, k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            k, _, v = line.partition(":")
            if k in ("Pss", "Pss_Anon", "Pss_File"):
                d[k] = int(v.split()[0])
    except OSError:
        pass
    return d


def reset_peak_rss(pid):
    """Resets VmHWM to the current RSS (Linux >= 4.0: `5` to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


# ---------------------------------------------------------------- components


def start_announcing(procs, argv, what):
    """Starts a harness binary (examples/) that prints one JSON line of its addresses and then
    serves; returns the process and that line, parsed."""
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = read_line(proc.stdout, 20)
    if not line:
        raise Failure(f"{what} printed no JSON line")
    return proc, json.loads(line)


def entra_args(info):
    """The broker's flags for an authority announced as examples/fake_entra does."""
    return ["--authority-host", info["authority"], "--ca-file", info["ca_file"],
            "--tenant-id", info["tenant_id"], "--client-id", info["client_id"],
            "--token-file", info["token_file"]]


class Fake:
    """examples/fake_entra: HTTPS fake Entra plus a plain-HTTP call counter."""

    def __init__(self, procs, binary, delay_ms=0, lifetime=3600, cpu=None):
        self.proc, self.info = start_announcing(
            procs, pinned([str(binary), "--delay-ms", str(delay_ms),
                           "--token-lifetime-secs", str(lifetime)], cpu), "fake_entra")
        m = re.match(r"http://127\.0\.0\.1:(\d+)(/.*)", self.info["calls_url"])
        if not m:
            raise Failure(f"unexpected calls_url {self.info['calls_url']}")
        self.calls_port, self.calls_path = int(m.group(1)), m.group(2)

    def calls(self):
        status, body = http_get(self.calls_port, self.calls_path)
        if status != 200:
            raise Failure(f"fake_entra calls endpoint answered {status}")
        return int(body.decode().strip())

    def broker_args(self):
        return entra_args(self.info)


def read_line(stream, timeout):
    out = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0].strip() if out else None


class Broker:
    def __init__(self, procs, binary, out, name, fake=None, cpu=None, workers=None,
                 extra=(), preexec=None, env=None, subcommand="serve"):
        """`env`: the broker's environment (default: image_env()); `subcommand`: `serve`, or
        `node` (then `extra` names the node and `env` the pod API's KUBECONFIG)."""
        self.port, self.admin = free_port(), free_port()
        env = dict(image_env() if env is None else env)
        env.setdefault("RUST_LOG", "info")
        if workers:
            env["IMDS_BROKER_WORKER_THREADS"] = str(workers)
        self.argv = [str(binary), subcommand, "--listen", f"127.0.0.1:{self.port}",
                     "--admin-listen", f"127.0.0.1:{self.admin}",
                     "--identity-header", SECRET]
        self.argv += fake.broker_args() if fake else ["--emulate"]
        self.argv += list(extra)
        self.log = out / f"broker-{name}.log"
        self.proc = procs.start(pinned(self.argv, cpu), env=env, stdin=subprocess.DEVNULL,
                                stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                preexec_fn=preexec)
        self.pid = self.proc.pid  # taskset execs the broker: same PID
        wait_until(f"broker {name} /readyz", self.ready, 15)

    def ready(self):
        if self.proc.poll() is not None:
            raise Failure(f"broker exited ({self.proc.returncode}); see {self.log}")
        return http_get(self.admin, "/readyz", timeout=1)[0] == 200

    def warm_then_idle(self):
        """Asks for a token over both protocols, rests 2 s, and returns the answers' bodies
        and the memory breakdown then: what "idle RSS after the first token" means here."""
        bodies = {}
        for which in ("imds", "app_service"):
            status, body = self.get(which)
            if status != 200:
                raise Failure(f"warm-up {which} answered {status}: {body[:300]!r}")
            bodies[which] = body
        time.sleep(2)
        return bodies, memory_breakdown(self.pid)

    def get(self, which):
        target, header = (IMDS_TARGET, IMDS_HEADER) if which == "imds" else (APP_TARGET, APP_HEADER)
        k, v = header.split(": ", 1)
        return http_get(self.port, target, {k: v}, timeout=30)

    def metric(self, name, **labels):
        status, body = http_get(self.admin, "/metrics")
        if status != 200:
            raise Failure(f"/metrics answered {status}")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name):
                continue
            m = re.match(r"([a-z_]+)(?:\{(.*)\})? ([0-9.eE+-]+)$", line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


class Nginx:
    def __init__(self, procs, out, body, cpu=None):
        self.dir = out / "nginx"
        (self.dir / "www").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "www" / "token.json").write_bytes(body)
        for p in (out, self.dir, self.dir / "www"):
            p.chmod(0o755)  # the worker may run as nobody
        (self.dir / "www" / "token.json").chmod(0o644)
        self.port = free_port()
        conf = (BENCH / "nginx.conf.template").read_text()
        conf = conf.replace("@OUT@", str(self.dir)).replace("@PORT@", str(self.port))
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = procs.start(
            pinned([nginx_binary(), "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log"),
                    "-c", str(self.dir / "nginx.conf")], cpu),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise Failure(f"nginx exited; see {self.dir / 'nginx-error.log'}")
            return http_get(self.port, IMDS_TARGET, {"Metadata": "true"}, timeout=1)[0] == 200
        wait_until("nginx", up, 10)
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.worker = int(kids[0]) if kids else self.proc.pid


class HyperRef:
    """examples/hyper_static: bare hyper 1 + Tokio (one worker) answering with the same body —
    the cost of the broker's HTTP stack alone, to split a broker/nginx gap into stack and
    broker work."""

    def __init__(self, procs, binary, out, body, cpu=None):
        path = out / "hyper-body.json"
        path.write_bytes(body)
        self.port = free_port()
        env = dict(os.environ, TOKIO_WORKER_THREADS="1")
        self.proc = procs.start(pinned([str(binary), "--port", str(self.port), "--body", str(path)], cpu),
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        if read_line(self.proc.stdout, 10) is None:
            raise Failure("hyper_static did not start")
        self.pid = self.proc.pid


def nginx_binary():
    for p in ("nginx", "/usr/sbin/nginx"):
        found = shutil.which(p)
        if found:
            return found
    raise Failure("nginx is not installed (bench/run.sh installs it)")


# ---------------------------------------------------------------- wrk


def run_wrk(port, target, header, conns, secs, cpu):
    argv = pinned(["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s",
                   "-s", str(BENCH / "report.lua"), "-H", header,
                   f"http://127.0.0.1:{port}{target}"], cpu)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    m = re.search(r"^BENCHJSON (.*)$", out, re.M)
    if p.returncode != 0 or not m:
        raise Failure(f"wrk failed ({p.returncode}): {out[-500:]}")
    r = json.loads(m.group(1))
    r["client_cpu_s"] = ru.ru_utime + ru.ru_stime
    return r


def req_per_s(run):
    """Requests per second of one wrk run."""
    return run["requests"] / (run["duration_us"] / 1e6)


def bootstrap_median_ci(xs, resamples=4000):
    """95% percentile-bootstrap interval of the median of `xs` (fixed seed: reruns agree).

    Tells a real gap from noise: at 1 connection single rounds differ by up to +-10%."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def interleaved_wrk(cfg, targets, pin, peak_of=None):
    """wrk -t1 against every target, interleaved per round and concurrency (the order of the
    targets rotated each round), so drifting background load hits all alike. `targets`: name
    -> (port, request target, header, server pid). Peak RSS (VmHWM, reset through clear_refs
    first) is taken over the top-concurrency runs of the names in `peak_of` (default: all).
    Returns (runs[name][conns] = [wrk results], peak_kib[name], peak method)."""
    names = list(targets)
    peak_of = names if peak_of is None else peak_of
    runs = {n: {c: [] for c in cfg["conns"]} for n in names}
    peak = {n: 0 for n in peak_of}
    method = "VmHWM after clear_refs"

    def plan(c):
        return (cfg["c1_rounds"], cfg["c1_secs"]) if c == 1 else (cfg["rounds"], cfg["wrk_secs"])
    for rnd in range(max(plan(c)[0] for c in cfg["conns"])):
        for c in cfg["conns"]:
            rounds, secs = plan(c)
            if rnd >= rounds:
                continue
            k = rnd % len(names)
            for n in names[k:] + names[:k]:
                port, target, header, pid = targets[n]
                if cfg["warmup_secs"]:
                    run_wrk(port, target, header, c, cfg["warmup_secs"], pin[0])
                is_peak_run = c == max(cfg["conns"]) and n in peak
                if is_peak_run and not reset_peak_rss(pid):
                    method = "VmHWM since start (clear_refs unavailable)"
                cpu0 = cpu_seconds(pid)
                r = run_wrk(port, target, header, c, secs, pin[0])
                cpu1 = cpu_seconds(pid)
                r["server_cpu_s"] = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
                if is_peak_run:
                    peak[n] = max(peak[n], vm_kib(pid, "VmHWM") or 0)
                runs[n][c].append(r)
                errs = sum(r["errors"].values())
                log(f"round {rnd + 1} c={c:<3} {n:<11} {req_per_s(r):>9.0f} req/s  "
                    f"p99 {r['latency_us']['p99']} us  errors {errs}")
    return runs, peak, method


def hot_path(cfg, procs, out, broker, nginx, pin, hyper=None):
    """The broker's two endpoints, nginx and (optionally) bare hyper, interleaved."""
    targets = {
        "imds": (broker.port, IMDS_TARGET, IMDS_HEADER, broker.pid),
        "app_service": (broker.port, APP_TARGET, APP_HEADER, broker.pid),
        "nginx": (nginx.port, IMDS_TARGET, IMDS_HEADER, nginx.worker),
    }
    if hyper:
        targets["hyper"] = (hyper.port, IMDS_TARGET, IMDS_HEADER, hyper.pid)
    names = list(targets)
    runs, peaks, method = interleaved_wrk(cfg, targets, pin,
                                          peak_of=["imds", "app_service", "nginx"])
    peak = {"broker_kib": max(peaks["imds"], peaks["app_service"]),
            "nginx_worker_kib": peaks["nginx"], "method": method}
    summary = {}
    for n in names:
        summary[n] = {}
        for c in cfg["conns"]:
            rs = runs[n][c]
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            reqs = sum(r["requests"] for r in rs)
            summary[n][str(c)] = {
                "rps": med(req_per_s),
                "p50_us": med(lambda r: r["latency_us"]["p50"]),
                "p99_us": med(lambda r: r["latency_us"]["p99"]),
                "p999_us": med(lambda r: r["latency_us"]["p999"]),
                "max_us": max(r["latency_us"]["max"] for r in rs),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "bytes_per_response": sum(r["bytes"] for r in rs) / max(reqs, 1),
                "server_cpu_us_per_req": med(lambda r: 1e6 * (r["server_cpu_s"] or 0) / max(r["requests"], 1)),
                "server_cpu_util": med(lambda r: (r["server_cpu_s"] or 0) / (r["duration_us"] / 1e6)),
                "client_cpu_util": med(lambda r: r["client_cpu_s"] / (r["duration_us"] / 1e6)),
                "rounds": len(rs),
            }
            if n != "nginx":
                # Against nginx's run of the same round (minutes apart at most), which
                # cancels slow drift of the machine; the spread shows the noise.
                ratios = [req_per_s(a) / req_per_s(b) for a, b in zip(rs, runs["nginx"][c])]
                summary[n][str(c)]["round_ratios"] = {
                    "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                    "median_ci95": bootstrap_median_ci(ratios) if len(ratios) >= 5 else None}
    return {"summary": summary, "runs": runs, "peak_rss": peak}


# ---------------------------------------------------------------- cold path


def burst(paths, port, n, cpu):
    argv = pinned([str(paths["client"]), "cold", "--addr", f"127.0.0.1:{port}",
                   "--target", IMDS_TARGET, "--header", IMDS_HEADER,
                   "--connections", str(n)], cpu)
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True,
                                     timeout=120).stdout)


def cold_path(cfg, procs, out, paths, pin):
    fake = Fake(procs, paths["fake"], delay_ms=100, cpu=pin[0])
    broker = Broker(procs, paths["broker"], out, "cold", fake=fake, cpu=pin[1],
                    workers=1 if pin[1] is not None else None)
    before = fake.calls()
    r = burst(paths, broker.port, cfg["cold_n"], pin[0])
    time.sleep(0.2)
    r["entra_calls"] = fake.calls() - before
    r["broker_entra_metric"] = broker.metric("imds_broker_entra_requests_total")
    r["delay_ms"] = 100
    r["broker_hwm_kib"] = vm_kib(broker.pid, "VmHWM")
    m = re.search(r'"message":"token obtained".*?"latency_ms":(\d+)', broker.log.read_text())
    r["exchange_ms"] = int(m.group(1)) if m else None
    # References for the fan-out: the same burst answered from memory, by the now-warm
    # broker and by nginx (the floor of "answer N simultaneous requests" on this machine).
    r["warm_burst_latency_ms"] = burst(paths, broker.port, cfg["cold_n"], pin[0])["latency_ms"]
    status, body = broker.get("imds")
    procs.stop(broker.proc)
    procs.stop(fake.proc)
    if status == 200:
        nginx = Nginx(procs, out, body, cpu=pin[1])
        r["nginx_burst_latency_ms"] = burst(paths, nginx.port, cfg["cold_n"], pin[0])["latency_ms"]
        procs.stop(nginx.proc)
    return r


# ---------------------------------------------------------------- start-up


def start_up(cfg, procs, out, paths, fake):
    res = {}
    admin = free_port()
    base = [str(paths["client"]), "startup", "--admin", f"127.0.0.1:{admin}",
            "--runs", str(cfg["startup_runs"]), "--", str(paths["broker"]), "serve",
            "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{admin}",
            "--identity-header", SECRET]
    for name, extra in (("entra", fake.broker_args()), ("emulate", ["--emulate"])):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=300,
                           env=image_env())
        if p.returncode != 0:
            raise Failure(f"start-up ({name}): {p.stderr.strip()}")
        res[name] = json.loads(p.stdout)
    data = Path(paths["broker"]).read_bytes()
    res["binary"] = str(paths["broker"])
    res["binary_bytes"] = len(data)
    res["binary_stripped"] = b".symtab" not in data
    res["binary_linking"] = linking(data)
    return res


def linking(elf):
    """`static` or `dynamic`: whether the ELF asks for a program interpreter (PT_INTERP),
    i.e. loads libc.so and friends at start-up."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return "unknown"
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        if struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3:  # PT_INTERP
            return "dynamic"
    return "static"


# ---------------------------------------------------------------- soak


class Soak:
    """Starts the soak (fake Entra, broker with --prefetch, client); `finish()` joins it."""

    def __init__(self, cfg, procs, out, paths, pin):
        self.cfg, self.procs = cfg, procs
        lifetime = cfg["soak_lifetime"]
        self.fake = Fake(procs, paths["fake"], lifetime=lifetime, cpu=pin[0])
        self.broker = Broker(procs, paths["broker"], out, "soak", fake=self.fake, cpu=pin[1],
                             workers=1 if pin[1] is not None else None,
                             extra=["--prefetch", RESOURCE])
        wait_until("soak prefetch", lambda: self.fake.calls() >= 1, 20, every=0.005)
        self.t_first = time.monotonic()
        self.call_times = [0.0]
        self.margin = lifetime // 2 - cfg["margin_slack"]
        time.sleep(cfg["soak_lead"])
        argv = pinned([str(paths["client"]), "soak", "--addr", f"127.0.0.1:{self.broker.port}",
                       "--imds-target", IMDS_TARGET, "--app-target", APP_TARGET,
                       "--identity-header", SECRET, "--rate", str(cfg["soak_rate"]),
                       "--duration-secs", str(cfg["soak_secs"]),
                       "--connections", str(cfg["soak_conns"]),
                       "--min-remaining-secs", str(self.margin), "--pid", str(self.broker.pid),
                       "--progress-secs", "60" if cfg["soak_secs"] >= 120 else "0"], pin[0])
        self.client = procs.start(argv, stdout=subprocess.PIPE, text=True)
        self.stop_poll = threading.Event()
        self.poller = threading.Thread(target=self._poll_calls, daemon=True)
        self.poller.start()

    def _poll_calls(self):
        seen = 1
        while not self.stop_poll.wait(0.5):
            try:
                n = self.fake.calls()
            except (OSError, Failure):
                continue
            while seen < n:
                seen += 1
                self.call_times.append(round(time.monotonic() - self.t_first, 1))

    def finish(self):
        cfg = self.cfg
        try:
            stdout, _ = self.client.communicate(timeout=cfg["soak_secs"] + 120)
        except subprocess.TimeoutExpired:
            self.procs.stop(self.client)
            raise Failure("soak client did not finish")
        self.procs.procs.remove(self.client)
        if self.client.returncode != 0:
            raise Failure(f"soak client failed ({self.client.returncode})")
        r = json.loads(stdout)
        self.stop_poll.set()
        self.poller.join(5)
        # Count first, then take the time: every counted call happened inside the window.
        calls = self.fake.calls()
        t_end = time.monotonic() - self.t_first
        r["entra_calls"] = calls
        r["broker_entra_metric"] = self.broker.metric("imds_broker_entra_requests_total")
        r["entra_call_times_s"] = self.call_times
        lifetime = cfg["soak_lifetime"]
        # The broker computes the lifetime in whole seconds (lifetime or lifetime - 1) and
        # refreshes at half of it, plus the exchange's own latency.
        r_lo, r_hi = (lifetime - 1) // 2, lifetime // 2 + 1
        n_lo, n_hi = math.floor(t_end / r_hi), math.floor(t_end / r_lo)
        r["expected_calls"] = [1 + n_lo, 1 + n_hi]
        r["window_s"] = round(t_end, 1)
        r["token_lifetime_s"] = lifetime
        r["rate"] = cfg["soak_rate"]
        rss = [kib for t, kib in r["rss_kib"] if t >= min(30, cfg["soak_secs"] / 3)]
        if rss:
            k = max(1, len(rss) // 10)
            r["rss_start_kib"] = statistics.median(rss[:k])
            r["rss_end_kib"] = statistics.median(rss[-k:])
            r["rss_max_kib"] = max(rss)
        self.procs.stop(self.broker.proc)
        self.procs.stop(self.fake.proc)
        return r


# ---------------------------------------------------------------- report


def machine_info():
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return None
    def cmd(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None
    try:
        nginx = cmd([nginx_binary(), "-v"])
    except Failure:  # the fleet runs need no nginx (bench/smoke.sh does not install it)
        nginx = None
    virt = "yes (hypervisor flag)" if "hypervisor" in (first("/proc/cpuinfo", "flags") or "") else "no"
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cpu_mhz": first("/proc/cpuinfo", "cpu MHz"),
        "cpus": os.cpu_count(),
        "virtualised": virt,
        "memory": first("/proc/meminfo", "MemTotal"),
        "kernel": os.uname().release,
        "os": "Debian " + (Path("/etc/debian_version").read_text().strip()
                           if Path("/etc/debian_version").exists() else "?"),
        "rustc": cmd(["rustc", "--version"]),
        "wrk": cmd(["wrk", "-v"]),
        "nginx": nginx,
    }


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


def wait_quiet(limit, max_wait, every=60):
    start = time.monotonic()
    while True:
        one = float(loadavg()[0])
        if one < limit:
            return {"quiet": True, "waited_s": round(time.monotonic() - start)}
        if time.monotonic() - start >= max_wait:
            log(f"machine never got quiet (1-min load {one}); running anyway")
            return {"quiet": False, "waited_s": round(time.monotonic() - start)}
        log(f"1-min load {one} >= {limit}: waiting {every}s for a quiet machine")
        time.sleep(every)


def mib(kib):
    return kib / 1024 if kib is not None else float("nan")


def verdict(ok):
    return "met" if ok else "MISSED"


def verdict_lines(targets, failures):
    """The closing part of a results page: the targets with their verdicts, then any
    functional failures."""
    lines = ["", "| target | result | verdict |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in targets]
    if failures:
        lines += ["", "FUNCTIONAL FAILURES:"] + [f"- {x}" for x in failures]
    return lines


def evaluate(res):
    """Targets (performance) and checks (functional)."""
    t, f = [], []
    hp = res.get("hot_path")
    if hp:
        s = hp["summary"]
        for ep in ("imds", "app_service"):
            for c, row in s[ep].items():
                ng = s["nginx"][c]
                rr = row["rps"] / ng["rps"]
                pr = row["p99_us"] / max(ng["p99_us"], 1)
                shown = f"{rr:.2f}x"
                if (ci := row.get("round_ratios", {}).get("median_ci95")):
                    shown += f" (per round {row['round_ratios']['median']:.2f}, 95% CI {ci[0]:.2f}-{ci[1]:.2f})"
                t.append((f"{ep} c={c}: req/s >= 1.0x nginx", shown, rr >= TARGET_RPS_RATIO))
                t.append((f"{ep} c={c}: p99 <= 1.5x nginx", f"{pr:.2f}x", pr <= TARGET_P99_RATIO))
        for n, rows in s.items():
            for c, row in rows.items():
                if row["errors"]:
                    f.append(f"hot path {n} c={c}: {row['errors']} errors")
        peak = mib(hp["peak_rss"]["broker_kib"])
        top = max(res["params"]["conns"])
        t.append((f"peak RSS ({top} conns) <= 24 MiB", f"{peak:.1f} MiB", peak <= TARGET_PEAK_MIB))
    if "idle_rss_kib" in res:
        idle = mib(res["idle_rss_kib"])
        t.append(("idle RSS after first token <= 8 MiB", f"{idle:.1f} MiB", idle <= TARGET_IDLE_MIB))
    cold = res.get("cold")
    if cold:
        lim = cold["delay_ms"] + TARGET_COLD_EXTRA_MS
        t.append((f"cold: every caller within {lim:.0f} ms", f"max {cold['latency_ms']['max']:.1f} ms",
                  cold["latency_ms"]["max"] <= lim))
        t.append(("cold: exactly 1 Entra call", str(cold["entra_calls"]), cold["entra_calls"] == 1))
        if cold["entra_calls"] != 1:
            f.append(f"cold path: {cold['entra_calls']} Entra calls for one resource")
        if cold["ok"] != cold["connections"]:
            f.append(f"cold path: {cold['connections'] - cold['ok']} callers failed: {cold['errors']}")
    st = res.get("startup")
    if st:
        med = st["entra"]["median_ms"]
        t.append(("start-up to /readyz <= 50 ms (median)", f"{med:.1f} ms", med <= TARGET_STARTUP_MS))
    soak = res.get("soak")
    if soak:
        lo, hi = soak["expected_calls"]
        calls_ok = lo <= soak["entra_calls"] <= hi
        t.append(("soak: no error", str(soak["errors"]), soak["errors"] == 0))
        t.append(("soak: Entra calls == expected refreshes", f"{soak['entra_calls']} (expected {lo}"
                  + (f"-{hi})" if hi != lo else ")"), calls_ok))
        t.append((f"soak: every token >= {soak['margin_s']} s left",
                  f"min {soak['min_remaining_s']} s", soak["below_margin"] == 0))
        growth = soak.get("rss_end_kib", 0) - soak.get("rss_start_kib", 0)
        t.append(("soak: RSS flat (growth <= 1 MiB)", f"{growth:+.0f} KiB", growth <= 1024))
        if soak["errors"]:
            f.append(f"soak: {soak['errors']} errors: {soak['error_kinds']}")
        if soak["entra_calls"] > hi or soak["entra_calls"] < 1:
            f.append(f"soak: {soak['entra_calls']} Entra calls, expected {lo}..{hi}")
        if soak["below_margin"]:
            f.append(f"soak: {soak['below_margin']} answers with a token below the margin")
        if soak["ok"] == 0:
            f.append("soak: no successful answer")
    return t, f


def render(res, targets, failures):
    L = []
    m = res["machine"]
    L.append(f"Machine: {m['cpu']} ({m['cpus']} vCPU, {m['cpu_mhz']} MHz, virtualised: {m['virtualised']}), "
             f"{m['memory']} RAM, {m['os']}, kernel {m['kernel']}")
    L.append(f"Tools: {m['rustc']}; {m['wrk']}; {m['nginx']}")
    L.append(f"Mode: {res['mode']}; load average at start {' '.join(res['load_start'])}, "
             f"at end {' '.join(res.get('load_end', ['?']))}; quiet machine: {res['quiet']}")
    L.append(f"Pinning: {res['pinning']}")
    hp = res.get("hot_path")
    if hp:
        s = hp["summary"]
        size = s["imds"][next(iter(s["imds"]))]["bytes_per_response"]
        L.append("")
        prm = res["params"]
        L.append(f"Hot path (warm cache; wrk -t1, median of {prm['rounds']} interleaved rounds of "
                 f"{prm['wrk_secs']} s, at 1 connection {prm['c1_rounds']} rounds of {prm['c1_secs']} s; "
                 f"~{size:.0f} bytes per response incl. headers)")
        L.append("")
        L.append("| conns | target | req/s | ×nginx | p50 µs | p99 µs | ×nginx p99 | p99.9 µs | errors | server CPU µs/req |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in s["nginx"]:
            ng = s["nginx"][c]
            for n in [n for n in ("imds", "app_service", "hyper", "nginx") if n in s]:
                row = s[n][c]
                rr = "" if n == "nginx" else f"{row['rps'] / ng['rps']:.2f}"
                pr = "" if n == "nginx" else f"{row['p99_us'] / max(ng['p99_us'], 1):.2f}"
                L.append(f"| {c} | {n} | {row['rps']:.0f} | {rr} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | "
                         f"{pr} | {row['p999_us']:.0f} | {row['errors']} | {row['server_cpu_us_per_req']:.1f} |")
        spread = [f"c={c} " + ", ".join(
                      f"{n} {rr['min']:.2f}–{rr['max']:.2f} (median {rr['median']:.2f}"
                      + (f", 95% CI {rr['median_ci95'][0]:.2f}–{rr['median_ci95'][1]:.2f})"
                         if rr.get("median_ci95") else ")")
                      for n in ("imds", "app_service", "hyper")
                      if n in s and (rr := s[n][c].get("round_ratios")))
                  for c in s["nginx"]]
        L.append("")
        L.append("req/s against nginx's run of the same round, lowest–highest: " + "; ".join(spread))
    L.append("")
    L.append("| measurement | value |")
    L.append("|---|---|")
    if "idle_rss_kib" in res:
        L.append(f"| broker RSS idle after first token | {mib(res['idle_rss_kib']):.2f} MiB |")
        m1, m3 = res.get("idle_memory_kib", {}), res.get("idle_memory_3_brokers_kib", {})
        if m1.get("RssAnon") is not None:
            L.append(f"| … of which anonymous (heap, stacks) / file-backed (binary, libc) | "
                     f"{mib(m1['RssAnon']):.2f} / {mib(m1['RssFile']):.2f} MiB |")
        if m1.get("Pss") is not None and m3.get("Pss") is not None:
            L.append(f"| broker PSS idle, alone / with 2 more brokers running | "
                     f"{mib(m1['Pss']):.2f} / {mib(m3['Pss']):.2f} MiB |")
    if hp:
        pk = hp["peak_rss"]
        top = max(res["params"]["conns"])
        L.append(f"| broker peak RSS, {top}-connection runs | {mib(pk['broker_kib']):.2f} MiB ({pk['method']}) |")
        L.append(f"| nginx worker peak RSS, {top}-connection runs | {mib(pk['nginx_worker_kib']):.2f} MiB |")
    cold = res.get("cold")
    if cold:
        lm = cold["latency_ms"]
        L.append(f"| cold: {cold['connections']} concurrent first requests, Entra delay {cold['delay_ms']} ms | "
                 f"{cold['ok']} answered, {cold['entra_calls']} Entra call(s), {cold['distinct_tokens']} distinct token(s); "
                 f"latency from the first request written: min {lm['min']:.1f} / p50 {lm['p50']:.1f} / "
                 f"p99 {lm['p99']:.1f} / max {lm['max']:.1f} ms; the broker's exchange took {cold.get('exchange_ms')} ms |")
        if "own_latency_ms" in cold:
            ol = cold["own_latency_ms"]
            L.append(f"| cold: each caller from its own send (the client needed {cold['send_spread_ms']:.1f} ms "
                     f"to send all {cold['connections']}) | min {ol['min']:.1f} / p50 {ol['p50']:.1f} / "
                     f"p99 {ol['p99']:.1f} / max {ol['max']:.1f} ms |")
        for key, what in (("warm_burst_latency_ms", "warm broker (cache hit)"), ("nginx_burst_latency_ms", "nginx")):
            if key in cold:
                w = cold[key]
                L.append(f"| reference: the same {cold['connections']}-request burst answered by the {what} | "
                         f"min {w['min']:.1f} / p50 {w['p50']:.1f} / max {w['max']:.1f} ms |")
    st = res.get("startup")
    if st:
        for k in ("entra", "emulate"):
            v = st[k]
            L.append(f"| start-up to /readyz 200 ({k} mode, {len(v['runs_ms'])} runs) | "
                     f"median {v['median_ms']:.1f} ms, min {v['min_ms']:.1f}, max {v['max_ms']:.1f} |")
        L.append(f"| binary {st.get('binary', '')} (stripped: {st['binary_stripped']}, "
                 f"linking: {st.get('binary_linking', '?')}) | {st['binary_bytes'] / 2**20:.2f} MiB "
                 f"({st['binary_bytes']} bytes) |")
    soak = res.get("soak")
    if soak:
        sl = soak["service_latency_ms"]
        L.append(f"| soak: {soak['rate']} req/s for {soak['planned'] // soak['rate']} s, {soak['token_lifetime_s']} s tokens | "
                 f"{soak['ok']} ok, {soak['errors']} errors, {soak['achieved_rps']:.0f} req/s achieved; "
                 f"latency p50 {sl['p50']:.2f} / p99 {sl['p99']:.2f} / p99.9 {sl['p999']:.2f} / max {sl['max']:.2f} ms |")
        L.append(f"| soak: Entra calls | {soak['entra_calls']} (expected {soak['expected_calls'][0]}"
                 f"{'' if soak['expected_calls'][0] == soak['expected_calls'][1] else '-' + str(soak['expected_calls'][1])}"
                 f" in {soak['window_s']} s from the first call); at t = {', '.join(str(x) for x in soak['entra_call_times_s'])} s |")
        L.append(f"| soak: least lifetime left on a served token | {soak['min_remaining_s']} s (margin {soak['margin_s']} s) |")
        if "rss_start_kib" in soak:
            L.append(f"| soak: RSS start / end / max | {mib(soak['rss_start_kib']):.2f} / {mib(soak['rss_end_kib']):.2f} / "
                     f"{mib(soak['rss_max_kib']):.2f} MiB |")
    L.extend(verdict_lines(targets, failures))
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=MODES, default="full")
    ap.add_argument("--out", type=Path, default=BENCH / "out")
    ap.add_argument("--broker", type=Path, default=ROOT / "target/release/imds-broker")
    ap.add_argument("--client", type=Path, default=ROOT / "target/release/examples/bench_client")
    ap.add_argument("--fake", type=Path, default=ROOT / "target/release/examples/fake_entra")
    ap.add_argument("--hyper", type=Path, default=None,
                    help="examples/hyper_static: adds bare hyper as a hot-path reference")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and client to CPUs")
    ap.add_argument("--wait-quiet", type=float, default=0,
                    help="wait up to this many seconds for 1-min load < --quiet-load")
    ap.add_argument("--quiet-load", type=float, default=0.7)
    ap.add_argument("--only", default="hot,cold,startup,soak", help="comma-separated subset")
    ap.add_argument("--soak-secs", type=int, help="override the soak duration")
    ap.add_argument("--rounds", type=int, help="override the hot-path rounds")
    ap.add_argument("--wrk-secs", type=int, help="override seconds per wrk run")
    ap.add_argument("--conns", help="override the hot-path concurrencies, comma-separated (e.g. 1)")
    args = ap.parse_args()
    cfg = dict(MODES[args.mode])
    for k in ("soak_secs", "rounds", "wrk_secs"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.conns:
        cfg["conns"] = [int(c) for c in args.conns.split(",")]
    only = set(args.only.split(","))
    paths = {"broker": args.broker, "client": args.client, "fake": args.fake}
    if args.hyper:
        paths["hyper"] = args.hyper
    for k, p in paths.items():
        if not p.exists():
            raise SystemExit(f"{k} binary {p} missing (bench/run.sh builds it)")
    args.out = args.out.resolve()  # nginx resolves relative paths against its prefix
    args.out.mkdir(parents=True, exist_ok=True)
    pin = (None, None) if args.no_pin or (os.cpu_count() or 1) < 2 else (0, 1)

    res = {"mode": args.mode, "params": cfg, "machine": machine_info(),
           "pinning": ("server (broker or nginx) on CPU 1, clients (wrk, bench_client, fake Entra) on CPU 0; "
                       "broker IMDS_BROKER_WORKER_THREADS=1, nginx worker_processes 1"
                       if pin[0] is not None else "none")}
    quiet = wait_quiet(args.quiet_load, args.wait_quiet) if args.wait_quiet else {"quiet": None}
    res["quiet"] = quiet
    res["load_start"] = loadavg()
    procs = Procs()
    started = time.monotonic()
    failures = []
    def on_term(*_):
        raise KeyboardInterrupt()
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        soak = None
        if "soak" in only and cfg["soak_parallel"]:
            log("soak (in parallel; smoke mode)")
            soak = Soak(cfg, procs, args.out, paths, pin)
        if "hot" in only or "startup" in only:
            fake = Fake(procs, paths["fake"], cpu=pin[0])
        if "hot" in only:
            log("hot path: broker (fake Entra) + nginx")
            broker = Broker(procs, paths["broker"], args.out, "hot", fake=fake, cpu=pin[1],
                            workers=1 if pin[1] is not None else None)
            bodies, res["idle_memory_kib"] = broker.warm_then_idle()
            if len(bodies["imds"]) != len(bodies["app_service"]):
                raise Failure("IMDS and App Service bodies differ in size")
            res["idle_rss_kib"] = res["idle_memory_kib"]["VmRSS"]
            # Two more brokers of the same binary: the file-backed part of RSS is shared.
            others = [Broker(procs, paths["broker"], args.out, f"share{i}", fake=fake, cpu=pin[1],
                             workers=1 if pin[1] is not None else None) for i in range(2)]
            for o in others:
                o.get("imds")
            time.sleep(1)
            res["idle_memory_3_brokers_kib"] = memory_breakdown(broker.pid)
            for o in others:
                procs.stop(o.proc)
            res["broker_threads"] = threads(broker.pid)
            res["body_bytes"] = len(bodies["imds"])
            nginx = Nginx(procs, args.out, bodies["imds"], cpu=pin[1])
            hyper = (HyperRef(procs, paths["hyper"], args.out, bodies["imds"], cpu=pin[1])
                     if paths.get("hyper") else None)
            res["hot_path"] = hot_path(cfg, procs, args.out, broker, nginx, pin, hyper)
            if hyper:
                procs.stop(hyper.proc)
            res["entra_calls_hot"] = fake.calls()
            procs.stop(nginx.proc)
            procs.stop(broker.proc)
        if "startup" in only:
            log("start-up")
            res["startup"] = start_up(cfg, procs, args.out, paths, fake)
        if "hot" in only or "startup" in only:
            procs.stop(fake.proc)
        if "cold" in only:
            log(f"cold path: {cfg['cold_n']} concurrent first requests")
            res["cold"] = cold_path(cfg, procs, args.out, paths, pin)
        if "soak" in only:
            if soak is None:
                log(f"soak: {cfg['soak_rate']} req/s for {cfg['soak_secs']} s")
                soak = Soak(cfg, procs, args.out, paths, pin)
            res["soak"] = soak.finish()
    except (Failure, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        failures.append(f"run aborted: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)
    res["load_end"] = loadavg()
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    targets, functional = evaluate(res)
    failures += functional
    res["targets"] = [{"name": n, "value": v, "met": ok} for n, v, ok in targets]
    res["failures"] = failures
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    text = render(res, targets, failures)
    (args.out / "results.md").write_text(text)
    print(text)
    log(f"done in {res['elapsed_s']} s; results in {args.out}/results.json and results.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

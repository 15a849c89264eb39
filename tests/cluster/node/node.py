"""One real Kubernetes node on this machine for the cluster tests and `scripts/cluster`: Debian's
containerd and runc, the CNI plugins (bridge, host-local, loopback, portmap), and the kubelet,
kube-scheduler and kube-proxy built from the same wrapper module as the API server
(tests/cluster/k8s). Nothing is pulled: every image is imported from a local archive.

Everything the node makes is its own and removed by `Node.stop()`: a bridge with a /24 that
overlaps none of the machine's routes, containerd with its own config, root, state and socket
in a short temp directory, a cgroup subtree of its own in every cgroup v1 hierarchy (the
kubelet's `cgroupRoot`), kube-proxy's nftables table. Processes are stopped by their PID;
containerd's shims (started by our containerd, reparented to init) are found by the socket
address on their command line.

Requires root, cgroup v1 or v2, overlayfs, nftables, and the Debian packages containerd, runc,
containernetworking-plugins, nftables (scripts/cluster installs them).
"""

import glob
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import yaml

import harness
from harness import Proc, free_port, wait_for

CNI_BIN_DIR = "/usr/lib/cni"
# Where the node-agent (and so every pod Velero's exposers create) mounts the kubelet's pods.
VAR_LIB_KUBELET = "/var/lib/kubelet"
# Fixed paths containerd 1.6 and libcni use whatever containerd's root and state: the shims'
# sockets (/run/containerd/s) and the CNI results cache, which keeps the CRI plugin's loopback
# results after the sandbox is gone. What the node adds there is removed at teardown.
RUN_CONTAINERD = "/run/containerd"
CNI_RESULTS = "/var/lib/cni/results"
SANDBOX_IMAGE = "localhost/pause:3.10"
# /24s tried in order for the pod network; the first that overlaps no route or address of the
# machine is used (10.0.0.0/24 is the API server's service range).
SUBNET_CANDIDATES = [f"10.{a}.{b}.0/24" for a in (254, 253, 252) for b in range(0, 256, 7)]


def sh(*argv, check=True, input=None, timeout=120):
    res = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return res


def machine_networks():
    nets = []
    for cmd in (["ip", "-j", "route", "show", "table", "all"], ["ip", "-j", "addr"]):
        for entry in json.loads(sh(*cmd).stdout or "[]"):
            dst = entry.get("dst")
            if dst and dst not in ("default", "broadcast", "local", "unreachable"):
                try:
                    nets.append(ipaddress.ip_network(dst, strict=False))
                except ValueError:
                    pass
            for a in entry.get("addr_info", []):
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def pick_subnet():
    taken = [n for n in machine_networks() if n.version == 4]
    taken.append(ipaddress.ip_network("10.0.0.0/24"))
    for cand in SUBNET_CANDIDATES:
        net = ipaddress.ip_network(cand)
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError(f"no free /24 for the pod network among {SUBNET_CANDIDATES[0]} … "
                       f"{SUBNET_CANDIDATES[-1]}: every one overlaps a route of this machine")


def cgroup_hierarchies():
    """(controller dir, is_v2) of every mounted cgroup hierarchy."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype = right.split()[0]
            mountpoint = left.split()[4]
            if fstype in ("cgroup", "cgroup2"):
                out.append((mountpoint, fstype == "cgroup2"))
    return out


def can_lower_oom_score():
    """Whether this process may set a negative oom_score_adj (CAP_SYS_RESOURCE, bit 24)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def pids_with_arg(arg):
    """PIDs whose command line holds `arg` as one argument (our containerd's shims)."""
    want = arg.encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and want in proc_cmdline(int(d)):
            out.append(int(d))
    return out


def mounts_under(*prefixes):
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
                out.append(mp)
    return sorted(set(out), key=len, reverse=True)


class Node:
    """containerd + kubelet (+ kube-scheduler, kube-proxy) registered with `cp`'s API server."""

    def __init__(self, cp, bin_dir, images_dir, log_dir, name="kubelet-node-1", subnet=None):
        self.cp = cp
        self.bin_dir = bin_dir
        self.images_dir = images_dir
        self.log_dir = log_dir
        self.name = name
        self.procs = []
        self.subnet = subnet or pick_subnet()
        self.gateway = str(next(self.subnet.hosts()))
        # Unix socket paths are limited to 108 bytes: containerd's sockets, state and root go
        # to a short directory of their own under /tmp.
        self.dir = tempfile.mkdtemp(prefix="ibk-")
        os.chmod(self.dir, 0o700)
        token = os.path.basename(self.dir)[4:].lower().replace("_", "")
        self.bridge = f"ibk{token}"[:15]
        self.cni_network = f"imds-broker-{token}"
        self.cgroup_root = f"/imds-broker-node-{token}"
        self.socket = os.path.join(self.dir, "containerd.sock")
        self.kubelet_dir = os.path.join(self.dir, "kubelet")
        self.var_lib_kubelet = None
        self.run_containerd_made = not os.path.exists(RUN_CONTAINERD)
        self.var_lib_cni_made = not os.path.exists("/var/lib/cni")
        self.cni_results_before = sorted(os.listdir(CNI_RESULTS)) \
            if os.path.isdir(CNI_RESULTS) else []

    # -- what the outside needs ------------------------------------------------------------

    def ctr(self, *args, check=True, timeout=300):
        return sh("ctr", "--address", self.socket, "--namespace", "k8s.io", *args,
                  check=check, timeout=timeout)

    def import_image(self, archive, base_name=None):
        """Imports an OCI or docker archive into the node's containerd; returns the image
        references it unpacked."""
        args = ["images", "import", "--all-platforms"]
        if base_name:
            args += ["--base-name", base_name]
        out = self.ctr(*args, archive).stdout
        refs = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")]
        if not refs:
            raise RuntimeError(f"importing {archive}: ctr unpacked no image:\n{out}")
        return refs

    # -- start -----------------------------------------------------------------------------

    def create_bridge(self):
        """The pod network's bridge, made before the API server and kubelet start: its
        gateway address is the node's InternalIP and the address the API server also listens
        on, so pods reach both (the CNI bridge plugin adopts an existing bridge)."""
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.bridge_made = True
        sh("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def make_cgroup_root(self):
        for mountpoint, is_v2 in cgroup_hierarchies():
            path = mountpoint + self.cgroup_root
            os.makedirs(path, exist_ok=True)
            if not is_v2 and os.path.exists(os.path.join(mountpoint, "cpuset.cpus")):
                # A new cpuset cgroup starts with no CPUs and no memory nodes.
                for f in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(mountpoint, f)) as src:
                        value = src.read().strip()
                    with open(os.path.join(path, f), "w") as dst:
                        dst.write(value)
            if is_v2 and mountpoint == "/sys/fs/cgroup":
                # cgroup v2: hand the controllers down to the subtree.
                with open(os.path.join(mountpoint, "cgroup.subtree_control")) as f:
                    wanted = f.read().split()
                with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in wanted))

    def share_kubelet_dir(self):
        """The kubelet's root directory, made a shared mount and also mounted at
        /var/lib/kubelet, where Velero's node-agent template (and so every pod Velero's
        exposers create) mounts `pods` and `plugins` by hostPath with HostToContainer
        propagation, which containerd refuses unless the path is on a shared or slave mount.
        The kubelet also puts its device-plugin socket under /var/lib/kubelet whatever its root.
        Skipped when /var/lib/kubelet exists (another kubelet's): then the pods Velero's
        exposers create cannot start here."""
        os.makedirs(self.kubelet_dir, exist_ok=True)
        sh("mount", "--bind", self.kubelet_dir, self.kubelet_dir)
        sh("mount", "--make-shared", self.kubelet_dir)
        if os.path.exists(VAR_LIB_KUBELET):
            return
        os.makedirs(VAR_LIB_KUBELET)
        self.var_lib_kubelet = VAR_LIB_KUBELET
        sh("mount", "--bind", self.kubelet_dir, VAR_LIB_KUBELET)

    def make_pki(self):
        """The kubelet's client certificate (system:node:<name> in system:nodes, what the Node
        authorizer expects) and its serving certificate for the node address, both signed by
        the cluster CA."""
        pki = self.cp.pki
        harness.make_cert(pki, "ca", "kubelet-client",
                          f"/O=system:nodes/CN=system:node:{self.name}",
                          "extendedKeyUsage=clientAuth\n")
        harness.make_cert(pki, "ca", "kubelet-serving", f"/CN={self.name}",
                          f"subjectAltName=IP:{self.gateway},DNS:{self.name}\n"
                          "extendedKeyUsage=serverAuth\n")

    def write_containerd_config(self):
        d = self.dir
        restrict_oom = not can_lower_oom_score()
        config = f"""version = 2
root = "{d}/containerd-root"
state = "{d}/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{d}/containerd-debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE (sandboxed machines): the -998 the CRI plugin gives every
  # pod sandbox cannot be written, and runc fails the sandbox. Clamp to containerd's own
  # score instead, as for rootless containerd.
  restrict_oom_score_adj = {"true" if restrict_oom else "false"}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"""
        path = os.path.join(d, "containerd.toml")
        with open(path, "w") as f:
            f.write(config)
        return path

    def write_cni_config(self):
        """bridge (adopting our bridge, gateway = node address) + host-local + portmap; the CRI
        plugin runs loopback itself."""
        conf_dir = os.path.join(self.dir, "cni-conf")
        os.makedirs(conf_dir, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0", "name": self.cni_network,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local",
                          "ranges": [[{"subnet": str(self.subnet), "gateway": self.gateway}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": os.path.join(self.dir, "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        with open(os.path.join(conf_dir, "10-imds-broker.conflist"), "w") as f:
            json.dump(conflist, f, indent=1)

    def start_containerd(self):
        config = self.write_containerd_config()
        self.write_cni_config()
        proc = Proc("containerd", ["containerd", "--config", config], self.log_dir).start()
        self.procs.append(proc)
        self.containerd = proc
        wait_for("containerd socket", lambda: self.ctr("version", check=False).returncode == 0,
                 30, interval=0.2, proc=proc.popen, log=proc.log)

    def write_kubelet_config(self):
        pki = self.cp.pki
        kubeconfig = os.path.join(self.cp.dir, "kubelet.kubeconfig")
        self.cp.write_kubeconfig(kubeconfig, {
            "client-certificate": f"{pki}/kubelet-client.crt",
            "client-key": f"{pki}/kubelet-client.key"})
        self.kubelet_port = free_port()
        self.healthz_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # This machine boots cgroup v1; kubelet 1.35+ refuses it unless told not to.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "failSwapOn": False,
            # Without CAP_SYS_RESOURCE the kubelet cannot lower its own score (default -999).
            **({} if can_lower_oom_score() else {"oomScoreAdj": 0}),
            "address": self.gateway, "port": self.kubelet_port,
            "healthzBindAddress": "127.0.0.1", "healthzPort": self.healthz_port,
            "readOnlyPort": 0,
            "tlsCertFile": f"{pki}/kubelet-serving.crt",
            "tlsPrivateKeyFile": f"{pki}/kubelet-serving.key",
            "authentication": {"anonymous": {"enabled": False},
                               "webhook": {"enabled": True},
                               "x509": {"clientCAFile": f"{pki}/ca.crt"}},
            "authorization": {"mode": "Webhook"},
            "podLogsDir": os.path.join(self.dir, "pod-logs"),
            "registerNode": True,
            "maxPods": 30,
            # The test images are imported, never pulled: nothing may garbage-collect them,
            # and a machine with little free disk must not evict the tests' pods.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
        }
        path = os.path.join(self.dir, "kubelet-config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path, kubeconfig

    def start_kubelet(self):
        config, kubeconfig = self.write_kubelet_config()
        proc = Proc("kubelet", [
            os.path.join(self.bin_dir, "kubelet"),
            "--config", config, "--kubeconfig", kubeconfig,
            "--hostname-override", self.name, "--node-ip", self.gateway,
            "--root-dir", self.kubelet_dir,
            "--cert-dir", os.path.join(self.dir, "kubelet-pki"),
            "--v", "2",
        ], self.log_dir).start()
        self.procs.append(proc)
        self.kubelet = proc

    def start_scheduler(self):
        proc = Proc("kube-scheduler", [
            os.path.join(self.bin_dir, "kube-scheduler"),
            "--kubeconfig", self.cp.kubeconfig,
            "--authentication-kubeconfig", self.cp.kubeconfig,
            "--authorization-kubeconfig", self.cp.kubeconfig,
            "--leader-elect=false",
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
        ], self.log_dir).start()
        self.procs.append(proc)

    kube_proxy_used = False

    def start_kube_proxy(self):
        """kube-proxy in nftables mode: everything it programs lives in its own `kube-proxy`
        nftables tables (ip and ip6), removed by `kube-proxy --cleanup` on stop."""
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": self.cp.kubeconfig},
            "hostnameOverride": self.name,
            "bindAddress": self.gateway,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "clusterCIDR": str(self.subnet),
            # No conntrack tuning: the machine's sysctls are not ours to change.
            "conntrack": {"maxPerCore": 0, "min": 0,
                          "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        path = os.path.join(self.dir, "kube-proxy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        self.kube_proxy_used = True
        proc = Proc("kube-proxy", [os.path.join(self.bin_dir, "kube-proxy"), "--config", path],
                    self.log_dir).start()
        self.procs.append(proc)

    def ready(self):
        node = self.cp.admin.get(f"/api/v1/nodes/{self.name}")
        for c in node.get("status", {}).get("conditions", []):
            if c["type"] == "Ready" and c["status"] == "True":
                return node
        return None

    def start(self, images=(), scheduler=True, kube_proxy=False):
        """Starts the node; `images` are (archive, base_name) pairs imported before the
        kubelet starts (the pause image first). Returns the Ready Node object."""
        started = time.monotonic()
        if not getattr(self, "bridge_made", False):
            self.create_bridge()
        self.make_cgroup_root()
        self.share_kubelet_dir()
        self.make_pki()
        self.start_containerd()
        self.import_image(os.path.join(self.images_dir, "pause.oci.tar"), "localhost/pause")
        for archive, base in images:
            self.import_image(archive, base)
        if scheduler:
            self.start_scheduler()
        if kube_proxy:
            self.start_kube_proxy()
        self.start_kubelet()
        node = wait_for(f"node {self.name} Ready", self.ready, 120, interval=0.5,
                        proc=self.kubelet.popen, log=self.kubelet.log)
        self.startup_seconds = time.monotonic() - started
        return node

    # -- stop ------------------------------------------------------------------------------

    def stop(self, leftovers=True):
        """Stops what start() started and (`leftovers`) removes what it made, in an order that
        lets each component clean up after itself first, then removes whatever is left. An API
        server listening on the bridge's address is stopped before the bridge goes: call with
        leftovers=False, stop it, then teardown_leftovers(node.state_for_teardown())."""
        errors = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - tear down the rest, report at the end
                errors.append(f"{what}: {e}")

        by_name = {p.name: p for p in self.procs}
        for name in ("kube-scheduler", "kubelet"):
            if name in by_name:
                attempt(f"stop {name}", by_name[name].stop)
        containerd = by_name.get("containerd")
        if containerd and containerd.running() and os.path.exists(self.socket):
            attempt("stop the pods' containers", self.kill_containers)
        if "kube-proxy" in by_name:
            attempt("stop kube-proxy", by_name["kube-proxy"].stop)
        if "containerd" in by_name:
            attempt("stop containerd", by_name["containerd"].stop)
        if leftovers:
            errors += teardown_leftovers(self.state_for_teardown())
        if errors:
            raise RuntimeError("node teardown: " + "; ".join(errors))

    def state_for_teardown(self):
        s = {"dir": self.dir, "bridge": self.bridge, "cni_network": self.cni_network,
             "cgroup_root": self.cgroup_root, "socket": self.socket,
             "kube_proxy": self.kube_proxy_used, "var_lib_kubelet": self.var_lib_kubelet,
             "run_containerd_made": self.run_containerd_made,
             "var_lib_cni_made": self.var_lib_cni_made,
             "cni_results_before": self.cni_results_before,
             "kube_proxy_bin": os.path.join(self.bin_dir, "kube-proxy")}
        return s

    def kill_containers(self):
        kill_containers(self.socket)


def kill_containers(socket):
    """Every task of our containerd killed and deleted, every sandbox's network namespace
    removed (the kubelet, when it had the time, has done this already through the CRI)."""
    def ctr(*args, check=False):
        return sh("ctr", "--address", socket, "--namespace", "k8s.io", *args, check=check)

    netns = set()
    for cid in ctr("containers", "ls", "-q").stdout.split():
        info = ctr("containers", "info", cid)
        try:
            spec = json.loads(info.stdout).get("Spec", {})
        except ValueError:
            continue
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                netns.add(os.path.basename(ns["path"]))
    for line in ctr("tasks", "ls").stdout.splitlines()[1:]:
        cid = line.split()[0]
        ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        ctr("tasks", "delete", "--force", cid)
    for cid in ctr("containers", "ls", "-q").stdout.split():
        ctr("containers", "delete", cid)
    for name in netns:
        if os.path.exists(f"/var/run/netns/{name}"):
            sh("ip", "netns", "delete", name, check=False)


def proc_start_time(pid):
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the
    PID it identifies the process, so a later `down` never signals a reused PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # A zombie has exited: its reaper (init, once `up` has exited) may take a while.
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def stop_pid(pid, start, timeout=15):
    """SIGTERM, then SIGKILL, to the process `pid` if it is still the one started at `start`."""
    if start is None or proc_start_time(pid) != start:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_start_time(pid) != start:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def teardown_leftovers(s):
    """Removes what a node made, whatever state its processes are in; returns errors."""
    errors = []

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{what}: {e}")

    # containerd's shims carry our socket on their command line (`-address <socket>`).
    for pid in pids_with_arg(s["socket"]):
        start = proc_start_time(pid)
        attempt(f"stop shim {pid}", lambda: stop_pid(pid, start, timeout=5))
    if s.get("kube_proxy") and os.path.exists(s.get("kube_proxy_bin", "")):
        attempt("kube-proxy --cleanup", lambda: sh(s["kube_proxy_bin"], "--cleanup",
                                                    check=False))
    # Mounts stack (a bind over a bind, propagated peers): unmount until none is left.
    ours = [s["dir"]] + ([s["var_lib_kubelet"]] if s.get("var_lib_kubelet") else [])
    for _ in range(10):
        left = mounts_under(*ours)
        if not left:
            break
        for mp in left:
            sh("umount", "--lazy", mp, check=False)
    if mounts_under(*ours):
        errors.append(f"still mounted: {mounts_under(*ours)}")
    elif s.get("var_lib_kubelet") and os.path.isdir(s["var_lib_kubelet"]):
        attempt(f"remove {s['var_lib_kubelet']}", lambda: shutil.rmtree(s["var_lib_kubelet"]))
    if os.path.exists(f"/sys/class/net/{s['bridge']}"):
        attempt(f"delete bridge {s['bridge']}", lambda: sh("ip", "link", "delete", s["bridge"]))
    for mountpoint, _ in cgroup_hierarchies():
        root = mountpoint + s["cgroup_root"]
        if not os.path.isdir(root):
            continue
        dirs = sorted((d for d, _, _ in os.walk(root)), key=len, reverse=True)
        for d in dirs:
            attempt(f"rmdir {d}", lambda: rmdir_cgroup(d))
    before = set(s.get("cni_results_before", []))
    for cached in (glob.glob(f"{CNI_RESULTS}/{s['cni_network']}-*")
                   + glob.glob(f"{CNI_RESULTS}/cni-loopback-*")):
        if os.path.basename(cached) not in before:
            attempt(f"remove {cached}", lambda: os.remove(cached))
    if s.get("var_lib_cni_made"):
        remove_empty_tree("/var/lib/cni")
    if s.get("run_containerd_made") and not pids_named("containerd"):
        remove_empty_tree(RUN_CONTAINERD)
    # Never a recursive delete across a mount point that is still there.
    if os.path.exists(s["dir"]) and not mounts_under(s["dir"]):
        attempt(f"remove {s['dir']}", lambda: shutil.rmtree(s["dir"]))
    return errors


def remove_empty_tree(top):
    """Removes `top` if it holds only (nested) empty directories."""
    if not os.path.isdir(top):
        return
    for d, _, files in sorted(os.walk(top), key=lambda x: len(x[0]), reverse=True):
        if files:
            return
        try:
            os.rmdir(d)
        except OSError:
            return


def pids_named(name):
    """PIDs of processes whose program name is `name` (another containerd on the machine)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            argv = proc_cmdline(int(d))
            if argv and os.path.basename(argv[0].decode(errors="replace")) == name:
                out.append(int(d))
    return out


def rmdir_cgroup(d, timeout=10):
    # A cgroup is removable once its last process has exited, which the kernel finishes
    # shortly after the process is reaped.
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(d)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)

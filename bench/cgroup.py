"""A memory cgroup for one process under test, so a benchmark shows whether it survives the
memory limit a pod would give it (the kernel's OOM killer is the judge, not an RSS reading).

cgroup v2 (a `memory` controller on /sys/fs/cgroup) or v1 (/sys/fs/cgroup/memory). Where
neither can be written (not root, no controller), `MemoryLimit.available` is False and `why`
says why: the caller prints it and goes on without the limit.
"""
import os
from pathlib import Path


class MemoryLimit:
    def __init__(self, name, limit_bytes):
        self.limit = limit_bytes
        self.dir = None
        self.v2 = False
        self.why = ""
        v2root, v1root = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        try:
            if "memory" in (v2root / "cgroup.controllers").read_text().split():
                self.dir, self.v2 = v2root / f"{name}-{os.getpid()}", True
        except OSError:
            pass
        if self.dir is None and (v1root / "memory.limit_in_bytes").exists():
            self.dir = v1root / f"{name}-{os.getpid()}"
        if self.dir is None:
            self.why = "no writable memory cgroup (neither v2 nor v1 memory controller)"
            return
        try:
            self.dir.mkdir(exist_ok=True)
            if self.v2:
                (self.dir / "memory.max").write_text(str(limit_bytes))
                (self.dir / "memory.swap.max").write_text("0")
            else:
                (self.dir / "memory.limit_in_bytes").write_text(str(limit_bytes))
                try:
                    (self.dir / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                except OSError:
                    pass  # no swap accounting: fine, this machine has no swap in use
        except OSError as e:
            self.why = f"cannot set up {self.dir}: {e}"
            self.close()
            self.dir = None

    @property
    def available(self):
        return self.dir is not None

    def preexec(self):
        """For `subprocess.Popen(preexec_fn=...)`: the child joins the cgroup before it execs,
        so all of its memory is charged (charges do not move with a process moved later)."""
        procs = self.dir / "cgroup.procs"
        return lambda: procs.write_text(str(os.getpid()))

    def peak_bytes(self):
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.dir / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self):
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.dir / name).read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def close(self):
        if self.dir is not None:
            try:
                self.dir.rmdir()
            except OSError:
                pass

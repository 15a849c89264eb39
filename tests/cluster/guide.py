"""docs/velero-on-aks.md as a script: its marked shell blocks, and one bash session that runs them
verbatim, as a reader's terminal would (test_06_guide.py).

Every ```sh block of the guide carries a marker comment on the line right before its fence:

    <!-- guide: KIND -->  or  <!-- guide: KIND mode=MODE -->

KIND says what the cluster test does with the block (KINDS below); MODE limits it to one
install mode. A shell block without a marker, an unknown KIND or MODE, or a marker that is not
followed by a shell block fails the parse: nothing in the guide goes unrun without saying why.
"""

import os
import queue
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

KINDS = {
    "run": "run verbatim in the cluster test",
    "pods": "needs running pods (rollout status, the velero CLI against the server): the "
            "cluster stage has no kubelet",
    "azure": "az commands: checked against azure-cli's command table by scripts/check-guide-az",
    "external": "a third-party install (cert-manager's chart): the cert_manager fixture "
                "stands in for it",
    "alternative": "another install path (manual TLS): test_01_install.py runs it",
}
MODES = ("node", "sidecar")
SHELL_LANGS = {"sh", "bash", "shell"}
MARKER = re.compile(r"<!-- guide: (?P<kind>\S+)(?: mode=(?P<mode>\S+))? -->")


class GuideError(Exception):
    pass


@dataclass
class Block:
    kind: str
    mode: str | None  # None: both modes
    text: str  # the block's lines, verbatim, with a final newline
    line: int  # 1-based line of the opening fence
    section: str  # the `## ` heading it is under

    @property
    def id(self):
        return f"L{self.line}-{self.kind}" + (f"-{self.mode}" if self.mode else "")

    def for_mode(self, mode):
        return self.mode in (None, mode)

    def summary(self):
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"line {self.line} ({self.section}): {first}"


def parse(text, path="docs/velero-on-aks.md"):
    """The guide's shell blocks in document order. Raises GuideError listing every unmarked
    block and every malformed or orphaned marker."""
    lines = text.splitlines()
    blocks, problems = [], []
    section = "(top)"
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        if line.startswith("```"):
            lang = line[3:].strip().split(" ")[0].lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise GuideError(f"{path}:{i + 1}: fence never closed")
            prev = lines[i - 1].strip() if i > 0 else ""
            marked = prev.startswith("<!--") and "guide:" in prev
            if lang in SHELL_LANGS:
                m = MARKER.fullmatch(prev)
                if not marked:
                    problems.append(f"{path}:{i + 1}: ```{lang} block without a marker on the line "
                                    f"before it (one of <!-- guide: {'|'.join(KINDS)} [mode=node|sidecar] -->)")
                elif not m:
                    problems.append(f"{path}:{i}: malformed marker {prev!r}")
                elif m["kind"] not in KINDS:
                    problems.append(f"{path}:{i}: unknown kind {m['kind']!r} (known: {', '.join(KINDS)})")
                elif m["mode"] is not None and m["mode"] not in MODES:
                    problems.append(f"{path}:{i}: unknown mode {m['mode']!r} (known: {', '.join(MODES)})")
                else:
                    blocks.append(Block(m["kind"], m["mode"], "\n".join(lines[i + 1:end]) + "\n",
                                        i + 1, section))
            elif marked:
                problems.append(f"{path}:{i}: a guide marker before a ```{lang} block (markers are "
                                "for shell blocks)")
            i = end + 1
            continue
        if line.startswith("<!--") and "guide:" in line:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if not nxt.startswith("```"):
                problems.append(f"{path}:{i + 1}: marker {line!r} not followed by a fence")
        i += 1
    if problems:
        raise GuideError("the guide's shell blocks are not all marked:\n  " + "\n  ".join(problems))
    return blocks


class BlockFailed(Exception):
    def __init__(self, block, output, why):
        super().__init__(f"guide block at {block.summary()} {why}:\n{block.text}--- output:\n{output}")
        self.block = block
        self.output = output


class Shell:
    """One bash session (`set -euo pipefail`) in which blocks run one after another, so what one
    block sets (the env file it sources) holds for the next, as in the reader's terminal. Each
    block is written to a file and sourced with stdin from /dev/null: its text runs verbatim,
    and no command in it can read the next block as its input. A failing command ends the
    session (set -e): the block is reported with its output."""

    def __init__(self, cwd, env, log_path, echo=print):
        self.cwd = cwd
        self.blocks_dir = os.path.join(cwd, ".guide-blocks")
        os.makedirs(self.blocks_dir, exist_ok=True)
        self.log = open(log_path, "a")
        self.echo = echo
        self.count = 0
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send("set -euo pipefail\n")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, text):
        try:
            self.proc.stdin.write(text)
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError("the guide's shell has ended (an earlier block failed: see its "
                               "report above)") from None

    def run(self, block, timeout=300):
        """Runs the block; returns its output (stdout and stderr, interleaved)."""
        self.count += 1
        path = os.path.join(self.blocks_dir, f"{self.count:02d}-{block.id}.sh")
        with open(path, "w") as f:
            f.write(block.text)
        done = f"guide-block-done-{secrets.token_hex(8)}"
        mode = f" mode={block.mode}" if block.mode else ""
        self._write_log(f"\n# --- guide line {block.line} ({block.section}), {block.kind}{mode}\n"
                        + block.text + "# output:\n")
        started = time.monotonic()
        self._send(f"source {shlex.quote(path)} </dev/null\nprintf '\\n%s\\n' {done}\n")
        out = []
        deadline = started + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise BlockFailed(block, "".join(out), f"did not finish within {timeout}s") from None
            if line is None:
                rc = self.proc.wait()
                raise BlockFailed(block, "".join(out), f"failed: the shell exited with {rc}")
            if line.rstrip("\n") == done:
                break
            out.append(line)
            self._write_log(line)
        text = "".join(out)
        text = text[:-1] if text.endswith("\n") else text  # the newline printed before `done`
        self._write_log(f"# ({time.monotonic() - started:.1f}s)\n")
        return text

    def _write_log(self, text):
        self.log.write(text)
        self.log.flush()
        self.echo(text.rstrip("\n"))

    def kill(self):
        """The session's process group (with a command still running in it, e.g. a hung
        kubectl): the shell's own PID is the group's ID."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def close(self):
        if self.proc.poll() is None:
            try:
                self._send("exit\n")
                self.proc.wait(10)
            except (RuntimeError, subprocess.TimeoutExpired):
                self.kill()
        if not self.log.closed:
            self.log.close()

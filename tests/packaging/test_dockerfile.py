"""The Dockerfile builds with the classic (non-BuildKit) builder, and its runtime stage is the
image the project promises: distroless/static, non-root 65532, OCI labels.

Parsed with dockerfile-parse (PyPI), which splits instructions the way the Docker builder does
(line continuations, comments, ARG substitution in LABEL values).
"""

import os
import re
import subprocess
import tempfile

import pytest
from dockerfile_parse import DockerfileParser

from conftest import ROOT, cargo_version

DOCKERFILE = ROOT / "Dockerfile"

# Flags the classic builder accepts, per instruction. Everything else (RUN --mount/--network/
# --security, COPY/ADD --chmod/--link/--parents/--exclude/--checksum/--keep-git-dir, ...)
# needs BuildKit.
CLASSIC_FLAGS = {
    "FROM": {"platform"},
    "COPY": {"from", "chown"},
    "ADD": {"chown"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "retries"},
}
# Build args only BuildKit defines automatically.
BUILDKIT_ARGS = re.compile(r"\$\{?(BUILD|TARGET)(PLATFORM|OS|ARCH|VARIANT)\b")
# Parser directives (comments at the very top): `syntax` and `check` select BuildKit frontends.
DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(.*)$")


def buildkit_only(text):
    """Every construct in a Dockerfile's text that the classic builder cannot build."""
    problems = []
    for line in text.splitlines():
        m = DIRECTIVE.match(line.strip())
        if not m:
            break  # directives end at the first line that is not one
        if m.group(1).lower() in ("syntax", "check"):
            problems.append(f"parser directive `{line.strip()}`")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "Dockerfile")
        with open(path, "w") as f:
            f.write(text)
        structure = DockerfileParser(path=path).structure
    for ins in structure:
        name, value = ins["instruction"], ins["value"]
        if name == "COMMENT":
            continue
        flags = re.findall(r"(?:^|\s)--([a-z-]+)(?:=|\s|$)", _leading_flags(value))
        for flag in flags:
            if flag not in CLASSIC_FLAGS.get(name, set()):
                problems.append(f"line {ins['startline'] + 1}: {name} --{flag}")
        if name in ("RUN", "COPY", "ADD") and re.search(r"<<-?\s*['\"]?[A-Za-z_]+", value):
            problems.append(f"line {ins['startline'] + 1}: {name} heredoc")
        if BUILDKIT_ARGS.search(value):
            problems.append(f"line {ins['startline'] + 1}: BuildKit-only automatic build arg")
    return problems


def _leading_flags(value):
    """The `--flag[=value]` words before an instruction's arguments."""
    words = []
    for word in value.split():
        if not word.startswith("--"):
            break
        words.append(word)
    return " ".join(words)


@pytest.fixture(scope="module")
def dockerfile():
    return DockerfileParser(path=str(DOCKERFILE))


def runtime_stage(parser):
    """Instructions of the last stage (after the last FROM)."""
    stage = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            stage = []
        stage.append(ins)
    return stage


def test_no_buildkit_only_syntax():
    assert buildkit_only(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("# syntax=docker/dockerfile:1\nFROM scratch\n", "parser directive"),
        ("FROM rust\nRUN --mount=type=cache,target=/x cargo build\n", "RUN --mount"),
        ("FROM rust\nRUN --network=none true\n", "RUN --network"),
        ("FROM scratch\nCOPY --chmod=0755 a /a\n", "COPY --chmod"),
        ("FROM scratch\nCOPY --link a /a\n", "COPY --link"),
        ("FROM debian\nRUN <<EOF\necho hi\nEOF\n", "heredoc"),
        ("FROM --platform=$BUILDPLATFORM rust\n", "automatic build arg"),
    ],
)
def test_checker_catches_buildkit_only_syntax(snippet, expected):
    """The check itself can fail: each BuildKit-only construct is reported."""
    problems = buildkit_only(snippet)
    assert any(expected in p for p in problems), problems


def test_checker_accepts_classic_flags():
    ok = "FROM --platform=linux/amd64 rust AS b\nCOPY --from=b --chown=1:1 /a /a\n"
    assert buildkit_only(ok) == []


def test_previous_dockerfile_would_fail():
    """The Dockerfile before this change used cache mounts: the check names them."""
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", "3e54744:Dockerfile"],
        capture_output=True, text=True,
    )
    if old.returncode != 0:
        pytest.skip("commit 3e54744 not in this clone (shallow)")
    problems = buildkit_only(old.stdout)
    assert any("RUN --mount" in p for p in problems), problems


def test_runtime_is_distroless_static_nonroot(dockerfile):
    assert dockerfile.baseimage == "gcr.io/distroless/static-debian12:nonroot"
    users = [i["value"] for i in runtime_stage(dockerfile) if i["instruction"] == "USER"]
    assert users == ["65532:65532"], users
    entry = [i["value"] for i in runtime_stage(dockerfile) if i["instruction"] == "ENTRYPOINT"]
    assert entry == ['["/imds-broker"]'], entry


def test_build_stage_uses_build_release(dockerfile):
    runs = " ".join(i["value"] for i in dockerfile.structure if i["instruction"] == "RUN")
    assert "scripts/build-release" in runs, "the image ships the binary scripts/build-release makes"


def test_oci_labels(dockerfile):
    labels = dockerfile.labels
    assert labels["org.opencontainers.image.version"] == cargo_version(), labels
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://"), labels
    assert labels["org.opencontainers.image.title"] == "imds-broker"


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for path in ("target/", ".git/", ".venv/", "charts/", "deploy/"):
        assert path in ignored, f"{path} missing from .dockerignore"

"""Shared paths and helpers of the packaging tests (tests/packaging, run by
scripts/test-packaging.sh)."""

import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# tests/validate_k8s.py: its schema and consistency checks are reused for the Helm chart.
sys.path.insert(0, str(ROOT / "tests"))


def cargo_version():
    """The crate's version, from Cargo.toml's [package] table."""
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert m, "no [package] version in Cargo.toml"
    return m.group(1)


def env_path(name):
    """A path the stage script passes in (IMDS_BROKER_PKG_*), or None when not set."""
    value = os.environ.get(name)
    return pathlib.Path(value) if value else None

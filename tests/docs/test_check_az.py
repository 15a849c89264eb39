"""Self-test of check_az.py against the installed azure-cli (run by hand, not by scripts/test):

    scripts/check-guide-az --selftest

Each sample command is one kind of verdict; the checker runs as the wrapper runs it, as a
program on a markdown file.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import check_az  # noqa: E402

try:
    import azure.cli.core  # noqa: F401
except ImportError:  # a skip would read as a pass: this test exists to exercise azure-cli
    pytest.fail("azure-cli is not importable here: run scripts/check-guide-az --selftest",
                pytrace=False)

SAMPLE = """\
# Sample

Prose mentioning `az identity shwo` is not checked.

```sh
RG=rg IDENTITY=id   # variables
az identity show -g "$RG" -n "$IDENTITY" --query clientId -o tsv
az identity shwo -g "$RG" -n "$IDENTITY"
az identity show -g "$RG" -n "$IDENTITY" --no-such-flag yes
az identity federated-credential create -g "$RG" --identity-name "$IDENTITY" \\
  --issuer "$ISSUER" --subject system:serviceaccount:velero:velero-server \\
  --audiences api://AzureADTokenExchange
az identity federated-credential create -g "$RG" --identity-name "$IDENTITY" \\
  --name velero-server \\
  --issuer "$ISSUER" --subject system:serviceaccount:velero:velero-server
# az identity shwo in a comment is not a command
az account list --subscription "$SUB" --query "[].id" -o tsv
SUB=$(az account show --query id -o tsv); az role assignment create --role Reader \\
  --scope "$(az storage account show -n "$SA" --query id --output yml)" --assignee x
az identity show -n "$IDENTITY"
az identity show --ids "$ID"
```

```yaml
az: identity shwo   # not a shell block
```
"""

# line -> (command path, verdict regex); every command of SAMPLE, in order.
EXPECTED = [
    (7, "az identity show", r"^OK$"),
    (8, "az identity shwo", r"^unknown command 'az identity shwo' \(did you mean: show"),
    (9, "az identity show", r"^unknown option --no-such-flag$"),
    (10, "az identity federated-credential create", r"^missing required argument -n/--name$"),
    (13, "az identity federated-credential create", r"^OK$"),
    (17, "az account list", r"^unknown option --subscription \(this command takes no subscription"),
    (18, "az account show", r"^OK$"),
    (18, "az role assignment create", r"^OK$"),
    (19, "az storage account show",
     r"^--output yml: not one of json, jsonc, yaml, yamlc, table, tsv, none$"),
    (20, "az identity show", r"^missing required argument -g/--resource-group \(or --ids\)$"),
    (21, "az identity show", r"^OK$"),
]


def run_checker(tmp_path, text):
    md = tmp_path / "sample.md"
    md.write_text(text)
    env = dict(os.environ)
    # azure-cli writes its config and command index here, not into ~/.azure.
    env.setdefault("AZURE_CONFIG_DIR", str(tmp_path / "azure-config"))
    env["AZURE_CORE_COLLECT_TELEMETRY"] = "false"
    proc = subprocess.run([sys.executable, str(HERE / "check_az.py"), str(md)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    verdicts = []
    for line in proc.stdout.splitlines():
        m = re.match(r"^.*sample\.md:(\d+): (az[^:]*): (.*)$", line)
        if m:
            verdicts.append((int(m.group(1)), m.group(2), m.group(3)))
    return proc, verdicts


def test_verdicts_of_each_kind(tmp_path):
    proc, verdicts = run_checker(tmp_path, SAMPLE)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [(line, cmd) for line, cmd, _ in verdicts] == [(line, cmd) for line, cmd, _ in EXPECTED], \
        proc.stdout
    for (line, cmd, verdict), (_, _, pattern) in zip(verdicts, EXPECTED):
        assert re.search(pattern, verdict), "%d %s: %r does not match %r" % (line, cmd, verdict, pattern)
    assert proc.stdout.rstrip().endswith("11 az commands in 1 files, 6 with problems"), proc.stdout


def test_all_good_exits_zero(tmp_path):
    # Every global argument, on a command that also takes --subscription.
    good = ("```bash\naz identity show -g rg -n id --only-show-errors --debug --verbose \\\n"
            "  --subscription s --query name --output json -o tsv\n```\n")
    proc, verdicts = run_checker(tmp_path, good)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verdicts == [(2, "az identity show", "OK")]


def test_extraction_keeps_lines_and_joins_continuations():
    text = "\n".join([
        "```sh",
        "X=$(az a b --c \"$(az d e)\") && az f \\",
        "  --g 'h i'  # az not-this",
        "cat <<EOF",
        "az not-in-heredoc 'unbalanced",
        "ID=$(az in-heredoc --x y)",
        "EOF",
        "cat <<'EOF' >f",
        "ID=$(az not-in-literal-heredoc)",
        "EOF",
        "echo \"az x\" | az k",
        "```",
    ]) + "\n"
    found = [(line, [w.text for w in args]) for line, args in check_az.extract_text(text)]
    assert found == [
        (2, ["a", "b", "--c", "$(…)"]),
        (2, ["d", "e"]),
        (2, ["f", "--g", "h i"]),
        (6, ["in-heredoc", "--x", "y"]),
        (11, ["k"]),
    ]


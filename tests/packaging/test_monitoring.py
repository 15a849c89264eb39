"""deploy/monitoring/ and the chart's monitoring objects:

- the PodMonitors and PrometheusRules decode strictly into the Prometheus Operator's own Go
  types (monitoringcheck, built from tests/packaging/tools);
- the rules file passes `promtool check rules`, and prometheusrule.yml holds the same rules;
- what they select matches the pods: the sidecar's admin port name (src/webhook/patch/sidecar.rs),
  the webhook's port and labels (deploy/base) and node mode's labels and admin port
  (deploy/node), in the PodMonitors and the plain scrape config;
- every metric an alert uses is a documented metric (or a kube-state-metrics one).
"""

import re
import subprocess

import pytest
import yaml

from conftest import ROOT, env_path

MON = ROOT / "deploy" / "monitoring"
CHECK = env_path("IMDS_BROKER_PKG_MONITORINGCHECK")
HELM = env_path("IMDS_BROKER_PKG_HELM")
needs_tools = pytest.mark.skipif(not (CHECK and HELM), reason="run through scripts/test-packaging.sh")


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def sidecar_port_name():
    src = (ROOT / "src" / "webhook" / "patch" / "sidecar.rs").read_text()
    m = re.search(r'ports: Some\(vec!\[ContainerPort \{\s*name: Some\("([a-z0-9-]+)"', src)
    assert m, "sidecar port name not found in src/webhook/patch/sidecar.rs"
    return m.group(1)


def webhook_pod():
    (dep,) = [d for d in load(ROOT / "deploy" / "base" / "deployment.yaml")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    return dep["spec"]["template"]["metadata"]["labels"], ports


def test_promtool_check_rules():
    res = subprocess.run(["promtool", "check", "rules", str(MON / "imds-broker.rules.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "SUCCESS: 14 rules found" in res.stdout, res.stdout + res.stderr


def test_promtool_check_catches_a_broken_rule(tmp_path):
    """The check can fail: a rule with a PromQL syntax error is refused."""
    bad = tmp_path / "bad.rules.yml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: X\n    expr: sum(rate(x[5m])\n")
    res = subprocess.run(["promtool", "check", "rules", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0


def test_prometheusrule_holds_the_rules_file():
    (rule,) = load(MON / "prometheusrule.yml")
    assert rule["spec"] == yaml.safe_load((MON / "imds-broker.rules.yml").read_text()), (
        "deploy/monitoring/prometheusrule.yml is out of date with imds-broker.rules.yml"
    )


@needs_tools
def test_operator_objects_decode_strictly(tmp_path):
    files = [MON / "podmonitor.yml", MON / "prometheusrule.yml"]
    for mode in ("sidecar", "node"):
        chart = subprocess.run(
            [str(HELM), "template", "imds-broker", str(ROOT / "charts" / "imds-broker"),
             "--namespace", "imds-broker", "--set", "image.repository=registry.example/imds-broker",
             "--set", f"mode={mode}", "--set", "identity.clientId=c", "--set", "identity.tenantId=t",
             "--set", "monitoring.podMonitor.enabled=true",
             "--set", "monitoring.prometheusRule.enabled=true"],
            capture_output=True, text=True, check=True,
        ).stdout
        (tmp_path / f"{mode}.yaml").write_text(chart)
        files.append(tmp_path / f"{mode}.yaml")
    res = subprocess.run([str(CHECK), *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # deploy/monitoring: 3 PodMonitors, 1 rule; sidecar mode: 2 and 1; node mode: 1 and 1.
    assert sorted(res.stdout.splitlines()) == sorted(
        [f"ok PodMonitor imds-broker-{m}" for m in ("sidecar", "webhook", "node")] * 2
        + ["ok PrometheusRule imds-broker"] * 3
    ), res.stdout


@needs_tools
def test_operator_check_catches_an_unknown_field(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\n"
                   "spec:\n  selector: {}\n  podMetricEndpoints: [{port: x}]\n")  # podMetricsEndpoints
    res = subprocess.run([str(CHECK), str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "podMetricEndpoints" in res.stderr, res.stderr


def node_pod():
    """deploy/node's broker pod: its labels and the admin port its env sets."""
    (ds,) = [d for d in load(ROOT / "deploy" / "node" / "daemonset.yaml")]
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    port = int(env["IMDS_BROKER_ADMIN_LISTEN"].rsplit(":", 1)[1])
    return ds["spec"]["template"]["metadata"]["labels"], port, ds["metadata"]["namespace"]


def test_podmonitors_select_the_sidecar_and_the_webhook():
    sidecar, webhook, node = load(MON / "podmonitor.yml")
    assert sidecar["spec"]["podMetricsEndpoints"][0]["port"] == sidecar_port_name()
    assert sidecar["spec"]["namespaceSelector"]["matchNames"] == ["velero"]
    labels, ports = webhook_pod()
    sel = webhook["spec"]["selector"]["matchLabels"]
    assert all(labels.get(k) == v for k, v in sel.items()), (sel, labels)
    port = webhook["spec"]["podMetricsEndpoints"][0]["port"]
    assert ports.get(port) == 8401, f"webhook admin port {port!r}"
    labels, admin, ns = node_pod()
    assert node["metadata"]["namespace"] == ns
    assert all(labels.get(k) == v for k, v in node["spec"]["selector"]["matchLabels"].items())
    (ep,) = node["spec"]["podMetricsEndpoints"]
    assert not {"port", "portNumber", "targetPort"} & set(ep), "the node pods declare no port"
    (address,) = [r for r in ep["relabelings"] if r["targetLabel"] == "__address__"]
    assert address == {"sourceLabels": ["__meta_kubernetes_pod_ip"], "targetLabel": "__address__",
                       "replacement": f"${{1}}:{admin}"}


def test_plain_scrape_config_keeps_the_right_ports():
    cfg = yaml.safe_load((MON / "prometheus-scrape.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    keep = lambda job: [r for r in jobs[job]["relabel_configs"] if r.get("action") == "keep"]
    (k,) = keep("imds-broker-sidecar")
    assert k["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    assert re.fullmatch(k["regex"], sidecar_port_name())
    labels, ports = webhook_pod()
    (k,) = keep("imds-broker-webhook")
    assert re.fullmatch(k["regex"], f"{labels['app.kubernetes.io/component']};admin") and "admin" in ports
    labels, admin, ns = node_pod()
    (k,) = keep("imds-broker-node")
    assert re.fullmatch(k["regex"], f"{labels['app.kubernetes.io/name']};{labels['app.kubernetes.io/component']}")
    (address,) = [r for r in jobs["imds-broker-node"]["relabel_configs"] if r.get("target_label") == "__address__"]
    assert address["replacement"] == f"${{1}}:{admin}"
    assert jobs["imds-broker-node"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == [ns]
    # Every job puts namespace and pod on every series: the alerts group by them.
    for job in jobs.values():
        targets = {r.get("target_label") for r in job["relabel_configs"]}
        assert {"namespace", "pod"} <= targets, job["job_name"]


def test_alerts_use_documented_metrics():
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    documented = set(re.findall(r"^\| `(imds_broker_[a-z_]+)` \|", doc, re.M))
    rules = yaml.safe_load((MON / "imds-broker.rules.yml").read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b(imds_broker_[a-z_]+|kube_[a-z_]+)\b", rule["expr"]))
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    ours = {m for m in used if m.startswith("imds_broker_")}
    assert ours <= documented, f"undocumented metrics in alerts: {sorted(ours - documented)}"
    assert {m for m in used if m.startswith("kube_")} <= {
        "kube_deployment_status_replicas_available", "kube_pod_init_container_status_restarts_total",
        # node mode
        "kube_pod_info", "kube_pod_status_phase", "kube_pod_status_ready",
        "kube_daemonset_status_desired_number_scheduled", "kube_pod_container_status_restarts_total",
    }


def test_node_alerts_name_no_release():
    """The node group matches the DaemonSet under any release name: no exact name of a
    release's object in a matcher."""
    rules = yaml.safe_load((MON / "imds-broker.rules.yml").read_text())
    (group,) = [g for g in rules["groups"] if g["name"] == "imds-broker-node"]
    for rule in group["rules"]:
        exact = re.findall(r'(?:daemonset|created_by_name|pod|deployment)="([^"]*)"', rule["expr"])
        assert not exact, f"{rule['alert']}: exact object names {exact}"

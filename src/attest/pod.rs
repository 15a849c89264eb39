//! What attestation keeps of a pod: who it is (namespace, name, ServiceAccount), whether it
//! shares the node's network, when it was created, and the addresses it holds. A full `Pod`
//! is several KiB; this is a few hundred bytes, and nothing else of the object is needed.

use k8s_openapi::api::core::v1::Pod;
use std::net::IpAddr;

/// Phases in which a pod's containers have all stopped for good: its sandbox is torn down and
/// its address released (and possibly handed to a new pod already).
const TERMINAL_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// A pod that holds addresses on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.serviceAccountName` (`default` when unset, as admission sets it).
    pub service_account: String,
    /// `spec.hostNetwork`: its addresses are the node's, shared by every host process.
    pub host_network: bool,
    /// `metadata.creationTimestamp` in Unix seconds: of two pods holding one address, the
    /// newer one has it now (the older one's sandbox released it first).
    pub created: i64,
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// The pod's entry, or `None` when it holds no address: not started yet (no IP), or
    /// finished (terminal phase), or without a name.
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let status = pod.status.as_ref()?;
        if status
            .phase
            .as_deref()
            .is_some_and(|p| TERMINAL_PHASES.contains(&p))
        {
            return None;
        }
        // `podIPs` lists every family's address; `podIP` (the first of them) is what older
        // API servers and some fakes fill alone.
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return None;
        }
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        Some(PodInfo {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            created: meta
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
            ips,
        })
    }

    /// `namespace/name`, as people and kubectl name a pod.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Test pods, built as the API server would send them.
#[cfg(test)]
pub(crate) mod fixture {
    use k8s_openapi::api::core::v1::Pod;

    /// A running pod `namespace/name` with `sa`, holding `ip`, created at Unix second `created`.
    pub fn pod(namespace: &str, name: &str, sa: &str, ip: &str, created: i64) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": namespace,
                "name": name,
                "resourceVersion": "1",
                "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created)
                    .unwrap()
                    .to_string(),
            },
            "spec": {"serviceAccountName": sa, "nodeName": "node-1", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .expect("a valid pod")
    }

    pub fn host_network(mut pod: Pod) -> Pod {
        pod.spec.as_mut().unwrap().host_network = Some(true);
        pod
    }

    pub fn phase(mut pod: Pod, phase: &str) -> Pod {
        pod.status.as_mut().unwrap().phase = Some(phase.to_owned());
        pod
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    #[test]
    fn a_running_pod_is_kept_with_what_attestation_needs() {
        let info = PodInfo::from_pod(&pod("velero", "mover", "velero-server", "10.1.0.7", 100));
        let info = info.unwrap();
        assert_eq!(info.id(), "velero/mover");
        assert_eq!(info.service_account, "velero-server");
        assert!(!info.host_network);
        assert_eq!(info.created, 100);
        assert_eq!(info.ips, vec!["10.1.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn finished_and_addressless_pods_are_not_kept() {
        let p = pod("velero", "mover", "velero-server", "10.1.0.7", 100);
        for terminal in ["Succeeded", "Failed"] {
            assert_eq!(PodInfo::from_pod(&phase(p.clone(), terminal)), None);
        }
        assert!(PodInfo::from_pod(&phase(p.clone(), "Pending")).is_some());
        let mut pending = p;
        pending.status.as_mut().unwrap().pod_ip = None;
        pending.status.as_mut().unwrap().pod_ips = None;
        assert_eq!(PodInfo::from_pod(&pending), None);
    }
}

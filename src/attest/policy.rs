//! Who may ask: the pods of the allowed namespaces that run as an allowed ServiceAccount, and
//! host-network pods only when that is allowed. A pure function of the pods holding the
//! caller's address (from [`super::index`]).

use super::pod::PodInfo;
use super::refusal::{Reason, Refusal};
use std::net::IpAddr;
use std::sync::Arc;

/// An allowed ServiceAccount: `name` in any allowed namespace, or `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedAccount {
    pub namespace: Option<String>,
    pub name: String,
}

impl AllowedAccount {
    /// `name` or `namespace/name`; anything else is an error naming the value.
    pub fn parse(s: &str) -> Result<AllowedAccount, String> {
        let s = s.trim();
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 253
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match s.split_once('/') {
            None if valid(s) => Ok(AllowedAccount {
                namespace: None,
                name: s.to_owned(),
            }),
            Some((ns, name)) if is_namespace(ns) && valid(name) => Ok(AllowedAccount {
                namespace: Some(ns.to_owned()),
                name: name.to_owned(),
            }),
            _ => Err(format!(
                "{s:?} is not a ServiceAccount: give `name` (in every allowed namespace) or \
                 `namespace/name`, lower-case letters, digits, '-' and '.'"
            )),
        }
    }

    fn admits(&self, pod: &PodInfo) -> bool {
        self.name == pod.service_account
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == pod.namespace)
    }
}

impl std::fmt::Display for AllowedAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Whether `s` can name a namespace (an RFC 1123 label: the API server refuses anything else,
/// so a typo would otherwise make the broker retry a failing list forever).
pub fn is_namespace(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The caller policy of `imds-broker node`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub namespaces: Vec<String>,
    pub accounts: Vec<AllowedAccount>,
    pub host_network: bool,
}

impl Policy {
    /// The verdict on a caller at `ip` held by `holders`: the pod it is, or the refusal.
    ///
    /// - No pod holds it → unknown caller (pods of other namespaces are not watched, so they
    ///   land here too).
    /// - A host-network pod holds it → it is a node address, shared by every host-network pod
    ///   and every process of the node: served only with `--allow-host-network`, and only while
    ///   an allowed host-network pod runs here.
    /// - Otherwise the newest holder is the caller: an address is handed to a new pod only
    ///   after the old pod's sandbox released it, so an older holder is one whose end has not
    ///   been reported yet. Holders created in the same second must all be allowed.
    pub fn judge<'a>(
        &self,
        ip: IpAddr,
        holders: &'a [Arc<PodInfo>],
    ) -> Result<&'a Arc<PodInfo>, Refusal> {
        let ip = ip.to_canonical();
        if holders.is_empty() {
            return Err(Refusal::new(
                Reason::unknown_caller,
                format!(
                    "caller {ip} is no running pod of namespace {} on this node; only pods \
                     there are served",
                    self.namespaces.join(", ")
                ),
            ));
        }
        if holders.iter().any(|p| p.host_network) {
            return self.judge_host_network(ip, holders);
        }
        let newest = holders.iter().map(|p| p.created).max().unwrap_or_default();
        let mut callers = holders.iter().filter(|p| p.created == newest);
        let first = callers.next().unwrap_or(&holders[0]);
        for pod in std::iter::once(first).chain(callers) {
            self.account(ip, pod)?;
        }
        Ok(first)
    }

    fn judge_host_network<'a>(
        &self,
        ip: IpAddr,
        holders: &'a [Arc<PodInfo>],
    ) -> Result<&'a Arc<PodInfo>, Refusal> {
        let pods: Vec<String> = holders.iter().map(|p| p.id()).collect();
        if !self.host_network {
            return Err(Refusal::new(
                Reason::host_network,
                format!(
                    "caller {ip} is an address of the node itself (host-network pod {}), shared \
                     by every process on the node; host-network callers are refused unless \
                     --allow-host-network is set",
                    pods.join(", ")
                ),
            ));
        }
        let mut first_refusal = None;
        for pod in holders.iter().filter(|p| p.host_network) {
            match self.account(ip, pod) {
                Ok(()) => return Ok(pod),
                Err(r) => {
                    first_refusal.get_or_insert(r);
                }
            }
        }
        Err(first_refusal.unwrap_or_else(|| Refusal::new(Reason::host_network, String::new())))
    }

    /// Whether `pod` runs as an allowed ServiceAccount.
    fn account(&self, ip: IpAddr, pod: &PodInfo) -> Result<(), Refusal> {
        if self.accounts.iter().any(|a| a.admits(pod)) {
            return Ok(());
        }
        let allowed: Vec<String> = self.accounts.iter().map(ToString::to_string).collect();
        Err(Refusal::new(
            Reason::service_account,
            format!(
                "caller {ip} is pod {} with ServiceAccount {}; allowed: {}",
                pod.id(),
                pod.service_account,
                allowed.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ns: &str, name: &str, sa: &str, created: i64) -> Arc<PodInfo> {
        Arc::new(PodInfo {
            namespace: ns.into(),
            name: name.into(),
            service_account: sa.into(),
            host_network: false,
            created,
            ips: vec![IP],
        })
    }

    fn host(p: Arc<PodInfo>) -> Arc<PodInfo> {
        Arc::new(PodInfo {
            host_network: true,
            ..(*p).clone()
        })
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 1, 7));

    fn policy(accounts: &[&str], host_network: bool) -> Policy {
        Policy {
            namespaces: vec!["velero".into(), "backup".into()],
            accounts: accounts
                .iter()
                .map(|a| AllowedAccount::parse(a).unwrap())
                .collect(),
            host_network,
        }
    }

    fn refused(p: &Policy, holders: &[Arc<PodInfo>]) -> Refusal {
        p.judge(IP, holders).expect_err("refused")
    }

    #[test]
    fn an_allowed_service_account_in_an_allowed_namespace_is_served() {
        let p = policy(&["velero-server"], false);
        let mover = [info("velero", "mover", "velero-server", 1)];
        assert_eq!(p.judge(IP, &mover).unwrap().id(), "velero/mover");
        // A bare name is allowed in every watched namespace.
        assert!(p
            .judge(IP, &[info("backup", "m", "velero-server", 1)])
            .is_ok());
    }

    #[test]
    fn another_service_account_is_refused_naming_pod_account_and_allowed_ones() {
        let p = policy(&["velero-server"], false);
        let r = refused(&p, &[info("velero", "foo", "default", 1)]);
        assert_eq!(r.reason, Reason::service_account);
        assert_eq!(
            r.description,
            "caller 10.244.1.7 is pod velero/foo with ServiceAccount default; allowed: velero-server"
        );
    }

    #[test]
    fn a_namespaced_account_admits_only_its_namespace() {
        let p = policy(&["velero/velero-server"], false);
        assert!(p
            .judge(IP, &[info("velero", "a", "velero-server", 1)])
            .is_ok());
        let r = refused(&p, &[info("backup", "a", "velero-server", 1)]);
        assert_eq!(r.reason, Reason::service_account);
        assert!(
            r.description.contains("allowed: velero/velero-server"),
            "{r:?}"
        );
    }

    #[test]
    fn an_unknown_address_is_refused_naming_the_watched_namespaces() {
        let r = refused(&policy(&["velero-server"], false), &[]);
        assert_eq!(r.reason, Reason::unknown_caller);
        assert!(r.description.contains("10.244.1.7"), "{r:?}");
        assert!(r.description.contains("namespace velero, backup"), "{r:?}");
    }

    #[test]
    fn host_network_pods_need_the_flag_and_an_allowed_account() {
        let agent = host(info("velero", "agent", "velero-server", 1));
        let broker = host(info("velero", "imds-broker-node-x", "imds-broker-node", 2));
        let off = policy(&["velero-server"], false);
        let r = refused(&off, &[broker.clone(), agent.clone()]);
        assert_eq!(r.reason, Reason::host_network);
        assert!(r.description.contains("--allow-host-network"), "{r:?}");
        let on = policy(&["velero-server"], true);
        let both = [broker.clone(), agent];
        assert_eq!(on.judge(IP, &both).unwrap().id(), "velero/agent");
        // The broker's own pod alone holds the node address: not an allowed account.
        assert_eq!(refused(&on, &[broker]).reason, Reason::service_account);
    }

    #[test]
    fn a_reused_address_belongs_to_the_newest_pod() {
        let p = policy(&["velero-server"], false);
        let old_allowed = info("velero", "old", "velero-server", 100);
        let new_other = info("velero", "new", "default", 200);
        let r = refused(&p, &[old_allowed.clone(), new_other.clone()]);
        assert_eq!(r.reason, Reason::service_account);
        assert!(r.description.contains("velero/new"), "{r:?}");
        // The other way round, the new allowed pod is served despite the old one's object.
        let old_other = info("velero", "old", "default", 100);
        let new_allowed = info("velero", "new", "velero-server", 200);
        let both = [new_allowed, old_other];
        assert_eq!(p.judge(IP, &both).unwrap().id(), "velero/new");
        // Same second: no way to tell which holds it, so both must be allowed.
        let twin = info("velero", "twin", "default", 100);
        assert_eq!(
            refused(&p, &[old_allowed, twin]).reason,
            Reason::service_account
        );
    }

    #[test]
    fn accounts_parse_as_name_or_namespace_slash_name() {
        assert_eq!(
            AllowedAccount::parse(" velero/velero-server ")
                .unwrap()
                .to_string(),
            "velero/velero-server"
        );
        for bad in ["", "a/b/c", "/x", "x/", "Velero", "a b", "a.b/x", "-a/x"] {
            let e = AllowedAccount::parse(bad).unwrap_err();
            assert!(e.contains("not a ServiceAccount"), "{bad}: {e}");
        }
    }
}

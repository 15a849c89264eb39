//! `imds-broker init-network`: put the IMDS address (169.254.169.254) on the pod's loopback
//! interface, so that clients which hard-code `http://169.254.169.254` (Go azidentity, the Rust
//! SDK) reach the broker inside the pod and never the node's real IMDS.
//!
//! Why this works: an address on `lo` puts a `local` route for it in the namespace's `local`
//! routing table, which the kernel consults before `main` (where the pod's default route
//! lives). The pod's packets to 169.254.169.254 are then delivered locally, to whatever listens
//! on `169.254.169.254:80` in this pod — the broker (`serve --listen 169.254.169.254:80`) — and
//! never reach the node's IMDS. The reverse does not hold: a neighbour that routes
//! 169.254.169.254 via this pod's IP reaches the address too, so the broker serves only
//! callers inside the pod (`listener::peers`).
//!
//! Runs as an init container with only `NET_ADMIN`: it speaks rtnetlink directly (no `ip` or
//! `iptables` binary, no privileged mode). Two refusals guard the node:
//! - a namespace that looks like a node's (a `hostNetwork` pod) is refused: it has a physical
//!   network interface, a bridge or an overlay tunnel endpoint, which a pod's own namespace
//!   (loopback plus a veth, ipvlan, netkit… interface) does not ([`node_device`]);
//! - the address is added with the label `<interface>:imdsb`, so a second run (a restarted
//!   init container) recognises its own address and succeeds, while an address someone else
//!   put there (the node's, a mesh's, a stand-in IMDS) is refused rather than taken over.

use clap::Args;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};

/// The Azure Instance Metadata Service address.
pub const IMDS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

#[derive(Debug, Clone, Args)]
pub struct InitNetworkArgs {
    /// Address to add to the interface as a /32. The default is the IMDS address that Go and
    /// Rust Azure SDKs hard-code.
    #[arg(long, env = "IMDS_BROKER_INIT_ADDRESS", default_value_t = IMDS_ADDRESS)]
    pub address: Ipv4Addr,

    /// Interface that receives the address (at most 9 characters, for its label). Keep `lo`:
    /// the pod's own connections to an address on loopback stay inside the pod.
    #[arg(long, env = "IMDS_BROKER_INIT_INTERFACE", default_value = "lo")]
    pub interface: String,

    /// Run even though this network namespace looks like a node's (it has a physical network
    /// interface, a bridge or an overlay tunnel). Only for a pod whose own namespace has one:
    /// a VM-isolated runtime such as Kata, or an SR-IOV interface.
    #[arg(long, env = "IMDS_BROKER_INIT_SKIP_HOST_NETWORK_CHECK")]
    pub skip_host_network_check: bool,
}

/// Appended to the interface name to label the address this command adds (IFA_LABEL): how a
/// later run tells its own address from one that something else put there.
const LABEL_SUFFIX: &str = ":imdsb";
/// Longest address label the kernel keeps (IFNAMSIZ less the NUL).
const MAX_LABEL: usize = 15;

/// What a netlink failure means for the operator.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// EPERM/EACCES: the container lacks CAP_NET_ADMIN.
    NoCapability,
    /// EEXIST: the address is already there.
    Exists,
    Other,
}

fn classify(err: &rtnetlink::Error) -> Failure {
    match err {
        rtnetlink::Error::NetlinkError(msg) => match msg.to_io().kind() {
            ErrorKind::PermissionDenied => Failure::NoCapability,
            ErrorKind::AlreadyExists => Failure::Exists,
            _ => Failure::Other,
        },
        _ => Failure::Other,
    }
}

fn capability_error(what: &str, err: &rtnetlink::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{what}: {err}. The container needs the NET_ADMIN capability: set \
         securityContext.capabilities.add: [\"NET_ADMIN\"] on this init container (privileged \
         mode is not needed)"
    )
}

pub async fn run(args: InitNetworkArgs) -> anyhow::Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .map_err(|e| anyhow::anyhow!("cannot open a netlink socket: {e}"))?;
    let conn = tokio::spawn(connection);
    let result = configure(&handle, &args).await;
    conn.abort();
    result
}

async fn configure(handle: &Handle, args: &InitNetworkArgs) -> anyhow::Result<()> {
    let name = args.interface.as_str();
    let label = format!("{name}{LABEL_SUFFIX}");
    anyhow::ensure!(
        label.len() <= MAX_LABEL,
        "--interface {name}: the name is too long to label the address with {label:?} (at most \
         {} characters); use lo",
        MAX_LABEL - LABEL_SUFFIX.len()
    );
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list the network interfaces: {e}"))?;
    if !args.skip_host_network_check {
        if let Some((device, what)) = links
            .iter()
            .find_map(|l| node_device(l).map(|what| (link_name(l), what)))
        {
            anyhow::bail!(
                "refusing to run: this network namespace has {device}, {what}, so it looks like \
                 a node's, not a pod's own (is this a hostNetwork pod?). {} added here would \
                 take IMDS away from every process on the node, and stay after the pod is gone. \
                 Transparent mode needs the pod's own network namespace (hostNetwork: false). \
                 If this is a pod's own namespace (a VM-isolated runtime such as Kata, an SR-IOV \
                 interface), pass --skip-host-network-check",
                args.address
            );
        }
    }
    let link = links
        .iter()
        .find(|l| link_name(l) == name)
        .ok_or_else(|| anyhow::anyhow!("interface {name} not found in this network namespace"))?;
    let index = link.header.index;

    // Loopback is up in every pod (the CNI loopback plugin does it); a bare namespace starts
    // with it down. Up first, so the kernel also gives it 127.0.0.1 as usual.
    if !link.header.flags.contains(LinkFlags::Up) {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| match classify(&e) {
                Failure::NoCapability => capability_error(&format!("cannot bring {name} up"), &e),
                _ => anyhow::anyhow!("cannot bring {name} up: {e}"),
            })?;
        tracing::info!(interface = name, "interface brought up");
    }

    let address = args.address;
    let ours = Holder { index, label };
    let added = match holders(handle, address).await?.as_slice() {
        // A second run (init container restart) finds its own address.
        [] => add(handle, &ours, name, address).await?,
        [h] if *h == ours => false,
        others => return Err(not_ours(address, others, &links)),
    };

    // Read it back: the broker's bind will rely on it.
    let after = holders(handle, address).await?;
    if !matches!(after.as_slice(), [h] if *h == ours) {
        let others: Vec<Holder> = after.into_iter().filter(|h| *h != ours).collect();
        anyhow::ensure!(
            !others.is_empty(),
            "{address} is not on {name} after adding it (netlink reported success)"
        );
        // Added by something else between our look and our add.
        return Err(not_ours(address, &others, &links));
    }
    tracing::info!(
        interface = name,
        address = %address,
        added,
        "{address}/32 is on {name}: this pod's connections to it stay inside its network \
         namespace and never reach the node's IMDS; start the broker with --listen \
         {address}:80, which answers only callers inside this pod"
    );
    Ok(())
}

/// An interface's name (empty if the kernel sent none).
fn link_name(link: &LinkMessage) -> &str {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// What makes `link` a node's device rather than a pod's, if anything. A pod's own namespace
/// holds loopback and the virtual interfaces its CNI plugin made (veth, ipvlan, macvlan,
/// netkit), plus the tunnel devices the kernel creates in every namespace (tunl0, sit0…). A
/// node's holds its NIC — a physical device, which no virtual link driver made, so it has no
/// link kind — and, with most CNI plugins, the bridge pods hang off or an overlay endpoint.
fn node_device(link: &LinkMessage) -> Option<&'static str> {
    if link.header.flags.contains(LinkFlags::Loopback) {
        return None;
    }
    let kind = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    });
    match kind {
        None => Some("a physical network interface"),
        Some(InfoKind::Bridge) => Some("a bridge (pods are attached to the node's)"),
        Some(InfoKind::Vxlan | InfoKind::Geneve) => Some("an overlay tunnel endpoint"),
        Some(InfoKind::Other(k)) if k == "openvswitch" => Some("an Open vSwitch bridge"),
        Some(_) => None,
    }
}

/// One address entry: the interface it is on and its label.
#[derive(Debug, PartialEq, Eq)]
struct Holder {
    index: u32,
    label: String,
}

/// Every entry of `address` in this namespace, on any interface.
async fn holders(handle: &Handle, address: Ipv4Addr) -> anyhow::Result<Vec<Holder>> {
    let mut found = Vec::new();
    let mut addresses = handle.address().get().execute();
    while let Some(msg) = addresses
        .try_next()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list addresses: {e}"))?
    {
        let is_it = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(IpAddr::V4(a))
                | AddressAttribute::Local(IpAddr::V4(a)) if *a == address)
        });
        if is_it {
            let label = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Label(l) => Some(l.clone()),
                _ => None,
            });
            found.push(Holder {
                index: msg.header.index,
                label: label.unwrap_or_default(),
            });
        }
    }
    Ok(found)
}

/// Adds `address`/32 as `ours`; `Ok(true)` when added.
async fn add(
    handle: &Handle,
    ours: &Holder,
    name: &str,
    address: Ipv4Addr,
) -> anyhow::Result<bool> {
    let mut request = handle.address().add(ours.index, IpAddr::V4(address), 32);
    // Scope host, like 127.0.0.1: reachable from inside the pod, and never picked as the
    // source address of a packet that leaves it.
    request.message_mut().header.scope = AddressScope::Host;
    request
        .message_mut()
        .attributes
        .push(AddressAttribute::Label(ours.label.clone()));
    match request.execute().await {
        Ok(()) => Ok(true),
        Err(e) => match classify(&e) {
            // Added by something else since we looked: the read-back tells whose it is.
            Failure::Exists => Ok(false),
            Failure::NoCapability => Err(capability_error(
                &format!("cannot add {address}/32 to {name}"),
                &e,
            )),
            Failure::Other => Err(anyhow::anyhow!("cannot add {address}/32 to {name}: {e}")),
        },
    }
}

/// The refusal of an address this command did not add.
fn not_ours(address: Ipv4Addr, holders: &[Holder], links: &[LinkMessage]) -> anyhow::Error {
    let on: Vec<String> = holders
        .iter()
        .map(|h| {
            let link = links
                .iter()
                .find(|l| l.header.index == h.index)
                .map_or("?", link_name);
            format!("{link} (label {:?})", h.label)
        })
        .collect();
    anyhow::anyhow!(
        "{address} is already in this network namespace, on {}, and imds-broker init-network did \
         not put it there (its own carries the label <interface>{LABEL_SUFFIX}): something else \
         answers IMDS here (the node's IMDS address, a mesh, another agent). Refusing to take \
         it over; remove that address or run transparent mode in a pod of its own",
        on.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use rtnetlink::packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    fn nl_error(errno: i32) -> rtnetlink::Error {
        let mut msg = ErrorMessage::default();
        msg.code = NonZeroI32::new(-errno);
        rtnetlink::Error::NetlinkError(msg)
    }

    #[test]
    fn errno_mapping() {
        // EPERM = 1, EACCES = 13, EEXIST = 17, ENODEV = 19 on Linux.
        assert_eq!(classify(&nl_error(1)), Failure::NoCapability);
        assert_eq!(classify(&nl_error(13)), Failure::NoCapability);
        assert_eq!(classify(&nl_error(17)), Failure::Exists);
        assert_eq!(classify(&nl_error(19)), Failure::Other);
        assert_eq!(classify(&rtnetlink::Error::RequestFailed), Failure::Other);
    }

    #[test]
    fn capability_error_names_the_fix() {
        let msg = capability_error("cannot add", &nl_error(1)).to_string();
        assert!(msg.contains("NET_ADMIN"), "{msg}");
        assert!(msg.contains("capabilities"), "{msg}");
    }

    fn link(name: &str, flags: LinkFlags, kind: Option<InfoKind>) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.flags = flags;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        if let Some(k) = kind {
            l.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(k)]));
        }
        l
    }

    #[test]
    fn node_devices_are_nics_bridges_and_overlays_not_a_pods_interfaces() {
        let lo = link("lo", LinkFlags::Loopback | LinkFlags::Up, None);
        assert_eq!(node_device(&lo), None);
        assert_eq!(link_name(&lo), "lo");
        for (name, kind) in [
            ("eth0", InfoKind::Veth),
            ("eth0", InfoKind::IpVlan),
            ("eth0", InfoKind::Netkit),
            ("net1", InfoKind::MacVlan),
            ("tunl0", InfoKind::IpIp),
            ("sit0", InfoKind::SitTun),
        ] {
            let l = link(name, LinkFlags::Up, Some(kind));
            assert_eq!(node_device(&l), None, "{name}");
        }
        for (name, kind, what) in [
            ("eth0", None, "physical"),
            ("cbr0", Some(InfoKind::Bridge), "bridge"),
            ("flannel.1", Some(InfoKind::Vxlan), "overlay"),
            ("genev_sys_6081", Some(InfoKind::Geneve), "overlay"),
        ] {
            let l = link(name, LinkFlags::Up, kind);
            let why = node_device(&l).unwrap_or_else(|| panic!("{name} is a node's"));
            assert!(why.contains(what), "{name}: {why}");
        }
    }

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: InitNetworkArgs,
    }

    #[test]
    fn defaults_are_imds_on_loopback() {
        let w = Wrapper::try_parse_from(["x"]).unwrap();
        assert_eq!(w.args.address, IMDS_ADDRESS);
        assert_eq!(w.args.interface, "lo");
        assert!(!w.args.skip_host_network_check);
        let w = Wrapper::try_parse_from(["x", "--address", "169.254.169.253"]).unwrap();
        assert_eq!(w.args.address, Ipv4Addr::new(169, 254, 169, 253));
        assert!(Wrapper::try_parse_from(["x", "--address", "not-an-ip"]).is_err());
    }
}

//! `imds-broker init-network`: put the IMDS address (169.254.169.254) on the pod's loopback
//! interface, so that clients which hard-code `http://169.254.169.254` (Go azidentity, the Rust
//! SDK) reach the broker inside the pod and never the node's real IMDS.
//!
//! Why this works: an address on `lo` puts a `local` route for it in the namespace's `local`
//! routing table, which the kernel consults before `main` (where the pod's default route
//! lives). Packets to 169.254.169.254 are then delivered locally, to whatever listens on
//! `169.254.169.254:80` in this pod — the broker (`serve --listen 169.254.169.254:80`) — and no
//! packet to that address leaves the pod's network namespace.
//!
//! Runs as an init container with only `NET_ADMIN`: it speaks rtnetlink directly (no `ip` or
//! `iptables` binary, no privileged mode). Idempotent: an address that is already there is
//! success, so a restarted init container (or pod sandbox) does not fail.

use clap::Args;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::LinkFlags;
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

    /// Interface that receives the address. Keep `lo`: an address on loopback is reachable
    /// only from inside this pod's network namespace.
    #[arg(long, env = "IMDS_BROKER_INIT_INTERFACE", default_value = "lo")]
    pub interface: String,
}

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
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| anyhow::anyhow!("cannot look up interface {name}: {e}"))?
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
    let mut request = handle.address().add(index, IpAddr::V4(address), 32);
    // Scope host, like 127.0.0.1: reachable from inside the pod, and never picked as the
    // source address of a packet that leaves it.
    request.message_mut().header.scope = AddressScope::Host;
    let added = match request.execute().await {
        Ok(()) => true,
        Err(e) => match classify(&e) {
            // Idempotent: a second run (init container restart) finds its own address.
            Failure::Exists => false,
            Failure::NoCapability => {
                return Err(capability_error(
                    &format!("cannot add {address}/32 to {name}"),
                    &e,
                ))
            }
            Failure::Other => anyhow::bail!("cannot add {address}/32 to {name}: {e}"),
        },
    };

    // Read it back: the broker's bind will rely on it.
    if !has_address(handle, index, address).await? {
        anyhow::bail!("{address} is not on {name} after adding it (netlink reported success)");
    }
    tracing::info!(
        interface = name,
        address = %address,
        added,
        "{address}/32 is on {name}: traffic to it stays inside this pod's network namespace; \
         start the broker with --listen {address}:80"
    );
    Ok(())
}

async fn has_address(handle: &Handle, index: u32, address: Ipv4Addr) -> anyhow::Result<bool> {
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addresses
        .try_next()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list addresses: {e}"))?
    {
        let found = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(IpAddr::V4(a))
                | AddressAttribute::Local(IpAddr::V4(a)) if *a == address)
        });
        if found && msg.header.index == index {
            return Ok(true);
        }
    }
    Ok(false)
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
        let w = Wrapper::try_parse_from(["x", "--address", "169.254.169.253"]).unwrap();
        assert_eq!(w.args.address, Ipv4Addr::new(169, 254, 169, 253));
        assert!(Wrapper::try_parse_from(["x", "--address", "not-an-ip"]).is_err());
    }
}

//! Which peers a listener serves. The token listeners serve only connections from inside this
//! network namespace (the pod): an address on the pod's `lo`, such as transparent mode's
//! 169.254.169.254, is still reachable from outside, because Linux delivers a packet that
//! arrives on `eth0` for any of the namespace's local addresses (a neighbour on the same bridge
//! only needs a route to it via this pod's IP).
//!
//! The rule, decided once per connection at accept: the peer is inside when its address is
//! loopback, or is the address it connected to.
//! - A connection from inside to one of the namespace's own addresses is routed through the
//!   `local` table, whose route for that address has the address itself as its preferred
//!   source: a caller in the pod that connects to 169.254.169.254 (or to the pod IP) comes
//!   from that same address. Loopback callers come from 127.0.0.0/8 (or `::1`).
//! - A packet from another host has neither: a source in 127.0.0.0/8 or one of our own
//!   addresses arriving on a real interface is dropped as a martian (`route_localnet` and
//!   `accept_local` are off by default), and even where they are on, our SYN-ACK to such an
//!   address is delivered locally, so the handshake never completes.
//!
//! Reverse-path filtering (`rp_filter`) does not help: the neighbour's source address is
//! routed back out of the very interface it came in on. Refusing costs a comparison (and a
//! `getsockname` only for listeners on a wildcard address), no netlink call.
//!
//! A caller in the pod that binds its socket to one of the pod's other addresses before
//! connecting is refused too; no Azure SDK does that, and `127.0.0.1` serves it.

use super::Body;
use hyper::Response;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpStream;

/// The answer to every request on a connection from outside this network namespace (its
/// peer address as argument). A listener with one serves only peers inside.
#[derive(Clone)]
pub struct OutsidePeer(pub Arc<dyn Fn(SocketAddr) -> Response<Body> + Send + Sync>);

impl std::fmt::Debug for OutsidePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutsidePeer")
    }
}

/// Whether `stream` (accepted on a listener bound to `bound`) comes from inside this network
/// namespace. Fails closed when the connection's own address cannot be read.
pub(super) fn from_inside(stream: &TcpStream, peer: SocketAddr, bound: Option<IpAddr>) -> bool {
    let local = match bound {
        // Bound to one address: every connection is to it, no system call needed.
        Some(ip) if !ip.is_unspecified() => ip,
        _ => match stream.local_addr() {
            Ok(a) => a.ip(),
            Err(_) => return false,
        },
    };
    inside(peer.ip(), local)
}

/// The rule of this module: loopback, or the very address connected to.
fn inside(peer: IpAddr, local: IpAddr) -> bool {
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    let peer = peer.to_canonical();
    peer.is_loopback() || peer == local.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_and_the_connected_address_are_inside_everything_else_is_not() {
        let imds = ip("169.254.169.254");
        // A client in the pod: Linux's source for a local destination is that destination.
        assert!(inside(imds, imds));
        assert!(inside(ip("127.0.0.1"), imds));
        assert!(inside(ip("127.0.0.6"), ip("127.0.0.1")));
        assert!(inside(ip("::1"), ip("::1")));
        assert!(inside(ip("::ffff:127.0.0.1"), ip("::")));
        assert!(inside(ip("::ffff:10.244.1.7"), ip("10.244.1.7")));
        // A neighbour pod routing 169.254.169.254 via this pod's IP, or the node.
        assert!(!inside(ip("10.244.1.8"), imds));
        assert!(!inside(ip("10.244.1.1"), ip("10.244.1.7")));
        assert!(!inside(ip("fd00::8"), ip("fd00::7")));
    }
}

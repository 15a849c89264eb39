//! The process's open-file limit, raised at start to what the connection caps need.
//!
//! Every connection is a file descriptor. Container runtimes differ in the soft limit they give
//! (containerd 2 and systemd services: 1024, below `--max-connections` plus the admin cap), and
//! past it `accept` fails with EMFILE: callers would queue in the kernel while the broker sits
//! under its caps. Go raises the soft limit to the hard one at start; this raises it only as far
//! as needed, and says so when the hard limit is too low.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors besides the connections: listeners, Entra's pooled connections, the token file,
/// stdio, the runtime's epoll and wakers.
const OVERHEAD: u64 = 64;

/// What the limit is after [`ensure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit now in force.
    pub limit: u64,
    /// What the connection caps need.
    pub needed: u64,
    /// The soft limit before, if it was raised.
    pub raised_from: Option<u64>,
}

impl OpenFiles {
    /// A warning for the log when the limit is still below what is needed.
    pub fn shortfall(&self) -> Option<String> {
        (self.limit < self.needed).then(|| {
            format!(
                "the open-file limit is {} but the connection caps need {}: connections past it \
                 are refused by accept (EMFILE); raise the container's nofile limit or lower \
                 --max-connections",
                self.limit, self.needed
            )
        })
    }
}

/// Raises the soft open-file limit to cover `connections` (plus a fixed overhead), up to the
/// hard limit. Never lowers it.
pub fn ensure(connections: usize) -> std::io::Result<OpenFiles> {
    let needed = u64::try_from(connections)
        .unwrap_or(u64::MAX)
        .saturating_add(OVERHEAD);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= needed {
        return Ok(OpenFiles {
            limit: soft,
            needed,
            raised_from: None,
        });
    }
    let target = needed.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(OpenFiles {
        limit: target,
        needed,
        raised_from: Some(soft),
    })
}

/// [`ensure`] for a process whose main listeners share a cap of `connections` and which has an
/// admin listener ([`super::Limits::admin`]), with what happened logged; the limit in force, for
/// the start-up line (0 if it cannot be read).
pub fn raise_for(connections: usize) -> u64 {
    match ensure(connections.saturating_add(super::Limits::admin().max_connections)) {
        Ok(files) => {
            if let Some(warning) = files.shortfall() {
                tracing::warn!("{warning}");
            } else if let Some(from) = files.raised_from {
                tracing::debug!(
                    from,
                    to = files.limit,
                    "open-file limit raised for the connection caps"
                );
            }
            files.limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_covers_the_caps_and_is_never_lowered() {
        let (before, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let small = ensure(10).unwrap();
        assert_eq!(small.limit, before, "never lowered");
        assert_eq!(small.raised_from, None);
        // Up to the hard limit, never past it.
        let wanted = usize::try_from(hard.min(before + 100) - OVERHEAD).unwrap();
        let raised = ensure(wanted).unwrap();
        assert_eq!(raised.limit, hard.min(before + 100).max(before));
        assert_eq!(raised.shortfall(), None);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, raised.limit);
        let beyond = ensure(usize::MAX).unwrap();
        assert_eq!(beyond.limit, hard);
        assert!(beyond.shortfall().unwrap().contains("--max-connections"));
    }
}

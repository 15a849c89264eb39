//! Support for the end-to-end tests that is specific to this product: the broker (`serve`) and
//! the webhook as spawned processes, on testkit's process harness. Only integration tests see
//! the path of the built binary, so this lives here rather than in testkit.

pub mod broker;
pub mod webhook;

/// The `imds-broker` binary built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_imds-broker");

/// Sends raw bytes on a new connection and reads the whole answer (the test fails if none
/// comes within 5 s).
pub async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answered and closed")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

//! Shutdown over real sockets: what `Server::serve_on` does with connections.

use marathon_server::{Config, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A request still running when `server.shutdown_grace_ms` runs out is closed with
/// the server: `serve_on` logged "closing them" and returned, but the connection's
/// task went on, so the request (here, a client stalled mid-body) kept its socket and
/// its handler for as long as the process lived on (an embedding program, or the
/// binary while it flushed its traces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_grace_are_closed_when_serve_on_returns() {
    let mut cfg = Config::default();
    cfg.server.shutdown_grace = Duration::from_millis(300);
    let server = Server::builder()
        .builtins()
        .config(cfg)
        .build()
        .await
        .expect("server builds");
    let token = server.shutdown_token();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().expect("address").port();
    let serving = tokio::spawn(server.serve_on(listener, std::future::pending()));

    // A start whose body stops after its first byte, sent once the server asks for it
    // (`100 Continue`: its handler is reading the body), so it is in flight.
    let (reading, is_reading) = std::sync::mpsc::channel();
    let client = tokio::task::spawn_blocking(move || -> std::io::Result<Duration> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "POST /v1/workflows HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 40\r\nExpect: 100-continue\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 100"), "{head:?}");
        s.write_all(b"{")?;
        let _ = reading.send(());
        let waiting = Instant::now();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => Ok(waiting.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(waiting.elapsed()),
            Err(e) => Err(e),
        }
    });
    is_reading
        .recv_timeout(Duration::from_secs(10))
        .expect("the server reads the request's body");
    let stopping = Instant::now();
    token.cancel();
    serving
        .await
        .expect("serve_on runs")
        .expect("serve_on ends without error");
    let stopped = stopping.elapsed();
    assert!(
        stopped < Duration::from_secs(5),
        "serve_on took {stopped:?}"
    );
    let waited = client
        .await
        .expect("client runs")
        .expect("the connection is closed, not left open until the client gives up");
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
}

//! A TCP proxy between the service and the broker that a test can freeze (the
//! connections stay open but nothing crosses any more, as when a broker hangs or a
//! network path silently drops packets), or take down (every connection cut, new ones
//! closed at once, as when a broker is down) and bring back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub(crate) struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    resume: Arc<tokio::sync::Notify>,
    pumps: Arc<Mutex<Vec<AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral local port and forwards to `upstream`.
    pub(crate) async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let resume = Arc::new(tokio::sync::Notify::new());
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let (f, d, r, p) = (Arc::clone(&frozen), Arc::clone(&down), Arc::clone(&resume), Arc::clone(&pumps));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let mut pumps = p.lock().expect("pumps");
                pumps
                    .push(tokio::spawn(pump(client_read, server_write, Arc::clone(&f), Arc::clone(&r))).abort_handle());
                pumps
                    .push(tokio::spawn(pump(server_read, client_write, Arc::clone(&f), Arc::clone(&r))).abort_handle());
            }
        });
        Proxy { port, frozen, down, resume, pumps, accept }
    }

    pub(crate) fn url(&self) -> String {
        super::amqp::url_through("amqp", &format!("127.0.0.1:{}", self.port))
    }

    /// From now on, bytes are held, not forwarded.
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Takes the "broker" down (`true`: every connection cut, new ones closed at once)
    /// or brings it back (`false`).
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for pump in self.pumps.lock().expect("pumps").drain(..) {
                pump.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.frozen.store(false, Ordering::SeqCst);
        self.resume.notify_waiters();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    resume: Arc<tokio::sync::Notify>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            resume.notified().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

//! A TCP proxy between the service and the broker that a test can freeze: the
//! connections stay open but nothing crosses any more, as when a broker hangs or a
//! network path silently drops packets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    resume: Arc<tokio::sync::Notify>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral local port and forwards to `upstream`.
    pub(crate) async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let resume = Arc::new(tokio::sync::Notify::new());
        let (f, r) = (Arc::clone(&frozen), Arc::clone(&resume));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, Arc::clone(&f), Arc::clone(&r)));
                tokio::spawn(pump(server_read, client_write, Arc::clone(&f), Arc::clone(&r)));
            }
        });
        Proxy { port, frozen, resume, accept }
    }

    pub(crate) fn url(&self) -> String {
        super::amqp::url_through("amqp", &format!("127.0.0.1:{}", self.port))
    }

    /// From now on, bytes are held, not forwarded.
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
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

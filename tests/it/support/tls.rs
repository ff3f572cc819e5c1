//! A certificate authority made at test time (never a committed key) and a TLS listener in
//! front of the local broker that terminates `amqps://` and forwards the plain bytes to
//! 127.0.0.1:5672, optionally requiring a client certificate from its CA.

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A CA, with the PEM files of its certificate, a server certificate for `localhost` and
/// 127.0.0.1, and a client certificate, written to a directory of their own.
pub(crate) struct Authority {
    pub dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    server: (String, String),
}

impl Authority {
    pub(crate) fn new(name: &str) -> Authority {
        Authority::issuing(name, true)
    }

    /// Like [`Authority::new`], but the server certificate names `localhost` only, so a
    /// client connecting to 127.0.0.1 must refuse it.
    pub(crate) fn for_localhost_only(name: &str) -> Authority {
        Authority::issuing(name, false)
    }

    fn issuing(name: &str, with_ip_address: bool) -> Authority {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {name}"));
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        let mut authority = Authority { dir, ca, ca_key, server: (String::new(), String::new()) };
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        if with_ip_address {
            server.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        authority.server = authority.issue(server);
        let mut client = CertificateParams::new(vec!["report-service".to_owned()]).expect("params");
        client.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        let (cert, key) = authority.issue(client);
        std::fs::write(authority.path("client.pem"), cert).expect("write client certificate");
        std::fs::write(authority.path("client.key"), key).expect("write client key");
        authority
    }

    fn issue(&self, params: CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// `ca.pem`, `client.pem` or `client.key`.
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("CA root");
        roots
    }
}

/// Writes `contents` to `dir/name` (a secret file, as Docker mounts them) and returns
/// its path as text.
pub(crate) fn secret_file(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write secret");
    path.display().to_string()
}

/// The TLS listener, on a runtime of its own (so a test may block on a child process
/// while it serves); stops when dropped.
pub(crate) struct TlsListener {
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsListener {
    /// Serves `authority`'s server certificate; with `require_client_certificate`, only
    /// clients presenting a certificate of the same CA get through.
    pub(crate) fn start(authority: &Authority, require_client_certificate: bool) -> TlsListener {
        let certs =
            CertificateDer::pem_slice_iter(authority.server.0.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(authority.server.1.as_bytes()).unwrap();
        let builder = ServerConfig::builder();
        let builder = if require_client_certificate {
            builder.with_client_cert_verifier(WebPkiClientVerifier::builder(authority.roots().into()).build().unwrap())
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Bound here, so the port is known; made a tokio listener on its runtime (a test's
        // own runtime cannot block on another).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("addr").port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&handshakes);
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), Arc::clone(&counted));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else { return };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut broker) = TcpStream::connect(super::amqp::broker_address()).await else { return };
                    // Ends when either side closes; an error is that side's business.
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                });
            }
        });
        TlsListener { port, handshakes, runtime: Some(runtime) }
    }

    /// `amqps://guest:guest@localhost:<port>/%2f`.
    pub(crate) fn url(&self) -> String {
        super::amqp::url_through("amqps", &format!("localhost:{}", self.port))
    }

    /// Completed TLS handshakes so far.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

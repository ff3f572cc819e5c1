//! TLS for `amqps://`: which servers are trusted and which certificate this client shows.
//!
//! One set of settings serves both AMQP clients: lapin's connections ([`TlsSettings::lapin`])
//! and the raw client that moves undecodable messages ([`TlsSettings::connect`]). Server
//! certificates are always verified, against the system's CA bundle (as Debian's
//! ca-certificates keeps it, or `SSL_CERT_FILE`) plus the PEM certificates of
//! `AMQP_CA_FILE`; there is no switch to turn verification off. A client certificate
//! (`AMQP_CLIENT_CERT_FILE` and `AMQP_CLIENT_KEY_FILE`, PEM) is presented when the broker
//! asks for one (mutual TLS).
//!
//! TLS is the `tls` cargo feature (on by default; rustls on ring, no system OpenSSL). A
//! build without it refuses `amqps://` and these settings at startup, in one error.

use std::fmt;

/// Whether this build speaks TLS.
pub const AVAILABLE: bool = cfg!(feature = "tls");

/// Trusted CAs beyond the system's, and the client certificate, as PEM text read at
/// startup (so a file that disappears later changes nothing).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    ca_pem: Option<String>,
    client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("extra_cas", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// Why TLS settings cannot be used; the caller names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// Built without the `tls` feature.
    #[error("this build has no TLS support (built without the `tls` cargo feature)")]
    Unavailable,
    /// A certificate file with no usable PEM certificate in it.
    #[error("no PEM certificate in it{}", detail(.0))]
    NoCertificate(String),
    /// A key file with no usable PEM private key in it.
    #[error("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it{}", detail(.0))]
    NoKey(String),
    /// A certificate and key that rustls will not pair.
    #[error("the client certificate and key are not usable together: {0}")]
    Mismatch(String),
}

fn detail(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(" ({reason})") }
}

impl TlsSettings {
    /// No extra CA and no client certificate: the system's CAs only.
    pub fn system_only() -> TlsSettings {
        TlsSettings::default()
    }

    /// Whether anything beyond the defaults is configured.
    pub fn is_customised(&self) -> bool {
        self.ca_pem.is_some() || self.client.is_some()
    }

    /// Adds the CA certificates in `pem` to those trusted.
    pub fn with_ca_pem(mut self, pem: String) -> Result<TlsSettings, TlsError> {
        backend::certificates(&pem)?;
        self.ca_pem = Some(pem);
        Ok(self)
    }

    /// Presents the certificate chain `cert_pem` with its key `key_pem`.
    pub fn with_client_identity(mut self, cert_pem: String, key_pem: String) -> Result<TlsSettings, TlsError> {
        backend::client_config(self.ca_pem.as_deref(), Some((&cert_pem, &key_pem)))?;
        self.client = Some(ClientIdentity { cert_pem, key_pem });
        Ok(self)
    }

    /// lapin's form of these settings (lapin reads the system's CAs itself).
    pub fn lapin(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self.client.as_ref().map(|client| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: client.cert_pem.clone().into_bytes(),
                key: client.key_pem.clone().into_bytes(),
            }),
            cert_chain: self.ca_pem.clone(),
        }
    }

    /// Wraps `stream`, connected to `host`, in a verified TLS session.
    pub async fn connect(
        &self,
        stream: tokio::net::TcpStream,
        host: &str,
    ) -> std::io::Result<Box<dyn amqp_raw::Transport>> {
        backend::connect(self, stream, host).await
    }
}

#[cfg(feature = "tls")]
mod backend {
    use super::{TlsError, TlsSettings};
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    pub(super) fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::NoCertificate(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(String::new()));
        }
        Ok(certs)
    }

    fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::NoKey(e.to_string()))
    }

    /// The raw client's rustls configuration: the same trust as lapin's (system CAs and
    /// the extra ones), the same client certificate.
    pub(super) fn client_config(ca_pem: Option<&str>, client: Option<(&str, &str)>) -> Result<ClientConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped, as lapin's connector skips them.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(pem) = ca_pem {
            roots.add_parsable_certificates(certificates(pem)?);
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        match client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert_pem, key_pem)) => builder
                .with_client_auth_cert(certificates(cert_pem)?, key(key_pem)?)
                .map_err(|e| TlsError::Mismatch(e.to_string())),
        }
    }

    pub(super) async fn connect(
        settings: &TlsSettings,
        stream: tokio::net::TcpStream,
        host: &str,
    ) -> std::io::Result<Box<dyn amqp_raw::Transport>> {
        let client = settings.client.as_ref().map(|c| (c.cert_pem.as_str(), c.key_pem.as_str()));
        let config = client_config(settings.ca_pem.as_deref(), client).map_err(std::io::Error::other)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        Ok(Box::new(connector.connect(name, stream).await?))
    }
}

#[cfg(not(feature = "tls"))]
mod backend {
    use super::{TlsError, TlsSettings};

    pub(super) fn certificates(_pem: &str) -> Result<(), TlsError> {
        Err(TlsError::Unavailable)
    }

    pub(super) fn client_config(_ca_pem: Option<&str>, _client: Option<(&str, &str)>) -> Result<(), TlsError> {
        Err(TlsError::Unavailable)
    }

    pub(super) async fn connect(
        _settings: &TlsSettings,
        _stream: tokio::net::TcpStream,
        _host: &str,
    ) -> std::io::Result<Box<dyn amqp_raw::Transport>> {
        Err(std::io::Error::other(TlsError::Unavailable))
    }
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;

    fn authority() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn a_file_without_a_certificate_is_refused_with_what_it_lacks() {
        let error = TlsSettings::system_only().with_ca_pem("not a certificate\n".into()).unwrap_err();
        assert_eq!(error, TlsError::NoCertificate(String::new()));
        assert_eq!(error.to_string(), "no PEM certificate in it");
    }

    #[test]
    fn a_ca_file_and_a_matching_client_identity_are_accepted() {
        let (ca, _) = authority();
        let settings = TlsSettings::system_only().with_ca_pem(ca.pem()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap().self_signed(&key).unwrap();
        let settings = settings.with_client_identity(cert.pem(), key.serialize_pem()).unwrap();
        assert!(settings.is_customised());
        let lapin = settings.lapin();
        assert_eq!(lapin.cert_chain, Some(ca.pem()));
        assert!(matches!(lapin.identity, Some(lapin::tcp::OwnedIdentity::PKCS8 { .. })));
        assert_eq!(format!("{settings:?}"), "TlsSettings { extra_cas: true, client_certificate: true }");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap().self_signed(&key).unwrap();
        let error = TlsSettings::system_only().with_client_identity(cert.pem(), other.serialize_pem()).unwrap_err();
        assert!(matches!(error, TlsError::Mismatch(_)), "{error:?}");
        let error = TlsSettings::system_only().with_client_identity(cert.pem(), "no key".into()).unwrap_err();
        assert!(matches!(error, TlsError::NoKey(_)), "{error:?}");
    }
}

//! The raw client's connection to a broker node: TCP, TLS for `amqps://` (the same
//! settings and verification as lapin's), and the login from the URL. What the raw
//! client is for (messages lapin cannot decode) is the delivery wing's `sweeper`.

use super::address::AmqpUrl;
use super::tls::TlsSettings;
use amqp_raw::{Login, RawClient, RawError};
use tokio::net::TcpStream;

/// Connects the raw client to `url`'s node as its user, naming the connection `name`.
pub async fn connect(url: &AmqpUrl, tls: &TlsSettings, name: &str) -> Result<RawClient, RawError> {
    let uri = url.uri();
    let host = uri.authority.host.as_str();
    let tcp = TcpStream::connect((host, uri.authority.port)).await?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn amqp_raw::Transport> = if url.is_tls() { tls.connect(tcp, host).await? } else { Box::new(tcp) };
    let login = Login {
        vhost: uri.vhost.clone(),
        username: uri.authority.userinfo.username.clone(),
        password: uri.authority.userinfo.password.clone(),
    };
    RawClient::open(stream, &login, name).await
}

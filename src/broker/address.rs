//! Broker addresses: `AMQP_URL` as the service holds it, one URL or a cluster's list, and
//! the order a client tries them in.
//!
//! Every URL is parsed and checked once, when the settings are read ([`AmqpUrl::parse`]),
//! so connecting never meets an unparsable URL. A URL keeps its password for connecting
//! ([`AmqpUrl::expose`]); everything printable goes through [`redact`], the one place a
//! URL is made safe to show: `Display`, `Debug`, errors, logs and metrics labels.
//!
//! A list (`amqp://a:5672/%2f,amqp://b:5672/%2f`, the form Spring's `addresses` and most
//! clients take) is split at commas; a comma inside a password must be percent-encoded
//! (`%2C`), as every other reserved character. [`Failover`] is the order: each client
//! starts at a position of its own (so replicas spread over the nodes), moves on to the
//! next node when one fails or drops the session, and wraps around.

use lapin::uri::{AMQPScheme, AMQPUri};
use std::fmt;

/// Why a broker URL cannot be used. The messages say what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not an `amqp://` or `amqps://` URL lapin can parse.
    #[error("an amqp:// or amqps:// URL such as amqp://user:password@host:5672/%2f")]
    NotAmqp,
    /// `amqps://` in a build without TLS.
    #[error("an amqp:// URL (this build has no TLS support: it was built without the `tls` feature)")]
    NoTls,
    /// A `frame_max` larger than the service's threads are sized for, or unlimited (0).
    #[error("a frame_max of at most 131072 (the default) in the URL")]
    FrameMax,
    /// `amqp://` and `amqps://` in one list (the TLS settings apply to every node).
    #[error("the same scheme as URL 1 (all amqp:// or all amqps://)")]
    MixedSchemes,
    /// A password that cannot go into the URL (no user name in it, or an empty password).
    #[error("a non-empty password, and a user name in the URL")]
    Password,
}

/// One entry of a list that cannot be used: which (1-based), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{error}", position_prefix(*position, *count))]
pub struct AddressError {
    /// The entry's position in the list, from 1.
    pub position: usize,
    /// How many entries the list has.
    pub count: usize,
    /// What is wrong with it.
    pub error: UrlError,
}

fn position_prefix(position: usize, count: usize) -> String {
    if count > 1 { format!("URL {position} of {count} to be ") } else { String::new() }
}

/// One broker URL, validated. `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq)]
pub struct AmqpUrl {
    text: String,
    uri: AMQPUri,
}

impl AmqpUrl {
    /// Parses and checks one URL: `amqp://` or (with the `tls` feature) `amqps://`, and a
    /// `frame_max` of at most `amqp_raw::FRAME_MAX` (the limit of both clients) if it sets one.
    pub fn parse(text: &str) -> Result<AmqpUrl, UrlError> {
        if text.starts_with("amqps://") && !super::tls::AVAILABLE {
            return Err(UrlError::NoTls);
        }
        if !(text.starts_with("amqp://") || text.starts_with("amqps://")) {
            return Err(UrlError::NotAmqp);
        }
        let uri: AMQPUri = text.parse().map_err(|_| UrlError::NotAmqp)?;
        // The threads' stacks are sized for headers of at most one frame (see
        // `platform::stack`); a larger or unlimited (0) frame_max would undo that.
        if uri.query.frame_max.is_some_and(|f| f == 0 || f > amqp_raw::FRAME_MAX) {
            return Err(UrlError::FrameMax);
        }
        Ok(AmqpUrl { text: text.to_owned(), uri })
    }

    /// The same URL with `password` (any characters; percent-encoded into it).
    pub fn with_password(&self, password: &str) -> Result<AmqpUrl, UrlError> {
        let mut parsed = url::Url::parse(&self.text).map_err(|_| UrlError::NotAmqp)?;
        if password.is_empty() || parsed.username().is_empty() || parsed.set_password(Some(password)).is_err() {
            return Err(UrlError::Password);
        }
        AmqpUrl::parse(parsed.as_str())
    }

    /// Whether it is `amqps://`.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The full URL, password included: for connecting only, never for logs.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// lapin's parse of it (password included: for connecting only).
    pub fn uri(&self) -> &AMQPUri {
        &self.uri
    }

    /// `host:port`, for logs and the `node` label of metrics.
    pub fn node(&self) -> String {
        format!("{}:{}", self.uri.authority.host, self.uri.authority.port)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.text))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({})", redact(&self.text))
    }
}

/// The brokers a client may use: one URL, or the nodes of a cluster, in the order given.
/// Never empty. `Display` shows the list redacted, comma-separated.
#[derive(Clone, PartialEq)]
pub struct AmqpAddresses {
    urls: Vec<AmqpUrl>,
}

impl AmqpAddresses {
    /// Parses a comma-separated list (one URL is a list of one). Blanks around entries
    /// are ignored; an empty entry, or one that does not parse, is an error naming its
    /// position. Every entry must have the same scheme: TLS settings apply to all.
    pub fn parse(text: &str) -> Result<AmqpAddresses, AddressError> {
        let entries: Vec<&str> = text.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut urls = Vec::with_capacity(count);
        for (i, entry) in entries.iter().enumerate() {
            let error = |error| AddressError { position: i + 1, count, error };
            let url = AmqpUrl::parse(entry).map_err(error)?;
            if urls.first().is_some_and(|first: &AmqpUrl| first.is_tls() != url.is_tls()) {
                return Err(error(UrlError::MixedSchemes));
            }
            urls.push(url);
        }
        Ok(AmqpAddresses { urls })
    }

    /// A list of one.
    pub fn single(url: AmqpUrl) -> AmqpAddresses {
        AmqpAddresses { urls: vec![url] }
    }

    /// Every URL with `password` in place of its own.
    pub fn with_password(&self, password: &str) -> Result<AmqpAddresses, AddressError> {
        let count = self.urls.len();
        let urls = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| url.with_password(password).map_err(|error| AddressError { position: i + 1, count, error }))
            .collect::<Result<_, _>>()?;
        Ok(AmqpAddresses { urls })
    }

    /// The URLs, in the order given.
    pub fn urls(&self) -> &[AmqpUrl] {
        &self.urls
    }

    /// The first URL (the user and vhost the list shares, for `permissions`).
    pub fn first(&self) -> &AmqpUrl {
        &self.urls[0]
    }

    /// Whether the URLs are `amqps://` (all or none are).
    pub fn is_tls(&self) -> bool {
        self.first().is_tls()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.urls.len()
    }

    /// Never: a list has at least one URL.
    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }
}

impl fmt::Display for AmqpAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.urls.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AmqpAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpAddresses({self})")
    }
}

/// Which node a client tries next. It starts at a position of the client's own (a hash
/// of its name, so replicas spread over the nodes instead of piling onto the first),
/// moves to the next node after a failed connect or a lost session (never straight back
/// to the one that just failed, when there is another), and counts how many nodes in a
/// row have failed, so the caller waits out its backoff only once every node has.
#[derive(Debug, Clone)]
pub struct Failover {
    len: usize,
    current: usize,
    failed_in_a_row: usize,
}

impl Failover {
    /// For `addresses`, starting at the position `seed` picks.
    pub fn new(addresses: &AmqpAddresses, seed: u64) -> Failover {
        let len = addresses.len().max(1);
        Failover { len, current: (seed % len as u64) as usize, failed_in_a_row: 0 }
    }

    /// A seed from `name` (e.g. host and pid): different clients start apart.
    pub fn seed_of(name: &str) -> u64 {
        // FNV-1a: stable across runs and builds, unlike std's hasher.
        name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// The position of the node to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The node at the current position failed (a connect, or a session that never
    /// became healthy): move on. True when every node has failed in a row since the last
    /// success, so it is time to wait before the next round.
    pub fn failed(&mut self) -> bool {
        self.current = (self.current + 1) % self.len;
        self.failed_in_a_row += 1;
        if self.failed_in_a_row >= self.len {
            self.failed_in_a_row = 0;
            true
        } else {
            false
        }
    }

    /// The session on the current node was healthy and then was lost: try the next node
    /// first (the lost one is likely restarting), at once.
    pub fn lost(&mut self) {
        self.current = (self.current + 1) % self.len;
        self.failed_in_a_row = 0;
    }

    /// The current node answered: no failures in a row any more.
    pub fn succeeded(&mut self) {
        self.failed_in_a_row = 0;
    }
}

/// `amqp://user:secret@host/` -> `amqp://user:***@host/`, by a URL parser, so a
/// password holding `@`, `/` or `:` (encoded or not) never shows. Text that does not
/// parse as a URL keeps only its scheme and what follows the last `@`. A comma-separated
/// list is redacted entry by entry.
pub fn redact(text: &str) -> String {
    text.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    let url = url.trim();
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_none() {
            return parsed.to_string();
        }
        if parsed.set_password(Some("***")).is_ok() {
            return parsed.to_string();
        }
    }
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None if rest.contains(':') => format!("{scheme}://***"),
            None => url.to_owned(),
        },
        // Not a URL at all: it may be the tail of one cut at a comma in its password.
        None if url.contains('@') || url.contains(':') => "***".to_owned(),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_split_at_commas_and_each_entry_checked_with_its_position() {
        let list = AmqpAddresses::parse("amqp://u:p@a:5674/q, amqp://u:p@b:5675/q ,amqp://u:p@c:5676/q").unwrap();
        let nodes: Vec<String> = list.urls().iter().map(AmqpUrl::node).collect();
        assert_eq!(nodes, ["a:5674", "b:5675", "c:5676"]);
        assert_eq!(list.urls()[2].uri().vhost, "q");
        assert_eq!(list.to_string(), "amqp://u:***@a:5674/q,amqp://u:***@b:5675/q,amqp://u:***@c:5676/q");
        let err = AmqpAddresses::parse("amqp://u:secret@a/q,http://u:secret@b/q").unwrap_err();
        assert_eq!((err.position, err.count, err.error.clone()), (2, 2, UrlError::NotAmqp));
        assert!(err.to_string().starts_with("URL 2 of 2 to be an amqp://"), "{err}");
        assert_eq!(AmqpAddresses::parse("amqp://a/q,,amqp://b/q").unwrap_err().position, 2);
        assert_eq!(AmqpAddresses::parse("amqp://a/q,").unwrap_err().position, 2);
        let single = AmqpAddresses::parse("ftp://x").unwrap_err();
        assert_eq!(single.to_string(), UrlError::NotAmqp.to_string(), "one URL: no position");
    }

    #[test]
    fn a_list_mixing_tls_and_plain_urls_is_refused() {
        if super::super::tls::AVAILABLE {
            let err = AmqpAddresses::parse("amqps://a/q,amqp://b/q").unwrap_err();
            assert_eq!((err.position, err.error), (2, UrlError::MixedSchemes));
        }
    }

    #[test]
    fn every_password_of_a_list_is_redacted_even_with_a_raw_comma_in_it() {
        for (text, secrets) in [
            ("amqp://u:one@a/q,amqp://u:two@b/q,amqp://u:three@c/q", &["one", "two", "three"][..]),
            ("amqp://u:pa,ss@a/q,amqp://u:x,y@b/q", &["pa", "ss", "x,y"][..]),
            ("amqp://u:p%2Cq@a/q", &["p%2Cq"][..]),
        ] {
            let shown = redact(text);
            for secret in secrets {
                assert!(!shown.contains(secret), "{text} -> {shown}");
            }
        }
        let list = AmqpAddresses::parse("amqp://u:p%2Cq@a/q").unwrap();
        assert_eq!(list.first().uri().authority.userinfo.password, "p,q", "an encoded comma is the password's");
    }

    #[test]
    fn a_password_replaces_every_urls_own() {
        let list = AmqpAddresses::parse("amqp://svc@a/q,amqp://svc:old@b/q").unwrap().with_password("n,e@w").unwrap();
        for url in list.urls() {
            assert_eq!(url.uri().authority.userinfo.password, "n,e@w");
        }
        let err = AmqpAddresses::parse("amqp://svc@a/q,amqp://b/q").unwrap().with_password("pw").unwrap_err();
        assert_eq!((err.position, err.error), (2, UrlError::Password));
    }

    #[test]
    fn failover_starts_where_its_seed_says_moves_on_and_waits_only_after_a_full_round() {
        let list = AmqpAddresses::parse("amqp://a/q,amqp://b/q,amqp://c/q").unwrap();
        let mut order = Failover::new(&list, 4);
        assert_eq!(order.current(), 1);
        assert!(!order.failed());
        assert_eq!(order.current(), 2);
        assert!(!order.failed());
        assert_eq!(order.current(), 0);
        assert!(order.failed(), "all three failed in a row: wait");
        assert_eq!(order.current(), 1);
        order.succeeded();
        order.lost();
        assert_eq!(order.current(), 2, "after a lost session, the next node first");
        assert!(!order.failed());
        let starts: std::collections::BTreeSet<usize> =
            (0..30).map(|pid| Failover::new(&list, Failover::seed_of(&format!("worker-{pid}"))).current()).collect();
        assert_eq!(starts.len(), 3, "replicas start on every node");
        let mut one = Failover::new(&AmqpAddresses::parse("amqp://a/q").unwrap(), 9);
        assert!(one.failed(), "a single node: every failure is a full round");
    }

    #[test]
    fn a_node_is_its_host_and_port() {
        let url = AmqpUrl::parse("amqp://u:p@rabbit-2:5673/%2f").unwrap();
        assert_eq!(url.node(), "rabbit-2:5673");
        assert_eq!(AmqpUrl::parse("amqp://rabbit").unwrap().node(), "rabbit:5672");
    }
}

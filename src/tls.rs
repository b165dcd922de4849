//! TLS on the RPC port and in the clients (SPEC §9), with rustls.
//!
//! - [`Material`]: the PEM files `[server.tls]` names, read and checked by
//!   the master (at start, at each reload, and for `--check-config`) and
//!   passed to each new worker in its setup, so that a worker serves exactly
//!   what was checked. A reload that reads a bad file fails and changes
//!   nothing; connections already open keep their session.
//! - [`Server`]: a worker's acceptor. Handshakes run in the worker's loop,
//!   each bounded by `handshake_timeout_ms`; a refused one is logged with
//!   the peer and the reason, at most `log_refusals_per_minute` lines a
//!   minute, the rest summed up in one line.
//! - [`ClientOptions`]: what `rpcctl` and [`crate::client`] trust and present.

use crate::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::cell::Cell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The first byte of every TLS record that starts a handshake.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The crypto rustls uses here (aws-lc-rs, rustls's default: no OpenSSL).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The PEM files of `[server.tls]`, read and checked.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Material {
    pub cert_pem: String,
    key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<hidden>"))
            .field("client_ca_pem", &self.client_ca_pem.as_ref().map(|c| c.len()))
            .finish()
    }
}

fn read(key: &str, path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

fn certs(key: &str, path: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {path}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{key}: {path}: no certificate (no \"-----BEGIN CERTIFICATE-----\" block)"));
    }
    Ok(certs)
}

fn private_key(key: &str, path: &str, pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!("{key}: {path}: no private key (PKCS#8, PKCS#1 or SEC1 PEM block)"),
        e => format!("{key}: {path}: not a PEM private key: {e}"),
    })
}

fn roots(key: &str, path: &str, pem: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(key, path, pem)? {
        roots.add(c).map_err(|e| format!("{key}: {path}: unusable CA certificate: {e}"))?;
    }
    Ok(roots)
}

impl Material {
    /// Reads the files `cfg` names and checks that they make a server
    /// configuration: a certificate chain, a private key that matches its
    /// first certificate, and (if set) CA certificates for client
    /// certificates.
    pub fn load(cfg: &TlsConfig) -> Result<Material, String> {
        let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
            return Err("server.tls: cert and key must both be set".into());
        };
        let m = Material {
            cert_pem: read("server.tls.cert", cert)?,
            key_pem: read("server.tls.key", key)?,
            client_ca_pem: cfg.client_ca.as_deref().map(|p| read("server.tls.client_ca", p)).transpose()?,
        };
        m.server_config(cfg).map(|_| m)
    }

    /// The rustls server configuration (TLS 1.3 and 1.2).
    pub fn server_config(&self, cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
        let name = |p: &Option<PathBuf>| p.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
        let chain = certs("server.tls.cert", &name(&cfg.cert), &self.cert_pem)?;
        let key = private_key("server.tls.key", &name(&cfg.key), &self.key_pem)?;
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("server.tls: {e}"))?;
        let builder = match &self.client_ca_pem {
            Some(pem) => {
                let roots = roots("server.tls.client_ca", &name(&cfg.client_ca), pem)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("server.tls.client_ca: {}: {e}", name(&cfg.client_ca)))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut sc = builder.with_single_cert(chain, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "server.tls.key: {} is not the key of the certificate in {} (server.tls.cert)",
                name(&cfg.key),
                name(&cfg.cert)
            ),
            e => format!("server.tls: {} and {}: {e}", name(&cfg.cert), name(&cfg.key)),
        })?;
        // Resumption: TLS 1.3 tickets (and TLS 1.2 session ids, in the
        // default cache), per worker process.
        sc.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| format!("server.tls: session tickets: {e}"))?;
        sc.send_tls13_tickets = 1;
        Ok(Arc::new(sc))
    }
}

/// Why a handshake was refused, for the log.
enum Refusal {
    /// The client spoke the plain protocol (it was answered `bad_request`).
    Plain,
    TimedOut(Duration),
    Failed(std::io::Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Refusal::Plain => write!(f, "not TLS (a plain-TCP client on a TLS port)"),
            Refusal::TimedOut(d) => write!(f, "handshake not finished within {} ms", d.as_millis()),
            Refusal::Failed(e) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::NoCertificatesPresented) => write!(f, "no client certificate (server.tls.client_ca requires one)"),
                Some(rustls::Error::InvalidCertificate(c)) => write!(f, "client certificate refused: {c}"),
                Some(e) => write!(f, "{e}"),
                None if e.kind() == std::io::ErrorKind::UnexpectedEof => write!(f, "the client closed the connection during the handshake"),
                None => write!(f, "{e}"),
            },
        }
    }
}

/// Logs refused handshakes at a bounded rate: at most `per_minute` lines in
/// a minute; the others are counted and summed up in one line when the
/// minute is over.
struct RefusalLog {
    per_minute: u32,
    since: Cell<Instant>,
    logged: Cell<u32>,
    quiet: Cell<u64>,
}

impl RefusalLog {
    fn note(&self, peer: Option<SocketAddr>, why: &Refusal) {
        self.roll(Instant::now());
        if self.logged.get() < self.per_minute {
            self.logged.set(self.logged.get() + 1);
            let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
            let last = if self.logged.get() == self.per_minute { " (further refusals this minute are counted, not logged)" } else { "" };
            log::warn!("TLS handshake refused: peer {peer}: {why}{last}");
        } else {
            self.quiet.set(self.quiet.get() + 1);
        }
    }

    /// Closes the minute if it is over, with the summary of what it did not log.
    fn roll(&self, now: Instant) {
        if now.duration_since(self.since.get()) < Duration::from_secs(60) {
            return;
        }
        if self.quiet.get() > 0 {
            log::warn!("TLS handshakes refused: {} more in the last minute, not logged one by one", self.quiet.get());
        }
        self.since.set(now);
        self.logged.set(0);
        self.quiet.set(0);
    }
}

/// A worker's TLS acceptor.
pub struct Server {
    acceptor: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    log: RefusalLog,
}

/// A connection once its handshake is done.
pub type Stream = tokio_rustls::server::TlsStream<TcpStream>;

impl Server {
    pub fn new(m: &Material, cfg: &TlsConfig) -> Result<Server, String> {
        Ok(Server {
            acceptor: tokio_rustls::TlsAcceptor::from(m.server_config(cfg)?),
            timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            log: RefusalLog {
                per_minute: cfg.log_refusals_per_minute,
                since: Cell::new(Instant::now()),
                logged: Cell::new(0),
                quiet: Cell::new(0),
            },
        })
    }

    /// Runs the server side of the handshake, within the handshake
    /// timeout (or until `give_up` resolves: the worker is draining). A
    /// client that sends the plain protocol gets a `bad_request` frame it
    /// can read, then the close. Refusals are logged (rate-limited).
    pub async fn accept(&self, stream: TcpStream, give_up: impl std::future::Future<Output = ()>) -> Option<Stream> {
        let peer = stream.peer_addr().ok();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.handshake(stream)) => r,
            _ = give_up => {
                log::debug!("TLS handshake with {peer:?} abandoned: draining");
                return None;
            }
        };
        match result {
            Ok(Ok(s)) => Some(s),
            Ok(Err(why)) => {
                self.log.note(peer, &why);
                None
            }
            Err(_) => {
                self.log.note(peer, &Refusal::TimedOut(self.timeout));
                None
            }
        }
    }

    async fn handshake(&self, mut stream: TcpStream) -> Result<Stream, Refusal> {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) => return Err(Refusal::Failed(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) if first[0] != HANDSHAKE_RECORD => {
                use tokio::io::AsyncWriteExt;
                let mut out = Vec::new();
                crate::protocol::error_frame(
                    &mut out,
                    crate::protocol::ErrorCode::BadRequest,
                    "this port speaks TLS (server.tls): connect with TLS (rpcctl --tls)",
                    None,
                );
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
                return Err(Refusal::Plain);
            }
            Ok(_) => {}
            Err(e) => return Err(Refusal::Failed(e)),
        }
        self.acceptor.accept(stream).await.map_err(Refusal::Failed)
    }

    /// Writes the summary of refusals not logged one by one, once their
    /// minute is over (the worker calls this with its heartbeat).
    pub fn tick(&self) {
        self.log.roll(Instant::now());
    }
}

/// What a client trusts and presents (`rpcctl --ca/--cert/--key`).
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// CA certificates (PEM) to trust; None: the system's.
    pub ca: Option<PathBuf>,
    /// A client certificate chain and its key (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify the server's certificate against; None: the
    /// host it is connected to (an IP address or a DNS name).
    pub server_name: Option<String>,
}

/// A client's TLS configuration, ready to connect.
#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl Client {
    pub fn new(o: &ClientOptions) -> Result<Client, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &o.ca {
            Some(p) => {
                let pem = read("--ca", p)?;
                roots = self::roots("--ca", &p.display().to_string(), &pem)?;
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err("no CA certificates: the system has none (give --ca PATH)".into());
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let cfg = match (&o.cert, &o.key) {
            (Some(c), Some(k)) => {
                let chain = certs("--cert", &c.display().to_string(), &read("--cert", c)?)?;
                let key = private_key("--key", &k.display().to_string(), &read("--key", k)?)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => format!("--key {} is not the key of --cert {}", k.display(), c.display()),
                    e => format!("--cert/--key: {e}"),
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("--cert and --key go together".into()),
        };
        let server_name = match &o.server_name {
            Some(n) => Some(ServerName::try_from(n.clone()).map_err(|_| format!("--server-name: \"{n}\" is not a DNS name or an IP address"))?),
            None => None,
        };
        Ok(Client { connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)), server_name })
    }

    /// The TLS handshake over a connected stream to `addr` (host:port).
    pub async fn connect(&self, addr: &str, stream: TcpStream) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => host_name(addr)?,
        };
        self.connector.connect(name, stream).await.map_err(|e| {
            let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
            match inner {
                Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => {
                    format!("{addr}: TLS handshake failed: {e} (is it a plain-TCP port?)")
                }
                Some(rustls::Error::AlertReceived(a)) => format!("{addr}: TLS handshake refused by the server: {a:?} (does it need a client certificate: --cert/--key?)"),
                _ if e.kind() == std::io::ErrorKind::UnexpectedEof => format!("{addr}: TLS handshake failed: the server closed the connection"),
                _ => format!("{addr}: TLS handshake failed: {e}"),
            }
        })
    }
}

/// The host part of `host:port` or `[v6]:port`, as a TLS server name.
fn host_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|_| format!("{addr}: \"{host}\" is not a name a certificate can carry (give --server-name)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_address() {
        assert!(matches!(host_name("127.0.0.1:8001"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(host_name("[::1]:8001"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(host_name("rpc.example.com:8001"), Ok(ServerName::DnsName(_))));
    }

    #[test]
    fn refusals_past_the_rate_are_counted_not_logged() {
        let l = RefusalLog { per_minute: 3, since: Cell::new(Instant::now()), logged: Cell::new(0), quiet: Cell::new(0) };
        for _ in 0..10 {
            l.note(None, &Refusal::Plain);
        }
        assert_eq!((l.logged.get(), l.quiet.get()), (3, 7));
        l.since.set(Instant::now() - Duration::from_secs(61));
        l.roll(Instant::now());
        assert_eq!((l.logged.get(), l.quiet.get()), (0, 0));
    }
}

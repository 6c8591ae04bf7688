//! TLS for both ports, with rustls: a certificate and key from PEM files (reloaded when either file changes, so a
//! renewed certificate needs no restart), optionally a client CA that agents must present certificates from
//! (mTLS). Connections are accepted and their handshakes run in their own tasks (bounded in time), so a slow or
//! silent client never holds up the next one. A leaf: imports nothing of the crate.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// The longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 256;

/// Where the certificate, its key and (for mTLS) the client CA are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that agents' client certificates must chain to (gRPC port only); none: no client
    /// certificates asked.
    pub client_ca: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether TLS is configured at all.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of certificate and key was given.
    #[error("TLS needs both --tls-cert and --tls-key (--tls-client-ca needs them too)")]
    Incomplete,
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn load_key_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())?;
    Ok(certified)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The server certificate in use, swapped whole when its files change.
#[derive(Debug)]
pub(crate) struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl ReloadingCert {
    /// Checks the files every few seconds and swaps in a new certificate when they changed and load; a bad new
    /// pair is logged and the old one stays.
    pub(crate) async fn watch(self: Arc<Self>) {
        let mut seen = (modified(&self.cert), modified(&self.key));
        let mut every = tokio::time::interval(RELOAD_CHECK);
        loop {
            every.tick().await;
            let now = (modified(&self.cert), modified(&self.key));
            if now == seen {
                continue;
            }
            seen = now;
            match load_key_pair(&self.cert, &self.key) {
                Ok(certified) => {
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
                    info!(message = "TLS certificate reloaded.", cert = %self.cert.display());
                }
                Err(error) => {
                    warn!(message = "New TLS certificate not loaded; the previous one stays.", %error);
                }
            }
        }
    }
}

/// The server side of TLS: one rustls configuration per port (they differ in ALPN), one reloading certificate.
pub(crate) struct ServerTls {
    /// For the gRPC port (ALPN h2).
    pub(crate) grpc: TlsAcceptor,
    /// For the HTTP port (ALPN http/1.1: browsers' websockets).
    pub(crate) http: TlsAcceptor,
    /// The certificate both use; its watcher reloads it.
    pub(crate) cert: Arc<ReloadingCert>,
}

impl ServerTls {
    /// Loads the files; `None` when TLS is not configured.
    pub(crate) fn new(settings: &TlsSettings) -> Result<Option<Self>, TlsError> {
        let (cert, key) = match (&settings.cert, &settings.key) {
            (None, None) if settings.client_ca.is_none() => return Ok(None),
            (None, None) => return Err(TlsError::Incomplete),
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ => return Err(TlsError::Incomplete),
        };
        let certified = load_key_pair(&cert, &key)?;
        let resolver = Arc::new(ReloadingCert {
            cert,
            key,
            current: RwLock::new(Arc::new(certified)),
        });
        // Client certificates are asked of agents (the gRPC port) only: browsers and API clients use tokens.
        let config = |alpn: &[&[u8]],
                      client_ca: Option<&PathBuf>|
         -> Result<TlsAcceptor, TlsError> {
            let builder = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?;
            let builder = match client_ca {
                Some(path) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in read_certs(path)? {
                        roots.add(cert).map_err(|e| file_error(path, e))?;
                    }
                    let verifier =
                        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                            .build()
                            .map_err(|e| file_error(path, e))?;
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Ok(Some(Self {
            grpc: config(&[b"h2"], settings.client_ca.as_ref())?,
            http: config(&[b"http/1.1"], None)?,
            cert: resolver.clone(),
        }))
    }
}

/// Accepts TCP connections on `listener`, runs each handshake in its own task (at most [`HANDSHAKE_TIMEOUT`]) and
/// hands out the connections that completed, with their peer address. The accept loop and the handshakes run on
/// `runtime` (the connections' I/O is then that runtime's).
pub(crate) fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tasks: &mut tokio::task::JoinSet<()>,
    runtime: &tokio::runtime::Handle,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    // The accept loop is owned by `tasks` (stopped at shutdown); each handshake task ends by itself within
    // HANDSHAKE_TIMEOUT.
    tasks.spawn_on(
        async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait a moment rather than spin.
                        warn!(message = "Accept failed.", %error);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                tcp.set_nodelay(true).ok();
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            // The server stopped taking connections only at shutdown.
                            tx.send((stream, peer)).await.ok();
                        }
                        Ok(Err(error)) => {
                            info!(message = "TLS handshake failed.", %peer, %error);
                        }
                        Err(_) => info!(message = "TLS handshake timed out.", %peer),
                    }
                });
            }
        },
        runtime,
    );
    rx
}

/// The HTTP port's listener under TLS, for `axum::serve`.
pub(crate) struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS on `listener`; the accept loop runs in `tasks`, on `runtime`.
    pub(crate) fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        tasks: &mut tokio::task::JoinSet<()>,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            accepted: accept_tls(listener, acceptor, tasks, runtime),
            local,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The acceptor task only ends with the process; never hand out a connection again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

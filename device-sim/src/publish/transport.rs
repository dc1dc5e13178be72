//! Byte streams to the broker: plain TCP or TLS (rustls), from a chosen
//! source address.
//!
//! A plain connection is a bare `TcpStream`; TLS state is boxed so that the
//! common case stays small: a fleet of 50,000 idle devices pays for 50,000
//! of these.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The ALPN protocol AWS IoT Core expects for MQTT with client
/// certificates on port 443.
pub const AWS_IOT_ALPN: &str = "x-amzn-mqtt-ca";

/// Which client certificate a device presents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ClientCert {
    /// None: server-authenticated TLS only.
    #[default]
    None,
    /// One certificate and key for every device.
    Shared { cert: PathBuf, key: PathBuf },
    /// `<dir>/<device_id>.crt` and `<dir>/<device_id>.key` per device.
    PerDevice(PathBuf),
}

/// TLS settings of a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    /// PEM file of the CA certificates to trust; `None`: the Mozilla roots
    /// (which include Amazon's, for IoT Core).
    pub ca: Option<PathBuf>,
    pub client_cert: ClientCert,
    /// ALPN protocols to offer; empty: none, except `x-amzn-mqtt-ca` on port 443.
    pub alpn: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsSetupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Builds rustls client configurations for a run: one shared, or one per
/// device when each has its own certificate.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    roots: Arc<rustls::RootCertStore>,
    alpn: Vec<Vec<u8>>,
    per_device: Option<PathBuf>,
    /// The configuration every device shares (absent with per-device certs).
    shared: Option<Arc<ClientConfig>>,
}

impl TlsSetup {
    pub fn new(opts: &TlsOptions, port: u16) -> Result<TlsSetup, TlsSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match &opts.ca {
            Some(path) => {
                for cert in read_certs(path)? {
                    roots.add(cert)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let alpn: Vec<Vec<u8>> = if opts.alpn.is_empty() && port == 443 {
            vec![AWS_IOT_ALPN.as_bytes().to_vec()]
        } else {
            opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
        };
        let mut setup = TlsSetup {
            roots: Arc::new(roots),
            alpn,
            per_device: None,
            shared: None,
        };
        match &opts.client_cert {
            ClientCert::None => setup.shared = Some(setup.build(None)?),
            ClientCert::Shared { cert, key } => {
                setup.shared = Some(setup.build(Some((read_certs(cert)?, read_key(key)?)))?)
            }
            ClientCert::PerDevice(dir) => {
                setup.per_device = Some(dir.clone());
            }
        }
        Ok(setup)
    }

    fn build(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone());
        let mut config = match identity {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(config))
    }

    /// The configuration device `device_id` connects with. Per-device
    /// certificates are read at each connect, so that 50,000 devices do not
    /// hold 50,000 configurations between connections.
    pub fn config_for(&self, device_id: &str) -> Result<Arc<ClientConfig>, TlsSetupError> {
        if let Some(shared) = &self.shared {
            return Ok(shared.clone());
        }
        let dir = self.per_device.as_deref().unwrap_or(Path::new("."));
        let certs = read_certs(&dir.join(format!("{device_id}.crt")))?;
        let key = read_key(&dir.join(format!("{device_id}.key")))?;
        self.build(Some((certs, key)))
    }

    /// Whether every device's certificate and key are there, checked
    /// before connecting anyone: a missing file is a setup error, not a
    /// reconnect loop.
    pub fn check_device(&self, device_id: &str) -> Result<(), TlsSetupError> {
        if self.per_device.is_some() {
            self.config_for(device_id)?;
        }
        Ok(())
    }
}

/// A connection to the broker.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Opens a TCP connection to `broker`, from `source` if given (so that a
/// fleet can use more ephemeral ports than one address has), and wraps it
/// in TLS for `server_name` if `tls` is given.
pub async fn open(
    broker: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> io::Result<Stream> {
    let socket = if broker.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(broker).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some((config, name)) => {
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok(Stream::Tls(Box::new(tls)))
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_443_offers_iot_cores_alpn_unless_told() {
        let opts = TlsOptions::default();
        let on_443 = TlsSetup::new(&opts, 443).unwrap().config_for("d").unwrap();
        assert_eq!(on_443.alpn_protocols, [AWS_IOT_ALPN.as_bytes().to_vec()]);
        let on_8883 = TlsSetup::new(&opts, 8883).unwrap().config_for("d").unwrap();
        assert!(on_8883.alpn_protocols.is_empty());
        let told = TlsOptions {
            alpn: vec!["mqtt".into()],
            ..TlsOptions::default()
        };
        let c = TlsSetup::new(&told, 443).unwrap().config_for("d").unwrap();
        assert_eq!(c.alpn_protocols, [b"mqtt".to_vec()]);
    }

    #[test]
    fn missing_certificates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let per_device = TlsOptions {
            client_cert: ClientCert::PerDevice(dir.path().to_path_buf()),
            ..TlsOptions::default()
        };
        let setup = TlsSetup::new(&per_device, 8883).unwrap();
        let err = setup.check_device("dev-7").unwrap_err().to_string();
        assert!(err.contains("dev-7.crt"), "{err}");
        let bad_ca = TlsOptions {
            ca: Some(dir.path().join("nope.pem")),
            ..TlsOptions::default()
        };
        assert!(TlsSetup::new(&bad_ca, 8883).is_err());
    }
}

//! Certificates for TLS tests, made fresh in a temp dir: a CA, a server
//! certificate for 127.0.0.1 and localhost, and client certificates whose CN
//! names a device; and the rustls configurations either side builds from
//! them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA and the server certificate it signed, as PEM files in `dir`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

/// A client's certificate and key files.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = named("iotpipe test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let ca_cert = dir.path().join("ca.pem");
        std::fs::write(&ca_cert, ca.pem())?;

        let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        server.distinguished_name = named("localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let cert = server.signed_by(&server_key, &issuer)?;
        let (server_cert, server_key_path) =
            (dir.path().join("server.pem"), dir.path().join("server.key"));
        std::fs::write(&server_cert, cert.pem())?;
        std::fs::write(&server_key_path, server_key.serialize_pem())?;
        Ok(Pki {
            dir,
            ca_cert,
            server_cert,
            server_key: server_key_path,
            ca_params,
            ca_key,
        })
    }

    /// A client certificate with subject CN `cn`, signed by the CA.
    pub fn client(&self, cn: &str) -> Result<ClientCert> {
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        self.client_signed(cn, |params, key| Ok(params.signed_by(key, &issuer)?))
    }

    /// [`Pki::client`] written as `<dir>/<cn>.crt` and `<dir>/<cn>.key`: the
    /// layout of a directory holding one certificate per device.
    pub fn client_in(&self, cn: &str, dir: &Path) -> Result<ClientCert> {
        let made = self.client(cn)?;
        let placed = ClientCert {
            cert: dir.join(format!("{cn}.crt")),
            key: dir.join(format!("{cn}.key")),
        };
        std::fs::copy(&made.cert, &placed.cert)?;
        std::fs::copy(&made.key, &placed.key)?;
        Ok(placed)
    }

    /// A client certificate with subject `OU=operator, CN=cn`, signed by the
    /// CA: an operator's.
    pub fn operator_client(&self, cn: &str) -> Result<ClientCert> {
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        self.client_signed(cn, |params, key| {
            let mut params = params.clone();
            params.distinguished_name = named(cn);
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, "operator");
            Ok(params.signed_by(key, &issuer)?)
        })
    }

    /// A client certificate with CN `cn` that no trusted CA signed.
    pub fn rogue_client(&self, cn: &str) -> Result<ClientCert> {
        self.client_signed(cn, |params, key| Ok(params.self_signed(key)?))
            .map(|c| {
                let rogue = ClientCert {
                    cert: c.cert.with_extension("rogue.pem"),
                    key: c.key.with_extension("rogue.key"),
                };
                let _ = std::fs::rename(&c.cert, &rogue.cert);
                let _ = std::fs::rename(&c.key, &rogue.key);
                rogue
            })
    }

    fn client_signed(
        &self,
        cn: &str,
        sign: impl FnOnce(&CertificateParams, &KeyPair) -> Result<rcgen::Certificate>,
    ) -> Result<ClientCert> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = named(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = sign(&params, &key)?;
        let safe: String = cn
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let out = ClientCert {
            cert: self.dir.path().join(format!("client-{safe}.pem")),
            key: self.dir.path().join(format!("client-{safe}.key")),
        };
        std::fs::write(&out.cert, cert.pem())?;
        std::fs::write(&out.key, key.serialize_pem())?;
        Ok(out)
    }

    /// The endpoint's TLS settings: client certificates checked against the
    /// CA, required or optional.
    pub fn server(&self, client_ca: bool, require_client_cert: bool) -> ingest::tls::TlsConfig {
        ingest::tls::TlsConfig {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: client_ca.then(|| self.ca_cert.clone()),
            require_client_cert,
        }
    }

    /// A TLS acceptor with the server certificate; with `client_auth`,
    /// clients must present a certificate the CA signed.
    pub fn acceptor(&self, client_auth: bool) -> Result<tokio_rustls::TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = if client_auth {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(self.roots()?),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = config.with_single_cert(certs(&self.server_cert)?, key(&self.server_key)?)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// A TLS listener on 127.0.0.1 port 0 with the server certificate, for
    /// `axum::serve`: an HTTPS server the CA vouches for.
    pub async fn https_listener(&self) -> Result<TlsListener> {
        Ok(TlsListener {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            acceptor: self.acceptor(false)?,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&self.ca_cert)? {
            roots.add(ca?)?;
        }
        Ok(roots)
    }

    /// A rustls client that trusts the CA, presenting `client` if given.
    pub fn client_config(&self, client: Option<&ClientCert>) -> Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(c) => builder.with_client_auth_cert(certs(&c.cert)?, key(&c.key)?)?,
        };
        Ok(Arc::new(config))
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("reading {}", path.display()))
}

/// rumqttc's transport for a TLS connection with `config`.
pub fn transport(config: Arc<rustls::ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
}

/// TCP connections that finished a TLS handshake: `axum::serve` over HTTPS.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's own TCP listener retries a refused or reset connection at
            // once and sleeps a second on any other accept error (EMFILE), so
            // a persistent error does not spin a core.
            let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            // A client that refuses the certificate, or is not TLS at all,
            // costs its own connection only: dropping `tcp` closes it.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener as _;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A client that is not TLS at all is dropped, and the next one, which
    /// is, is the connection `accept` hands out.
    #[tokio::test]
    async fn a_failed_handshake_costs_only_its_own_connection() {
        let pki = Pki::new().unwrap();
        let mut listener = pki.https_listener().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.1 });

        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(None).unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client = tcp.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let _tls = connector.connect(name, tcp).await.unwrap();

        assert_eq!(accepted.await.unwrap(), client);
    }
}

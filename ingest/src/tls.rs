//! TLS for the endpoint: a rustls server configuration from PEM files, with
//! optional client certificates, and the device identity a client
//! certificate carries.
//!
//! The crypto provider is *ring*, the one the rest of the workspace already
//! links, so there is one crypto stack in the binary.
//!
//! A client certificate names its device by the last Common Name (CN) of its
//! subject, as AWS IoT's thing certificates conventionally do. A certificate
//! with no CN, or with several, names nobody and is refused at CONNECT by the
//! certificate-based policies. An Organizational Unit (OU) `operator` in the
//! subject makes its holder an operator, who may watch the whole fleet.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

pub use tokio_rustls::TlsAcceptor;

use crate::auth::Role;

/// Who a verified client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certified {
    /// See [`certificate_identity`].
    pub device: String,
    /// See [`certificate_role`].
    pub role: Role,
}

/// The device and role a verified client certificate names; `None` when it
/// names no device.
pub fn certified(der: &[u8]) -> Option<Certified> {
    Some(Certified {
        device: certificate_identity(der)?,
        role: certificate_role(der),
    })
}

/// Where the server's certificate and key come from, and whether clients
/// present certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to. Without
    /// it no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse the handshake of a client that presents no
    /// certificate. Off, such a client may still log in with a username and
    /// password (a users file).
    pub require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {detail}")]
    Pem {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Builds the acceptor for a TLS listener.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(config)?))
}

/// The rustls server configuration [`acceptor`] uses.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&config.cert, "server certificate")?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Pem {
        what: "server key",
        path: config.key.display().to_string(),
        detail: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, "client CA")? {
                roots
                    .add(ca)
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    server.alpn_protocols = vec![b"mqtt".to_vec()];
    Ok(Arc::new(server))
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |detail: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The device a verified client certificate names: its subject's Common
/// Name. `None` when the subject has no CN, several, or one that is not a
/// UTF-8, printable or IA5 string.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    match subject_values(der, der::COMMON_NAME)?.as_slice() {
        [name] => Some(name.to_string()),
        _ => None,
    }
}

/// [`Role::Operator`] when the subject has an Organizational Unit that is
/// exactly `operator`; any other certificate is a device's. Only the client
/// CA can issue such a certificate, so the attribute is as trusted as the CN.
pub fn certificate_role(der: &[u8]) -> Role {
    match subject_values(der, der::ORGANIZATIONAL_UNIT) {
        Some(units) if units.contains(&"operator") => Role::Operator,
        _ => Role::Device,
    }
}

/// The values of every attribute of type `oid` in a certificate's subject.
/// `None` when the certificate cannot be read or such a value is not a UTF-8,
/// printable or IA5 string.
fn subject_values<'a>(der: &'a [u8], oid: &[u8]) -> Option<Vec<&'a str>> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    // OPTIONAL, serialNumber, signature, issuer, validity, subject, ... } }
    let (cert, _) = der::expect(der, der::SEQUENCE)?;
    let (tbs, _) = der::expect(cert, der::SEQUENCE)?;
    let mut rest = tbs;
    let (tag, _, after) = der::next(rest)?;
    if tag == der::VERSION {
        rest = after;
    }
    for _ in 0..4 {
        rest = der::next(rest)?.2;
    }
    let (subject, _) = der::expect(rest, der::SEQUENCE)?;
    let mut found = Vec::new();
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (set, after) = der::expect(rdns, der::SET)?;
        rdns = after;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (attribute, after) = der::expect(attributes, der::SEQUENCE)?;
            attributes = after;
            let (attribute_oid, value) = der::expect(attribute, der::OID)?;
            if attribute_oid != oid {
                continue;
            }
            let (tag, text, _) = der::next(value)?;
            found.push(match tag {
                der::UTF8_STRING | der::PRINTABLE_STRING | der::IA5_STRING => {
                    std::str::from_utf8(text).ok()?
                }
                _ => return None,
            });
        }
    }
    Some(found)
}

/// Just enough DER to walk to a certificate's subject.
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;
    pub const VERSION: u8 = 0xa0;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const PRINTABLE_STRING: u8 = 0x13;
    pub const IA5_STRING: u8 = 0x16;
    /// 2.5.4.3, id-at-commonName.
    pub const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    /// 2.5.4.11, id-at-organizationalUnitName.
    pub const ORGANIZATIONAL_UNIT: &[u8] = &[0x55, 0x04, 0x0b];

    /// The next element: (tag, contents, what follows it).
    pub fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        // High tag numbers never occur on the path to the subject.
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    /// The next element if it has tag `tag`: (contents, what follows it).
    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        match next(input)? {
            (t, contents, rest) if t == tag => Some((contents, rest)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with(names: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (ty, value) in names {
            params.distinguished_name.push(ty.clone(), *value);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_identity_is_the_subjects_common_name() {
        let der = cert_with(&[
            (DnType::OrganizationName, "Acme"),
            (DnType::CommonName, "dev-7:site.a"),
        ]);
        assert_eq!(certificate_identity(&der).as_deref(), Some("dev-7:site.a"));
    }

    #[test]
    fn no_or_several_common_names_name_nobody() {
        assert_eq!(
            certificate_identity(&cert_with(&[(DnType::OrganizationName, "Acme")])),
            None
        );
        // rcgen keeps one value per attribute type, so the second CN is made
        // by turning the organisation's OID (2.5.4.10) into a CN's, in the
        // subject (the last occurrence: the issuer, the same name, comes first).
        let mut two = cert_with(&[(DnType::CommonName, "a"), (DnType::OrganizationName, "b")]);
        let at = two
            .windows(5)
            .rposition(|w| w == [0x06, 0x03, 0x55, 0x04, 0x0a])
            .unwrap();
        two[at + 4] = 0x03;
        assert_eq!(certificate_identity(&two), None);
    }

    #[test]
    fn an_operator_unit_makes_an_operator_and_nothing_else_does() {
        let operator = cert_with(&[
            (DnType::OrganizationalUnitName, "site-a"),
            (DnType::OrganizationalUnitName, "operator"),
            (DnType::CommonName, "ops-1"),
        ]);
        assert_eq!(
            certified(&operator),
            Some(Certified {
                device: "ops-1".into(),
                role: Role::Operator
            })
        );
        for names in [
            vec![(DnType::CommonName, "dev-1")],
            vec![
                (DnType::OrganizationalUnitName, "operators"),
                (DnType::CommonName, "dev-1"),
            ],
            vec![
                (DnType::OrganizationName, "operator"),
                (DnType::CommonName, "dev-1"),
            ],
        ] {
            assert_eq!(
                certificate_role(&cert_with(&names)),
                Role::Device,
                "{names:?}"
            );
        }
    }

    #[test]
    fn garbage_is_nobody_not_a_panic() {
        let der = cert_with(&[(DnType::CommonName, "dev-1")]);
        for cut in 0..der.len() {
            let _ = certificate_identity(&der[..cut]);
            let _ = certificate_role(&der[..cut]);
        }
        assert_eq!(certificate_identity(&[]), None);
        assert_eq!(
            certificate_identity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }
}

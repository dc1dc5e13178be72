//! Who may connect, and where a connection may publish.
//!
//! One small trait, called on the connection's own task for every CONNECT and
//! every PUBLISH; it must not block (no I/O per call: load policy up front).

use schemas::Topic;

/// What a client presented in its CONNECT, and over TLS.
#[derive(Debug, Clone, Copy)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The device a client certificate names (see
    /// [`certificate_identity`](crate::tls::certificate_identity)), once the
    /// TLS handshake verified that certificate against the client CA. `None`
    /// over plain TCP, without a certificate, or when it names no device.
    pub certificate: Option<&'a str>,
}

/// Who a connection is, as decided at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    /// The identity the policy checks topics against: a verified client
    /// certificate's CN, else the MQTT username. `None` for anonymous clients.
    pub identity: Option<String>,
}

/// Why a CONNECT is refused; each maps to a CONNACK code in both protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("bad user name or password")]
    BadCredentials,
    #[error("not authorized")]
    NotAuthorized,
}

/// The per-device policy seam.
pub trait Authorizer: Send + Sync + 'static {
    /// Decides whether a client may connect and who it is.
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        Ok(Principal {
            client_id: connect.client_id.to_string(),
            identity: connect.certificate.or(connect.username).map(str::to_string),
        })
    }

    /// Whether `principal` may publish to `topic`.
    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool;
}

/// Every client may connect and publish anywhere: the local default.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn may_publish(&self, _: &Principal, _: &Topic<'_>) -> bool {
        true
    }
}

/// IoT Core's usual per-thing policy: a client must name itself and may
/// publish only to `dt/{any fleet}/{its name}/telemetry`. Its name is its
/// client certificate's CN when it has one, else its MQTT username (a
/// username that contradicts the certificate is refused). It checks no
/// password: it is the policy half, for a trusted network or behind an
/// authenticator that checks credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnDeviceOnly;

impl Authorizer for OwnDeviceOnly {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        let name = match (connect.certificate, connect.username) {
            (Some(cert), _) => certified(cert, connect.username)?,
            (None, Some(name)) if !name.is_empty() => name,
            (None, _) => return Err(ConnectRefusal::NotAuthorized),
        };
        Ok(principal(connect, name))
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        principal.identity.as_deref() == Some(topic.device_id)
    }
}

/// Devices prove who they are with a client certificate, and nothing else:
/// a client without one (plain TCP, or TLS with the certificate optional) is
/// refused. The policy is [`OwnDeviceOnly`]'s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCertificates;

impl Authorizer for ClientCertificates {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        let cert = connect.certificate.ok_or(ConnectRefusal::NotAuthorized)?;
        Ok(principal(connect, certified(cert, connect.username)?))
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        OwnDeviceOnly.may_publish(principal, topic)
    }
}

/// The device a certificate names, unless the username claims another: a
/// client configured with one device's certificate and another's name is
/// misconfigured, and guessing which it meant would be worse than refusing.
fn certified<'a>(cert: &'a str, username: Option<&str>) -> Result<&'a str, ConnectRefusal> {
    match username {
        Some(name) if !name.is_empty() && name != cert => Err(ConnectRefusal::NotAuthorized),
        _ => Ok(cert),
    }
}

fn principal(connect: &ConnectInfo<'_>, identity: &str) -> Principal {
    Principal {
        client_id: connect.client_id.to_string(),
        identity: Some(identity.to_string()),
    }
}

/// Device credentials from a file, with [`OwnDeviceOnly`]'s policy: a client
/// connects with a listed username and its password, or with a client
/// certificate the TLS listener verified (see [`ClientCertificates`]), and may
/// publish only as that device.
///
/// One device per line, `#` starts a comment (see `docs/BROKER.md`):
///
/// ```text
/// # username:sha256:salt-hex:hash-hex, hash = SHA-256(salt ‖ password)
/// dev-1:sha256:6e61636c:5b0c…
/// ```
///
/// A salted SHA-256 suits machine-generated device secrets (long and random),
/// not passwords people choose. [`UsersFile::entry`] writes a line;
/// [`crate::users`] edits a file.
#[derive(Debug, Clone, Default)]
pub struct UsersFile {
    /// Username → (salt, SHA-256 of salt ‖ password).
    users: std::collections::HashMap<String, (Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot read users file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("users file line {line}: {detail}")]
    Line { line: usize, detail: String },
}

impl UsersFile {
    pub fn load(path: &std::path::Path) -> Result<Self, UsersFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, UsersFileError> {
        let mut users = std::collections::HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = strip_comment(raw);
            if line.is_empty() {
                continue;
            }
            let bad = |detail: &str| UsersFileError::Line {
                line: i + 1,
                detail: detail.to_string(),
            };
            // From the right: a device id may itself contain `:`.
            let fields: Vec<&str> = line.rsplitn(4, ':').collect();
            let [hash, salt, "sha256", user] = fields.as_slice() else {
                return Err(bad("expected username:sha256:salt-hex:hash-hex"));
            };
            if user.is_empty() {
                return Err(bad("empty username"));
            }
            let salt = from_hex(salt).ok_or_else(|| bad("salt is not hex"))?;
            let hash = from_hex(hash)
                .filter(|h| h.len() == 32)
                .ok_or_else(|| bad("hash is not 64 hex digits"))?;
            if users.insert(user.to_string(), (salt, hash)).is_some() {
                return Err(bad("username listed twice"));
            }
        }
        Ok(UsersFile { users })
    }

    /// The line that lets `username` connect with `password`.
    pub fn entry(username: &str, password: &str, salt: &[u8]) -> String {
        format!(
            "{username}:sha256:{}:{}",
            to_hex(salt),
            to_hex(&salted_hash(salt, password.as_bytes()))
        )
    }

    /// The username a line of the file names, if it names one (it may be
    /// blank, a comment or malformed).
    pub fn line_username(line: &str) -> Option<&str> {
        let line = strip_comment(line);
        match line.rsplitn(4, ':').collect::<Vec<_>>().as_slice() {
            [_, _, "sha256", user] if !user.is_empty() => Some(user),
            _ => None,
        }
    }

    pub fn contains(&self, username: &str) -> bool {
        self.users.contains_key(username)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl Authorizer for UsersFile {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        if connect.certificate.is_some() {
            return ClientCertificates.authenticate(connect);
        }
        let (Some(user), Some(password)) = (connect.username, connect.password) else {
            return Err(ConnectRefusal::NotAuthorized);
        };
        let Some((salt, expected)) = self.users.get(user) else {
            return Err(ConnectRefusal::BadCredentials);
        };
        if !same_bytes(&salted_hash(salt, password), expected) {
            return Err(ConnectRefusal::BadCredentials);
        }
        Ok(Principal {
            client_id: connect.client_id.to_string(),
            identity: Some(user.to_string()),
        })
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        OwnDeviceOnly.may_publish(principal, topic)
    }
}

fn strip_comment(line: &str) -> &str {
    line.split('#').next().unwrap_or("").trim()
}

fn salted_hash(salt: &[u8], password: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(password);
    h.finalize().to_vec()
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guess was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect<'a>(username: Option<&'a str>) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c1",
            username,
            password: None,
            certificate: None,
        }
    }

    #[test]
    fn allow_all_allows_anonymous_clients_anywhere() {
        let p = AllowAll.authenticate(&connect(None)).unwrap();
        assert_eq!(p.identity, None);
        let topic = Topic::parse("dt/f/other/telemetry").unwrap();
        assert!(AllowAll.may_publish(&p, &topic));
    }

    #[test]
    fn own_device_only_pins_the_device_to_the_username() {
        assert_eq!(
            OwnDeviceOnly.authenticate(&connect(None)),
            Err(ConnectRefusal::NotAuthorized)
        );
        assert_eq!(
            OwnDeviceOnly.authenticate(&connect(Some(""))),
            Err(ConnectRefusal::NotAuthorized)
        );
        let p = OwnDeviceOnly.authenticate(&connect(Some("dev-1"))).unwrap();
        let own = Topic::parse("dt/f/dev-1/telemetry").unwrap();
        let other = Topic::parse("dt/f/dev-2/telemetry").unwrap();
        assert!(OwnDeviceOnly.may_publish(&p, &own));
        assert!(!OwnDeviceOnly.may_publish(&p, &other));
    }

    fn login<'a>(user: &'a str, password: &'a str) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c1",
            username: Some(user),
            password: Some(password.as_bytes()),
            certificate: None,
        }
    }

    #[test]
    fn a_users_file_checks_credentials_then_pins_the_device() {
        let text = format!(
            "# devices\n\n{}\n{}  # spare\n{}\n",
            UsersFile::entry("dev-1", "s3cret-token", b"salt-1"),
            UsersFile::entry("dev-2", "other-token", b"salt-2"),
            UsersFile::entry("site:7", "token-7", b"salt-7"),
        );
        let users = UsersFile::parse(&text).unwrap();
        assert_eq!(users.len(), 3);
        let p = users.authenticate(&login("site:7", "token-7")).unwrap();
        assert!(users.may_publish(&p, &Topic::parse("dt/f/site:7/telemetry").unwrap()));

        let p = users.authenticate(&login("dev-1", "s3cret-token")).unwrap();
        assert_eq!(p.identity.as_deref(), Some("dev-1"));
        assert!(users.may_publish(&p, &Topic::parse("dt/f/dev-1/telemetry").unwrap()));
        assert!(!users.may_publish(&p, &Topic::parse("dt/f/dev-2/telemetry").unwrap()));

        for (user, password) in [("dev-1", "other-token"), ("dev-9", "s3cret-token")] {
            assert_eq!(
                users.authenticate(&login(user, password)),
                Err(ConnectRefusal::BadCredentials)
            );
        }
        assert_eq!(
            users.authenticate(&connect(None)),
            Err(ConnectRefusal::NotAuthorized)
        );
    }

    #[test]
    fn a_users_file_with_a_bad_line_names_it() {
        let good = UsersFile::entry("dev-1", "t", b"s");
        for (text, line) in [
            (format!("{good}\ndev-2:plain:pw"), 2),
            ("dev-1:sha256:zz:00".to_string(), 1),
            (format!("\n{good}\n{good}"), 3),
            (":sha256:00:00".to_string(), 1),
        ] {
            match UsersFile::parse(&text) {
                Err(UsersFileError::Line { line: l, .. }) => assert_eq!(l, line, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    fn with_cert<'a>(username: Option<&'a str>, certificate: &'a str) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c1",
            username,
            password: None,
            certificate: Some(certificate),
        }
    }

    #[test]
    fn a_certificate_names_the_device_under_every_policy() {
        let users = UsersFile::parse(&UsersFile::entry("dev-1", "t", b"s")).unwrap();
        let policies: [&dyn Authorizer; 4] =
            [&AllowAll, &OwnDeviceOnly, &ClientCertificates, &users];
        let own = Topic::parse("dt/f/dev-9/telemetry").unwrap();
        let other = Topic::parse("dt/f/dev-1/telemetry").unwrap();
        for (i, policy) in policies.into_iter().enumerate() {
            for username in [None, Some(""), Some("dev-9")] {
                let p = policy.authenticate(&with_cert(username, "dev-9")).unwrap();
                assert_eq!(p.identity.as_deref(), Some("dev-9"), "policy {i}");
                assert!(policy.may_publish(&p, &own));
                assert_eq!(policy.may_publish(&p, &other), i == 0, "policy {i}");
            }
        }
        for policy in [
            &OwnDeviceOnly as &dyn Authorizer,
            &ClientCertificates,
            &users,
        ] {
            assert_eq!(
                policy.authenticate(&with_cert(Some("dev-1"), "dev-9")),
                Err(ConnectRefusal::NotAuthorized),
                "a username that contradicts the certificate"
            );
        }
        assert_eq!(
            ClientCertificates.authenticate(&login("dev-1", "t")),
            Err(ConnectRefusal::NotAuthorized),
            "a password is no certificate"
        );
    }

    #[test]
    fn line_usernames_match_what_parse_reads() {
        assert_eq!(
            UsersFile::line_username("site:7:sha256:00:11 # x"),
            Some("site:7")
        );
        for line in [
            "",
            "# dev-1:sha256:00:11",
            "dev-1:plain:00",
            ":sha256:00:11",
        ] {
            assert_eq!(UsersFile::line_username(line), None, "{line}");
        }
    }
}

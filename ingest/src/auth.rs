//! Who may connect, where a connection may publish, and what it may subscribe
//! to.
//!
//! One small trait, called on the connection's own task for every CONNECT,
//! PUBLISH and SUBSCRIBE filter; it must not block (no I/O per call: load
//! policy up front).

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
    /// What that certificate grants besides its device (see
    /// [`certificate_role`](crate::tls::certificate_role)): an operator's
    /// certificate may watch the whole fleet. [`Role::Device`] without one.
    pub certificate_role: Role,
}

/// Who a connection is, as decided at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    /// The identity the policy checks topics against: a verified client
    /// certificate's CN, else the MQTT username. `None` for anonymous clients.
    pub identity: Option<String>,
    pub role: Role,
}

/// What a principal may watch beyond its own device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Subscribes only to filters that match nothing but its own topics.
    #[default]
    Device,
    /// May also subscribe to any filter: the live tap of the whole fleet.
    /// It publishes only as its own device, like any other principal.
    Operator,
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
            role: connect.certificate_role,
        })
    }

    /// Whether `principal` may publish to `topic`.
    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool;

    /// Whether `principal` may subscribe to `filter`, a valid topic filter.
    /// Required, so that no policy grants the fleet's telemetry by default.
    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool;
}

/// Every client may connect, publish anywhere and watch everything: the local
/// default, without authentication.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn may_publish(&self, _: &Principal, _: &Topic<'_>) -> bool {
        true
    }

    fn may_subscribe(&self, _: &Principal, _: &str) -> bool {
        true
    }
}

/// Whether every topic `filter` can match belongs to `device`, that is has
/// the form `dt/{fleet}/{device}/...`:
/// - the first level is `dt`, spelled out;
/// - the fleet level is a fleet or `+`: only `device` may publish under its
///   own id, in any fleet, so `+` there reaches no other device;
/// - the device level is `device` spelled out (never `+` or `#`);
/// - the levels after it are anything, wildcards included.
///
/// So for `B`, `dt/+/B/telemetry` and `dt/f/B/#` pass; `dt/#`, `#`,
/// `dt/f/+/telemetry`, `dt/+/#` and `dt/f/A/telemetry` do not. An identity
/// that is itself a wildcard or holds a `/` matches no filter.
pub fn only_own_topics(filter: &str, device: &str) -> bool {
    let mut levels = filter.split('/');
    levels.next() == Some("dt")
        && levels.next().is_some_and(|fleet| fleet != "#")
        && levels
            .next()
            .is_some_and(|d| d == device && d != "+" && d != "#")
}

/// The subscription policy of every authenticating authorizer: an operator
/// may watch anything, a device only its own topics.
fn may_subscribe_as_device(principal: &Principal, filter: &str) -> bool {
    match (principal.role, principal.identity.as_deref()) {
        (Role::Operator, _) => true,
        (Role::Device, Some(device)) => only_own_topics(filter, device),
        (Role::Device, None) => false,
    }
}

/// IoT Core's usual per-thing policy: a client must name itself, may
/// publish only to `dt/{any fleet}/{its name}/telemetry`, and may subscribe
/// only to filters that match nothing but its own topics
/// ([`only_own_topics`]), unless its certificate makes it an operator. Its
/// name is its
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

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        may_subscribe_as_device(principal, filter)
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

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        may_subscribe_as_device(principal, filter)
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

/// The principal a verified certificate makes: its role comes from the
/// certificate too, never from a password.
fn principal(connect: &ConnectInfo<'_>, identity: &str) -> Principal {
    Principal {
        client_id: connect.client_id.to_string(),
        identity: Some(identity.to_string()),
        role: connect.certificate_role,
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
/// # username:sha256:salt-hex:hash-hex[:role], hash = SHA-256(salt ‖ password)
/// dev-1:sha256:6e61636c:5b0c…
/// ops-1:sha256:73616c74:9f2a…:operator
/// ```
///
/// The role column is optional (files written before it still read the
/// same): `device`, the default, subscribes only to its own topics;
/// `operator` may also watch the whole fleet. A hash is hex, so a last field
/// that names a role cannot be mistaken for one.
///
/// A salted SHA-256 suits machine-generated device secrets (long and random),
/// not passwords people choose. [`UsersFile::entry`] writes a line;
/// [`crate::users`] edits a file.
#[derive(Debug, Clone, Default)]
pub struct UsersFile {
    users: std::collections::HashMap<String, Credential>,
}

#[derive(Debug, Clone)]
struct Credential {
    salt: Vec<u8>,
    /// SHA-256 of salt ‖ password.
    hash: Vec<u8>,
    role: Role,
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
            let (line, role) = split_role(line);
            // From the right: a device id may itself contain `:`.
            let fields: Vec<&str> = line.rsplitn(4, ':').collect();
            let [hash, salt, "sha256", user] = fields.as_slice() else {
                return Err(bad("expected username:sha256:salt-hex:hash-hex[:role]"));
            };
            if user.is_empty() {
                return Err(bad("empty username"));
            }
            let salt = from_hex(salt).ok_or_else(|| bad("salt is not hex"))?;
            let hash = from_hex(hash)
                .filter(|h| h.len() == 32)
                .ok_or_else(|| bad("hash is not 64 hex digits"))?;
            let credential = Credential { salt, hash, role };
            if users.insert(user.to_string(), credential).is_some() {
                return Err(bad("username listed twice"));
            }
        }
        Ok(UsersFile { users })
    }

    /// The line that lets device `username` connect with `password`.
    pub fn entry(username: &str, password: &str, salt: &[u8]) -> String {
        Self::entry_as(username, password, salt, Role::Device)
    }

    /// The line that lets `username` connect with `password` in `role`; a
    /// device's line has no role column, as before roles existed.
    pub fn entry_as(username: &str, password: &str, salt: &[u8], role: Role) -> String {
        let role = match role {
            Role::Device => "",
            Role::Operator => ":operator",
        };
        format!(
            "{username}:sha256:{}:{}{role}",
            to_hex(salt),
            to_hex(&salted_hash(salt, password.as_bytes()))
        )
    }

    /// The username a line of the file names, if it names one (it may be
    /// blank, a comment or malformed).
    pub fn line_username(line: &str) -> Option<&str> {
        let (line, _) = split_role(strip_comment(line));
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
        let Some(credential) = self.users.get(user) else {
            return Err(ConnectRefusal::BadCredentials);
        };
        if !same_bytes(&salted_hash(&credential.salt, password), &credential.hash) {
            return Err(ConnectRefusal::BadCredentials);
        }
        Ok(Principal {
            client_id: connect.client_id.to_string(),
            identity: Some(user.to_string()),
            role: credential.role,
        })
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        OwnDeviceOnly.may_publish(principal, topic)
    }

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        may_subscribe_as_device(principal, filter)
    }
}

/// A line without its optional role column, and the role it names.
fn split_role(line: &str) -> (&str, Role) {
    match line.rsplit_once(':') {
        Some((rest, "operator")) => (rest, Role::Operator),
        Some((rest, "device")) => (rest, Role::Device),
        _ => (line, Role::Device),
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
            certificate_role: Role::Device,
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
            certificate_role: Role::Device,
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
            certificate_role: Role::Device,
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
    fn a_device_filter_must_name_the_device_at_the_device_level() {
        for own in [
            "dt/f/dev-b/telemetry",
            "dt/+/dev-b/telemetry",
            "dt/f/dev-b/#",
            "dt/+/dev-b/+",
            "dt/f/dev-b",
        ] {
            assert!(only_own_topics(own, "dev-b"), "{own}");
        }
        for other in [
            "#",
            "+/f/dev-b/telemetry",
            "dt/#",
            "dt/+/#",
            "dt/f/#",
            "dt/f/+/telemetry",
            "dt/f/dev-a/telemetry",
            "dt/f/dev-bb/telemetry",
            "dt/f",
            "dt",
            "xt/f/dev-b/telemetry",
        ] {
            assert!(!only_own_topics(other, "dev-b"), "{other}");
        }
        // An identity that is itself a wildcard is no licence to use one.
        assert!(!only_own_topics("dt/f/+/telemetry", "+"));
        assert!(!only_own_topics("dt/f/#", "#"));
    }

    #[test]
    fn only_an_operator_may_subscribe_beyond_its_device() {
        let device = Principal {
            client_id: "c".into(),
            identity: Some("dev-b".into()),
            role: Role::Device,
        };
        let operator = Principal {
            role: Role::Operator,
            ..device.clone()
        };
        let anonymous = Principal {
            identity: None,
            ..device.clone()
        };
        let users = UsersFile::default();
        let policies: [&dyn Authorizer; 3] = [&OwnDeviceOnly, &ClientCertificates, &users];
        for policy in policies {
            assert!(policy.may_subscribe(&device, "dt/f/dev-b/telemetry"));
            assert!(!policy.may_subscribe(&device, "dt/#"));
            assert!(policy.may_subscribe(&operator, "dt/#"));
            assert!(!policy.may_subscribe(&anonymous, "dt/f/dev-b/telemetry"));
        }
        assert!(AllowAll.may_subscribe(&anonymous, "#"));
    }

    #[test]
    fn an_operator_still_publishes_only_as_itself() {
        let operator = Principal {
            client_id: "c".into(),
            identity: Some("ops".into()),
            role: Role::Operator,
        };
        let own = Topic {
            fleet: "f",
            device_id: "ops",
        };
        let other = Topic {
            fleet: "f",
            device_id: "dev-a",
        };
        let users = UsersFile::default();
        let policies: [&dyn Authorizer; 3] = [&OwnDeviceOnly, &ClientCertificates, &users];
        for policy in policies {
            assert!(policy.may_publish(&operator, &own));
            assert!(!policy.may_publish(&operator, &other));
        }
    }

    #[test]
    fn a_users_file_role_column_is_optional() {
        let text = format!(
            "{}\n{}\n{}:device\n",
            UsersFile::entry("dev-1", "t1", b"s1"),
            UsersFile::entry_as("ops:1", "t2", b"s2", Role::Operator),
            UsersFile::entry("dev-3", "t3", b"s3"),
        );
        assert!(
            text.lines().nth(1).unwrap().ends_with(":operator"),
            "{text}"
        );
        let users = UsersFile::parse(&text).unwrap();
        for (user, password, role) in [
            ("dev-1", "t1", Role::Device),
            ("ops:1", "t2", Role::Operator),
            ("dev-3", "t3", Role::Device),
        ] {
            let p = users.authenticate(&login(user, password)).unwrap();
            assert_eq!((p.identity.as_deref(), p.role), (Some(user), role));
        }
        let lines: Vec<_> = text.lines().filter_map(UsersFile::line_username).collect();
        assert_eq!(lines, ["dev-1", "ops:1", "dev-3"]);
        let unknown = format!("{}:admin", UsersFile::entry("dev-1", "t", b"s"));
        assert!(
            UsersFile::parse(&unknown).is_err(),
            "an unknown role is an error"
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

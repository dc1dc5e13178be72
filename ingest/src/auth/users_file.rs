//! Device credentials from a users file, checked by salted SHA-256.

use schemas::Topic;

use super::{
    Authorizer, ClientCertificates, ConnectInfo, ConnectRefusal, OwnDeviceOnly, Principal, Role,
    may_subscribe_as_device,
};

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

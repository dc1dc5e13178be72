//! Editing a users file: what `iotpipe users add|remove|list` calls.
//!
//! The format is [`UsersFile`]'s: one `username:sha256:salt-hex:hash-hex`
//! line per device (`:operator` appended for an operator), `#` comments. Edits keep every other line as it was
//! (comments included), check that the result still parses, and replace the
//! file atomically (a temporary file beside it, renamed over it), so a reader
//! such as a starting endpoint never sees half a file.

use std::io::Write;
use std::path::Path;

use rand::Rng;

use crate::auth::{Role, UsersFile, UsersFileError};

/// Random bytes in a generated password (hex-encoded, so twice as many
/// characters): 192 bits, far beyond guessing, which is what makes an
/// unstretched salted hash adequate.
const PASSWORD_BYTES: usize = 24;
const SALT_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    File(#[from] UsersFileError),
    #[error("cannot write users file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// Usernames are device ids: the policy matches them against topics.
    #[error("invalid username: {0}")]
    BadUsername(String),
    #[error("user `{0}` is already in the file")]
    Exists(String),
}

/// Adds `username` in `role` with a new random password and returns the
/// password, which is stored only as a salted hash. Creates the file if it is
/// missing.
pub fn add(path: &Path, username: &str, role: Role) -> Result<String, UsersError> {
    schemas::topic::check_id("username", username).map_err(UsersError::BadUsername)?;
    let text = read_or_empty(path)?;
    if UsersFile::parse(&text)?.contains(username) {
        return Err(UsersError::Exists(username.to_string()));
    }
    let mut rng = rand::rng();
    let password = to_hex(&rng.random::<[u8; PASSWORD_BYTES]>());
    let salt: [u8; SALT_BYTES] = rng.random();
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&UsersFile::entry_as(username, &password, &salt, role));
    new.push('\n');
    write(path, &new)?;
    Ok(password)
}

/// Removes `username`'s line; returns whether it was there.
pub fn remove(path: &Path, username: &str) -> Result<bool, UsersError> {
    let text = read_or_empty(path)?;
    UsersFile::parse(&text)?;
    let mut removed = false;
    let kept: String = text
        .lines()
        .filter(|line| {
            let hit = UsersFile::line_username(line) == Some(username);
            removed |= hit;
            !hit
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    if removed {
        write(path, &kept)?;
    }
    Ok(removed)
}

/// The usernames in the file, in file order.
pub fn list(path: &Path) -> Result<Vec<String>, UsersError> {
    let text = read_or_empty(path)?;
    UsersFile::parse(&text)?;
    Ok(text
        .lines()
        .filter_map(UsersFile::line_username)
        .map(str::to_string)
        .collect())
}

fn read_or_empty(path: &Path) -> Result<String, UsersError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UsersFileError::Io {
            path: path.display().to_string(),
            source,
        }
        .into()),
    }
}

fn write(path: &Path, text: &str) -> Result<(), UsersError> {
    let failed = |source| UsersError::Write {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(failed)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authorizer;
    use crate::auth::tests::login;

    #[test]
    fn added_users_log_in_with_their_password_and_removal_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, "# fleet A\n").unwrap();
        let p1 = add(&path, "dev-1", Role::Device).unwrap();
        let p2 = add(&path, "site:2", Role::Operator).unwrap();
        assert_ne!(p1, p2);
        assert_eq!(p1.len(), 2 * PASSWORD_BYTES);
        assert_eq!(list(&path).unwrap(), vec!["dev-1", "site:2"]);

        let users = UsersFile::load(&path).unwrap();
        assert_eq!(
            users.authenticate(&login("dev-1", &p1)).unwrap().role,
            Role::Device
        );
        assert!(users.authenticate(&login("dev-1", &p2)).is_err());
        assert_eq!(
            users.authenticate(&login("site:2", &p2)).unwrap().role,
            Role::Operator
        );

        assert!(remove(&path, "dev-1").unwrap());
        assert!(!remove(&path, "dev-1").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# fleet A\n"), "{text}");
        assert_eq!(list(&path).unwrap(), vec!["site:2"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
    }

    #[test]
    fn bad_names_duplicates_and_broken_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        assert!(list(&path).unwrap().is_empty());
        add(&path, "dev-1", Role::Device).unwrap();
        assert!(matches!(
            add(&path, "dev-1", Role::Device),
            Err(UsersError::Exists(_))
        ));
        for bad in ["", "dev/1", "dev+", &"d".repeat(65)] {
            assert!(
                matches!(
                    add(&path, bad, Role::Device),
                    Err(UsersError::BadUsername(_))
                ),
                "{bad}"
            );
        }
        std::fs::write(&path, "dev-1:plain:pw\n").unwrap();
        assert!(matches!(
            add(&path, "dev-2", Role::Device),
            Err(UsersError::File(_))
        ));
        assert!(matches!(remove(&path, "dev-1"), Err(UsersError::File(_))));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "dev-1:plain:pw\n",
            "a broken file is left alone"
        );
    }
}

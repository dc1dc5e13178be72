//! Which stages a process runs. `iotpipe up` runs them all; `iotpipe
//! ingest`, `process` and `api` each run one, so that a deployment runs them
//! as separate processes, on several machines, against a stream and a store
//! they share.

use crate::config::{Config, StoreKind, StreamKind};

/// The stages one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The MQTT endpoint (and the broker bridge), appending to the stream.
    pub ingest: bool,
    /// The shard processors (on a shared stream, the shards whose leases
    /// this process holds), the store's flusher and the maintenance pass.
    pub process: bool,
    /// The query API and the dashboard, reading the store.
    pub api: bool,
}

impl Roles {
    /// `iotpipe up`.
    pub const ALL: Roles = Roles {
        ingest: true,
        process: true,
        api: true,
    };
    /// `iotpipe ingest`.
    pub const INGEST: Roles = Roles {
        ingest: true,
        process: false,
        api: false,
    };
    /// `iotpipe process`.
    pub const PROCESS: Roles = Roles {
        ingest: false,
        process: true,
        api: false,
    };
    /// `iotpipe api`.
    pub const API: Roles = Roles {
        ingest: false,
        process: false,
        api: true,
    };

    /// The subcommand that runs these roles, as the first line and errors
    /// name it.
    pub fn name(self) -> &'static str {
        match self {
            Roles::INGEST => "ingest",
            Roles::PROCESS => "process",
            Roles::API => "api",
            _ => "up",
        }
    }

    /// Whether the stream is opened: to append to or to read.
    pub(super) fn needs_stream(self) -> bool {
        self.ingest || self.process
    }

    /// Whether the store is opened: to write or to query.
    pub(super) fn needs_store(self) -> bool {
        self.process || self.api
    }

    /// Whether this process reads the alerts another process fires, from a
    /// store that processes share, for its endpoint's live tap: `iotpipe
    /// ingest` with alert rules.
    pub(super) fn relays_alerts(self, config: &Config) -> bool {
        self == Roles::INGEST
            && !config.alerts.rules.is_empty()
            && config.backend.store != StoreKind::Sqlite
    }
}

/// Refuses a role on a backend that only one process can use: the embedded
/// log is one process's files, and SQLite is written through one process's
/// write-behind cache, which another process's queries would not see.
pub(super) fn refuse_unshared(config: &Config, roles: Roles) -> anyhow::Result<()> {
    if roles == Roles::ALL {
        return Ok(());
    }
    let name = roles.name();
    if roles.needs_stream() && config.backend.stream == StreamKind::Embedded {
        anyhow::bail!(
            "iotpipe {name} needs a stream that other processes share, and the embedded log \
             is the files of the one process that opens it: use --stream nats (with \
             --nats-url) or --stream kinesis, or run every stage in one process with \
             `iotpipe up`"
        );
    }
    if roles.needs_store() && config.backend.store == StoreKind::Sqlite {
        anyhow::bail!(
            "iotpipe {name} needs a store that other processes share, and SQLite is written \
             through the write-behind cache of one process, which the others cannot see: use \
             --store postgres (with --postgres-url) or --store dynamodb, or run every stage \
             in one process with `iotpipe up`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_on_a_one_process_backend_is_refused_in_words() {
        let config = Config::default();
        assert!(refuse_unshared(&config, Roles::ALL).is_ok());
        for roles in [Roles::INGEST, Roles::PROCESS] {
            let err = refuse_unshared(&config, roles).unwrap_err().to_string();
            assert!(err.contains("embedded log"), "{err}");
            assert!(err.contains(&format!("iotpipe {}", roles.name())), "{err}");
        }
        let mut shared_stream = Config::default();
        shared_stream.backend.stream = StreamKind::Nats;
        assert!(refuse_unshared(&shared_stream, Roles::INGEST).is_ok());
        for roles in [Roles::PROCESS, Roles::API] {
            let err = refuse_unshared(&shared_stream, roles)
                .unwrap_err()
                .to_string();
            assert!(err.contains("SQLite"), "{err}");
        }
        shared_stream.backend.store = StoreKind::Postgres;
        for roles in [Roles::INGEST, Roles::PROCESS, Roles::API] {
            assert!(refuse_unshared(&shared_stream, roles).is_ok());
        }
    }
}

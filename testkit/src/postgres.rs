//! One PostgreSQL server per test binary, and a fresh database per test.
//!
//! `IOTPIPE_TEST_POSTGRES_URL`, when set, names a running server to use
//! instead (any database on it: tests create their own beside it, so the
//! user needs `CREATEDB`). Else the first caller starts a private server:
//! `initdb` into a new directory under `/tmp` and `pg_ctl start` on a unix
//! socket in that directory, with no TCP listener at all (so no port to
//! pick). A small shell holds the server's lifetime to this process: it
//! waits on a pipe from us, and when the pipe closes, however the test
//! binary exits, it stops the server and deletes the directory.
//!
//! PostgreSQL refuses to run as root, so as root that shell runs as the
//! `postgres` user, which Debian's `postgresql` package creates. The
//! server binaries are found on `PATH` or in Debian's
//! `/usr/lib/postgresql/<version>/bin`, newest version first.
//!
//! The server trades durability for speed (`fsync=off`): its data lives as
//! long as one test binary.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use tokio_postgres::config::Host;
use tokio_postgres::{Config, NoTls};

/// The environment variable naming an existing server.
pub const URL_VARIABLE: &str = "IOTPIPE_TEST_POSTGRES_URL";

struct Server {
    /// Connects to the server's maintenance database, where tests create
    /// and drop theirs.
    admin: Config,
    /// Held open until the process exits: its closing stops the server.
    _guard: Option<Mutex<Child>>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// Initialises, starts and prints `ready DIR` (or `failed: why`), then
/// waits for its standard input to close before it stops the server and
/// deletes DIR.
const SCRIPT: &str = r#"
set -u
bin=$1
dir=$(mktemp -d /tmp/iotpipe-pg-XXXXXX) || { echo "failed: mktemp"; exit 1; }
if ! "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
    echo "failed: initdb: $(tail -n 5 "$dir/initdb.log" | tr '\n' ' ')"; rm -rf "$dir"; exit 1
fi
if ! "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 120 \
    -o "-k $dir -h '' -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=200" \
    start >/dev/null 2>&1; then
    echo "failed: postgres: $(tail -n 5 "$dir/server.log" | tr '\n' ' ')"; rm -rf "$dir"; exit 1
fi
echo "ready $dir"
read _closed
"$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1
rm -rf "$dir"
"#;

/// A database of its own for one test, on the shared server; dropped with
/// this value.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    config: Config,
    admin: Config,
}

impl TestDb {
    /// Connects to this database.
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// This database as a `key=value` connection string, for
    /// `--postgres-url`.
    pub fn url(&self) -> String {
        conninfo(&self.config)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside a runtime, which cannot block on a future: a
        // thread of its own does it. A database left behind (the thread
        // failed) is harmless, and goes with a private server anyway.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let client = connect(&admin).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!(
                "testkit::postgres: could not drop database {}: {e}",
                self.name
            );
        }
    }
}

/// A new, empty database on the test server (started on first use).
pub async fn database() -> Result<TestDb, String> {
    let admin = SERVER
        .get_or_init(start)
        .as_ref()
        .map_err(Clone::clone)?
        .admin
        .clone();
    let name = unique_name();
    let client = connect(&admin).await?;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("creating test database {name}: {e}"))?;
    let mut config = admin.clone();
    config.dbname(&name);
    Ok(TestDb {
        name,
        config,
        admin,
    })
}

/// A database name no other test of any test binary uses on the same
/// server: lower case, as SQL folds unquoted names, and no `-`.
fn unique_name() -> String {
    crate::unique_name("iotpipe_test").replace('-', "_")
}

async fn connect(config: &Config) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("connecting to the test PostgreSQL server: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// `config` as `key=value` pairs: hosts, ports, user, password, database.
fn conninfo(config: &Config) -> String {
    // Single quotes around every value, with `\` and `'` escaped, so that
    // paths with spaces survive.
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", quote(&hosts.join(","))));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if let Some(password) = config.get_password() {
        parts.push(format!(
            "password={}",
            quote(&String::from_utf8_lossy(password))
        ));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(db)));
    }
    parts.join(" ")
}

fn start() -> Result<Server, String> {
    if let Ok(url) = std::env::var(URL_VARIABLE) {
        let admin: Config = url
            .parse()
            .map_err(|e| format!("{URL_VARIABLE} is not a PostgreSQL connection string: {e}"))?;
        return Ok(Server {
            admin,
            _guard: None,
        });
    }
    let bin = bin_dir().ok_or_else(|| {
        format!(
            "PostgreSQL's initdb is not installed (neither on PATH nor in \
             /usr/lib/postgresql/*/bin); these tests need it: apt-get install postgresql, \
             or set {URL_VARIABLE} to a server's URL"
        )
    })?;
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut command = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh"]);
        c
    } else {
        Command::new("sh")
    };
    let mut child = command
        .arg("-c")
        .arg(SCRIPT)
        .arg("sh")
        .arg(&bin)
        // The test's own directory may be closed to the postgres user.
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting PostgreSQL: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or("starting PostgreSQL: no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("starting PostgreSQL: {e}"))?;
    let Some(dir) = line.trim_end().strip_prefix("ready ") else {
        let _ = child.wait();
        return Err(format!(
            "starting a PostgreSQL server from {} failed: {}",
            bin.display(),
            line.trim_end()
        ));
    };
    let mut admin = Config::new();
    admin.host_path(dir).user("postgres").dbname("postgres");
    Ok(Server {
        admin,
        _guard: Some(Mutex::new(child)),
    })
}

/// Where `initdb` and `pg_ctl` are: on PATH, or Debian's newest.
fn bin_dir() -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&paths).find(|d| d.join("initdb").is_file())
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

//! The whole pipeline on the PostgreSQL store (`iotpipe up --store
//! postgres`), and what `up` says when it cannot use the database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use iotpipe::config::StoreKind;

fn postgres_config(dir: &std::path::Path, url: String) -> iotpipe::Config {
    let mut c = support::config(dir);
    c.backend.store = StoreKind::Postgres;
    c.backend.postgres_url = Some(url);
    c.stream.shards = 2;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_verifies_exactly_on_postgres() {
    let db = testkit::postgres::database().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = iotpipe::start(&postgres_config(dir.path(), db.url()))
        .await
        .unwrap();
    support::a_short_run_verifies(&p, 5).await;
    p.shutdown().await.unwrap();
}

#[tokio::test]
async fn up_refuses_a_missing_or_bad_url_and_an_unreachable_server_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut missing = support::config(dir.path());
    missing.backend.store = StoreKind::Postgres;
    let cases = [
        (missing, "--postgres-url"),
        (
            postgres_config(dir.path(), "postgresql://u:secret@h:port/d".into()),
            "not a PostgreSQL connection string",
        ),
        (
            // A socket directory with no server in it.
            postgres_config(
                dir.path(),
                format!("host={} password=secret dbname=d", dir.path().display()),
            ),
            "cannot connect to",
        ),
    ];
    for (config, want) in cases {
        let err = match iotpipe::start(&config).await {
            Ok(_) => panic!("started without a usable database"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("secret"), "no password in messages: {err}");
    }
}

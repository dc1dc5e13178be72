//! `iotpipe`: parse flags, build the config, call the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use iotpipe::Roles;
use iotpipe::config::{Config, DEFAULT_TOML, LogFormat, Overrides};

// The pipeline allocates per message and per batch; mimalloc serves that
// churn several times cheaper than glibc's malloc (measured with callgrind in
// the aggregation core).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Asks the kernel for 4 KiB pages only. mimalloc marks its arenas for
/// transparent huge pages, so the first touch of each 2 MiB zeroes all of it
/// on whichever thread touched it, an endpoint worker as often as not: when
/// a fleet's devices send their first messages at once, a fifth of the
/// process's CPU went to zeroing huge pages, and the pages held memory no
/// one used (see docs/BENCHMARKS.md, "Transparent huge pages"). Failing only
/// leaves them allowed, as on a kernel without the call.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

#[derive(Parser)]
#[command(
    name = "iotpipe",
    version,
    about = "IoT ingestion and stream processing: MQTT in, exact time-window rollups out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline in this process: MQTT endpoint, durable stream,
    /// processors, rollup store and query API.
    Up(Box<UpArgs>),
    /// Run only the MQTT endpoint (and broker bridge), appending to a shared
    /// stream (NATS or Kinesis); `/metrics` and `/healthz` on the HTTP port.
    Ingest(Box<UpArgs>),
    /// Run only the processors, on the shards whose leases this process
    /// holds, writing a shared store (PostgreSQL or DynamoDB); `/metrics`
    /// and `/healthz` on the HTTP port.
    Process(Box<UpArgs>),
    /// Run only the query API and dashboard, reading a shared store.
    Api(Box<UpArgs>),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the MQTT users file (salted password hashes; each user may
    /// publish only as the device of the same name, and subscribe only to its
    /// own topics unless it is an operator).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Estimate the monthly AWS bill of a load profile on the `deploy/` stack.
    Cost(Box<CostArgs>),
}

#[derive(clap::Args)]
struct CostArgs {
    /// Devices in the fleet, each with its own MQTT connection.
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// Messages per device per second (0.0167 is one a minute).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// MQTT payload bytes per message.
    #[arg(long, default_value_t = 120)]
    payload_bytes: u64,
    /// Topic bytes per message, metered with the payload.
    #[arg(long, default_value_t = 30)]
    topic_bytes: u64,
    /// Readings per message: above 1, devices batch them as
    /// `{"readings": [...]}`, fewer and larger messages.
    #[arg(long, default_value_t = 1)]
    readings_per_message: u64,
    /// Publish through IoT Core's Basic Ingest (`$aws/rules/...`): no messaging charge.
    #[arg(long)]
    basic_ingest: bool,
    /// Store items written per reading, as `scripts/bench` or a moto run
    /// measures it; by default modelled from the store's items and how many
    /// readings of a device share a Lambda batch.
    #[arg(long)]
    write_amplification: Option<f64>,
    /// Fleets the devices belong to.
    #[arg(long, default_value_t = 1)]
    fleets: u64,
    /// Stored resolutions: 1 (1m), 2 (and 1h) or 3 (and 1d).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3))]
    resolutions: u64,
    /// Finest windows one span item of a device holds (ten 1-minute windows
    /// by default): a whole number of minutes that divides an hour.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    span: std::time::Duration,
    /// Kinesis capacity mode: on-demand (billed per stream hour and GB) or
    /// provisioned (billed per shard hour, sized to the load).
    #[arg(long, value_enum, default_value = "on-demand")]
    kinesis: iotpipe::cost::KinesisMode,
    /// Most records per Lambda invocation (the template's BatchSize, whose
    /// default is the event source's maximum).
    #[arg(long, default_value_t = 10_000)]
    batch_size: u64,
    /// Seconds the event source gathers records per invocation (the
    /// template's MaximumBatchingWindowInSeconds): longer windows rewrite
    /// each window less often, at the cost of freshness.
    #[arg(long, default_value_t = 1.0)]
    batching_window: f64,
    /// Memory of the aggregate Lambda function, in MB: duration is billed
    /// per GB-second.
    #[arg(long, default_value_t = 256)]
    lambda_memory_mb: u64,
    /// Billed milliseconds of an invocation before its store writes.
    #[arg(long, default_value_t = 20.0)]
    lambda_base_ms: f64,
    /// Billed milliseconds per store write (16 PutItem calls in flight).
    #[arg(long, default_value_t = 0.4)]
    lambda_ms_per_write: f64,
    /// Metrics per reading: they size the store's items.
    #[arg(long, default_value_t = 3)]
    metrics: u64,
    /// How long windows are kept after their end, per resolution, as the
    /// config file's `aggregate.retention` says it (the table's TTL):
    /// `1m=30d,1h=400d,1d=forever`; a resolution left out keeps the default.
    #[arg(long, default_value = "1m=30d,1h=90d,1d=1098d")]
    retention: String,
    /// `forever` windows are priced at what the table holds after they have
    /// accumulated this long: without a TTL the bill grows every month.
    #[arg(long, default_value = "1098d", value_parser = humantime::parse_duration)]
    forever_horizon: std::time::Duration,
    /// A price table (TOML, like src/cost/prices.toml) instead of the built-in one.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Times a day each device connects again: each connect and disconnect
    /// is a presence record (an IoT rule action, a Kinesis record and a
    /// member-row write).
    #[arg(long, default_value_t = 1.0)]
    reconnects_per_day: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UserRole {
    Device,
    Operator,
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add a user with a generated password, printed once.
    Add {
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// `device` subscribes only to its own topics; `operator` may also
        /// watch the whole fleet (`dt/#`).
        #[arg(long, value_enum, default_value_t = UserRole::Device)]
        role: UserRole,
    },
    /// Remove a user.
    Remove {
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// List the users.
    List {
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// A TOML config file (`iotpipe config default` prints one); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default configuration, commented.
    Default,
    /// Check a config file and print it with every default filled in.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => run(*args, Roles::ALL),
        Command::Ingest(args) => run(*args, Roles::INGEST),
        Command::Process(args) => run(*args, Roles::PROCESS),
        Command::Api(args) => run(*args, Roles::API),
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => Config::load(&file).and_then(|c| {
            print!("{}", toml::to_string_pretty(&c)?);
            Ok(())
        }),
        Command::Users(cmd) => users(cmd),
        Command::Cost(args) => cost(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotpipe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn users(cmd: UsersCommand) -> anyhow::Result<()> {
    match cmd {
        UsersCommand::Add { name, file, role } => {
            let role = match role {
                UserRole::Device => ingest::Role::Device,
                UserRole::Operator => ingest::Role::Operator,
            };
            let password = ingest::users::add(&file, &name, role)?;
            println!("{name}: {password}");
            eprintln!("Keep the password now: the file stores only a salted hash.");
        }
        UsersCommand::Remove { name, file } => {
            if !ingest::users::remove(&file, &name)? {
                anyhow::bail!("no user `{name}` in {}", file.display());
            }
        }
        UsersCommand::List { file } => {
            for name in ingest::users::list(&file)? {
                println!("{name}");
            }
        }
    }
    Ok(())
}

fn cost(a: CostArgs) -> anyhow::Result<()> {
    use iotpipe::cost::{Prices, Profile, estimate, render};
    anyhow::ensure!(
        a.rate.is_finite() && a.rate >= 0.0,
        "--rate must be a non-negative number"
    );
    anyhow::ensure!(
        a.write_amplification
            .is_none_or(|w| w.is_finite() && w >= 0.0),
        "--write-amplification must be a non-negative number"
    );
    anyhow::ensure!(
        a.reconnects_per_day.is_finite() && a.reconnects_per_day >= 0.0,
        "--reconnects-per-day must be a non-negative number"
    );
    let prices = match &a.prices {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Prices::parse(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => Prices::default_table()?,
    };
    let span_s = a.span.as_secs_f64();
    anyhow::ensure!(
        span_s >= 60.0 && span_s % 60.0 == 0.0 && 3600.0 % span_s == 0.0,
        "--span must be a whole number of minutes that divides an hour"
    );
    let retention = iotpipe::cost::Retention::parse(
        &a.retention,
        a.resolutions,
        a.forever_horizon.as_secs_f64(),
    )
    .map_err(anyhow::Error::msg)
    .context("--retention")?;
    let profile = Profile {
        devices: a.devices,
        msgs_per_device_per_s: a.rate,
        payload_bytes: a.payload_bytes,
        topic_bytes: a.topic_bytes,
        readings_per_message: a.readings_per_message,
        basic_ingest: a.basic_ingest,
        write_amplification: a.write_amplification,
        metrics_per_reading: a.metrics,
        resolutions: a.resolutions,
        fleets: a.fleets,
        span_s,
        kinesis: a.kinesis,
        batch_size: a.batch_size,
        batching_window_s: a.batching_window,
        lambda_memory_mb: a.lambda_memory_mb,
        lambda_base_ms: a.lambda_base_ms,
        lambda_ms_per_write: a.lambda_ms_per_write,
        retention,
        reconnects_per_day: a.reconnects_per_day,
    };
    print!(
        "{}",
        render(&profile, &prices, &estimate(&profile, &prices))
    );
    Ok(())
}

/// Runs the stages of `roles` until a signal or a failure. The first line
/// on stdout says where it listens: `iotpipe ROLE: mqtt://ADDR http://ADDR …`.
fn run(args: UpArgs, roles: Roles) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    args.overrides.apply(&mut config);
    init_logs(config.log.format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut running = iotpipe::start_roles(&config, roles).await?;
        let mut line = format!("iotpipe {}:", roles.name());
        if let Some(mqtt) = running.mqtt_addr {
            line.push_str(&format!(" mqtt://{mqtt}"));
        }
        line.push_str(&format!(
            " http://{} data {}",
            running.http_addr,
            config.data_dir.display()
        ));
        if let Some(tls) = running.tls_addr {
            line.push_str(&format!(" mqtts://{tls}"));
        }
        if let (true, Some(broker)) = (roles.ingest, &config.broker.url) {
            line.push_str(&format!(" broker {broker}"));
        }
        println!("{line}");
        tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!(signal, "Shutting down: draining every stage.");
                running.shutdown().await?;
                tracing::info!("Stopped cleanly.");
                Ok(())
            }
            why = running.failure() => {
                tracing::error!(reason = %why, "A stage failed; shutting down.");
                let _ = running.shutdown().await;
                anyhow::bail!("{why}")
            }
        }
    })
}

/// Ctrl-C or SIGTERM, whichever comes first.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

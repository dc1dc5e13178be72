use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use device_sim::cli::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = async {
        let mut cfg = args.into_config(std::io::stdout().is_terminal())?;
        if let Some(p) = &mut cfg.processes {
            let argv: Vec<String> = std::env::args().skip(1).collect();
            p.args = device_sim::processes::worker_args(&argv)?;
        }
        if cfg.worker.is_some() {
            // A worker's stdout belongs to its parent: no summary.
            device_sim::serve_worker(cfg).await?;
            return Ok(None);
        }
        let queries = device_sim::cli::query_lines(&cfg);
        device_sim::run(cfg).await.map(|s| Some((s, queries)))
    }
    .await;
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((summary, queries))) => {
            print!("{summary}");
            print!("{}", queries.unwrap_or_default());
            if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("device-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

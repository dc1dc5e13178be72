use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use device_sim::cli::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = async {
        let cfg = args.into_config(std::io::stdout().is_terminal())?;
        let queries = device_sim::cli::query_lines(&cfg);
        device_sim::run(cfg).await.map(|s| (s, queries))
    }
    .await;
    match result {
        Ok((summary, queries)) => {
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

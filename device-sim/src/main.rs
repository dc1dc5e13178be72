use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use device_sim::cli::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = async {
        let cfg = args.into_config(std::io::stdout().is_terminal())?;
        device_sim::run(cfg).await
    }
    .await;
    match result {
        Ok(summary) => {
            print!("{summary}");
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

//! The `walcast` binary: parse the command line, set up logging, run a
//! subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use walcast::cli::{Cli, Command};
use walcast::config::LogFormat;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let settings = match args.settings(|name| std::env::var(name).ok()) {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("walcast: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = init_logging(settings.log_format, &settings.log) {
                eprintln!("walcast: invalid value for `log`: {e}");
                return ExitCode::from(2);
            }
            match run(settings) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "walcast stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(settings: walcast::config::Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        walcast::shutdown::cancel_on_signal(cancel.clone())?;
        tracing::info!(database = %settings.database_url, tenant = %settings.tenant, "walcast starting");
        walcast::daemon::run(&settings, cancel).await?;
        Ok(())
    })
}

fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("{filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

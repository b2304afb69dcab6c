//! The `walcast` binary: parse the command line, set up logging, run a
//! subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use walcast::cli::{CheckArgs, Cli, Command, SetupArgs};
use walcast::config::LogFormat;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        Command::Check(args) => check(&args),
        Command::Setup(args) => setup(&args),
        Command::Gateway(args) => gateway(&args),
    }
}

/// `walcast gateway`: exit 0 after a clean shutdown, 1 when it could not
/// serve, 2 for bad settings (as `run`).
fn gateway(args: &walcast::cli::GatewayArgs) -> ExitCode {
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
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                let cancel = CancellationToken::new();
                walcast::shutdown::cancel_on_signal(cancel.clone())?;
                walcast::gateway::run(&settings, cancel).await?;
                Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "walcast gateway stopped");
            ExitCode::FAILURE
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

/// `walcast check`: exit 0 when nothing blocks replication, 1 when
/// something does, 2 for bad settings (as `run`).
fn check(args: &CheckArgs) -> ExitCode {
    let settings = match args.run.settings(|name| std::env::var(name).ok()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("walcast: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(walcast::check::run(&settings)),
        Err(e) => {
            eprintln!("walcast: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{:#}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    ExitCode::from(report.exit_code())
}

/// `walcast setup`: exit 0 when applied, 1 when the database refused, 2
/// for bad flags.
fn setup(args: &SetupArgs) -> ExitCode {
    use walcast::setup::{Options, apply, render};
    let options = match Options::new(
        &args.admin_url,
        &args.role,
        &args.publication,
        args.auth_helpers,
    ) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("walcast: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(apply(&options)),
        Err(e) => {
            eprintln!("walcast: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(applied) => {
            print!("{}", render(&applied, &options));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walcast: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

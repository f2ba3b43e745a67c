//! The `stem-host` command line. Each subcommand lives in its own module; this one parses the
//! arguments, sets up logging and the async runtime, and turns errors into exit codes.

mod bench;
mod task;
pub mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::runtime::{Runtime, RuntimeConfig};

#[derive(Parser)]
#[command(
    name = "stem-host",
    version,
    about = "Stem for Rust: background tasks that run as sandboxed WebAssembly components",
    long_about = "Stem for Rust: background tasks that run as sandboxed WebAssembly components.\n\n\
                  Task authors build components with the stem-guest SDK \
                  (cargo build --release --target wasm32-wasip2); stem-host inspects and runs them.\n\
                  Set STEM_LOG (e.g. STEM_LOG=debug) to see the host's log on stderr."
)]
pub struct Cli {
    /// Directory of compiled components (defaults to ~/.cache/stem/components).
    #[arg(
        long,
        global = true,
        env = "STEM_COMPONENT_CACHE_DIR",
        value_name = "DIR"
    )]
    cache_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and run task components.
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Measure the platform's speed.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Exit codes: 0 success, 1 the task or operation failed, 2 bad usage (from clap).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = RuntimeConfig {
        cache_dir: cli.cache_dir.or(RuntimeConfig::default().cache_dir),
        ..RuntimeConfig::default()
    };
    match cli.command {
        Command::Task(command) => task::run(command, config).await,
        Command::Bench(command) => bench::run(command, config).await,
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Creates the sandbox runtime, naming what failed.
fn sandbox(config: RuntimeConfig) -> anyhow::Result<std::sync::Arc<Runtime>> {
    Ok(std::sync::Arc::new(Runtime::new(config)?))
}

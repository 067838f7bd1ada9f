//! The `qrgate` command: `serve` (the default) and `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use qrgate::app::App;
use qrgate::config::Config;

#[derive(Parser)]
#[command(
    name = "qrgate",
    version,
    about = "Mercado Pago QR payments for fuel pumps and vending machines"
)]
struct Cli {
    /// A TOML configuration file; without one, built-in defaults run.
    #[arg(long, global = true, env = "QRGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (the default).
    Serve,
    /// Run qrgate, the Mercado Pago simulator and two devices in one process,
    /// and tell the story of one fuel sale and one vending sale.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qrgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Serve => runtime.block_on(serve(cli.config)),
        Cmd::Demo => runtime.block_on(qrgate::demo::run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qrgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    // The configuration is checked before anything binds or logs.
    let config = Config::load(path.as_deref())?;
    qrgate::telemetry::init(&config.log);
    match &path {
        Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        None => tracing::info!("no configuration file: running on built-in defaults (embedded broker, demo POS pump-1 and vending-1)"),
    }
    let app = App::build(config).await?;
    let token = app.shutdown_token();
    tokio::spawn(stop_on_signal(token));
    app.run_until_stopped().await
}

/// SIGTERM or Ctrl-C: stop taking work, finish what is in flight, exit 0.
async fn stop_on_signal(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                token.cancel();
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    token.cancel();
}

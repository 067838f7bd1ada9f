//! `qrgate-pts`: the bridge from a PTS-2 controller to qrgate
//! (docs/devices/pts2.md), and the PTS-2 simulator on its own.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qrgate_pts::auth::Scheme;
use qrgate_pts::bridge::Bridge;
use qrgate_pts::config;
use qrgate_pts::sim::{SimConfig, Simulator};

#[derive(Parser)]
#[command(
    name = "qrgate-pts",
    version,
    about = "A PTS-2 forecourt controller's pumps as qrgate devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the bridge.
    Run {
        /// The bridge's TOML configuration.
        #[arg(long, env = "QRGATE_PTS_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Checks a configuration and says what is wrong with it.
    CheckConfig {
        #[arg(long, env = "QRGATE_PTS_CONFIG")]
        config: std::path::PathBuf,
    },
    /// A pump on the simulated PTS-2 paid by QR, end to end: the Mercado
    /// Pago simulator, the `qrgate` binary, the PTS-2 simulator and the
    /// bridge, on ports the OS picks; prints the story and exits.
    #[cfg(feature = "demo")]
    Demo {
        /// The `qrgate` binary (default: beside this one, else on PATH).
        #[arg(long)]
        qrgate: Option<std::path::PathBuf>,
    },
    /// Runs the PTS-2 simulator (user `qrgate`, password `secret`) until
    /// interrupted; prints its URL and, with --tls, the certificate's
    /// SHA-256 to pin.
    Sim {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long, default_value_t = 2)]
        pumps: u16,
        #[arg(long)]
        tls: bool,
        /// basic or digest.
        #[arg(long, default_value = "digest")]
        auth: String,
        /// Remote mode: also connect out to this bridge (ws://HOST:PORT/ptsWebSocket).
        #[arg(long)]
        remote: Option<String>,
    },
}

fn load(path: &std::path::Path) -> Result<config::BridgeConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    config::parse(&text, |name| std::env::var(name).ok()).map_err(|errors| {
        format!(
            "{}: {} problem(s):\n  {}",
            path.display(),
            errors.len(),
            errors.join("\n  ")
        )
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its own story; the bridge's log would bury it.
    #[cfg(feature = "demo")]
    let quiet = matches!(cli.command, Command::Demo { .. });
    #[cfg(not(feature = "demo"))]
    let quiet = false;
    let default = if quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo { qrgate } => {
            let qrgate = qrgate.unwrap_or_else(qrgate_pts::demo::qrgate_beside_me);
            match qrgate_pts::demo::run(&qrgate, |line| println!("{line}")).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("qrgate-pts demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { config } => match load(&config) {
            Ok(c) => {
                println!("{}: ok, {} pump(s)", config.display(), c.pumps.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(78)
            }
        },
        Command::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(78);
                }
            };
            let bridge = match Bridge::start(cfg).await {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("qrgate-pts: {e:#}");
                    return ExitCode::FAILURE;
                }
            };
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("stopping");
            bridge.stop();
            ExitCode::SUCCESS
        }
        Command::Sim {
            listen,
            pumps,
            tls,
            auth,
            remote,
        } => {
            let scheme = match auth.as_str() {
                "basic" => Scheme::Basic,
                "digest" => Scheme::Digest,
                other => {
                    eprintln!("--auth {other:?}: basic or digest");
                    return ExitCode::from(2);
                }
            };
            let listener = match tokio::net::TcpListener::bind(&listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("--listen {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let cfg = SimConfig {
                pumps,
                tls,
                scheme,
                ..SimConfig::new()
            };
            let sim = match Simulator::start_on(listener, cfg).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("simulator: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "{}",
                serde_json::json!({
                    "pts_sim": "listening",
                    "url": sim.url(),
                    "certificate_sha256": sim.fingerprint(),
                    "id": sim.id(),
                    "user": "qrgate",
                })
            );
            if let Some(url) = remote {
                sim.connect_remote(&url);
            }
            let _ = tokio::signal::ctrl_c().await;
            ExitCode::SUCCESS
        }
    }
}

//! The `qrgate` command: `serve` (the default), `demo` (with the default-on
//! `demo` feature), `pos register` / `pos list` (stores and POS at
//! Mercado Pago), and `backup` (an online copy of the store).

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
    /// Run the book (the default).
    Serve,
    /// Run qrgate, the Mercado Pago simulator and two devices in one process,
    /// and tell the story of one fuel sale and one vending sale.
    #[cfg(feature = "demo")]
    Demo,
    /// Copy the live database to PATH, consistently, while qrgate serves.
    /// Exit status: 0 done, 78 a configuration error, 1 anything else.
    Backup {
        /// Where the copy goes (a new file; see --force).
        path: PathBuf,
        /// Replace PATH if it exists.
        #[arg(long)]
        force: bool,
    },
    /// The configured stores and POS at Mercado Pago.
    Pos {
        #[command(subcommand)]
        command: PosCmd,
    },
}

#[derive(Subcommand)]
enum PosCmd {
    /// Create the stores and POS the configuration names at Mercado Pago and
    /// fix what differs there (url, name, category, store). Safe to re-run.
    Register {
        /// Only look and say what would be created or changed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show each configured POS beside what Mercado Pago has. Exit status: 0
    /// when everything matches, 1 when something differs, 2 on an error.
    List,
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
        #[cfg(feature = "demo")]
        Cmd::Demo => runtime.block_on(qrgate::demo::run()),
        Cmd::Pos { command } => return runtime.block_on(pos(cli.config, command)),
        Cmd::Backup { path, force } => return backup(cli.config.as_deref(), &path, force),
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
    // Before anything opens a descriptor that counts against it: every
    // public connection holds one, and slow clients hold theirs the longest.
    match qrgate::http::edge::raise_fd_limit() {
        Some(l) if l.now < l.hard => {
            tracing::warn!(
                nofile = l.now,
                hard = l.hard,
                "the file descriptor limit could not be raised to its hard limit"
            )
        }
        Some(l) => tracing::info!(nofile = l.now, was = l.before, "file descriptor limit"),
        None => {}
    }
    let app = App::build(config).await?;
    let token = app.shutdown_token();
    tokio::spawn(stop_on_signal(token));
    app.run_until_stopped().await
}

/// `pos register` exits 1 when anything failed; `pos list` exits 1 when
/// something differs and 2 on an error.
async fn pos(path: Option<PathBuf>, command: PosCmd) -> ExitCode {
    use qrgate::mercadopago::pos_api::PosApi;
    use qrgate::registration;

    let error = ExitCode::from(match command {
        PosCmd::List => 2,
        PosCmd::Register { .. } => 1,
    });
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qrgate: {e}");
            return error;
        }
    };
    // Warnings (retried calls) go to stderr, apart from the table.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .try_init();
    let secrets = registration::secrets(&config);
    let say = |text: &str| print!("{}", registration::redact(text, &secrets));
    let api = match PosApi::new(&config.mercadopago) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("qrgate: {e}");
            return error;
        }
    };
    match command {
        PosCmd::List => {
            let report = registration::sync(&config, &api, true).await;
            say(&report.render_list());
            ExitCode::from(if report.failures() > 0 {
                2
            } else if report.differs() {
                1
            } else {
                0
            })
        }
        PosCmd::Register { dry_run } => {
            // Opened first: a store that cannot keep the QR links stops the
            // run before anything changes at Mercado Pago.
            let store = if dry_run {
                None
            } else {
                match qrgate::store::SqliteStore::open(&config.store.path, config.store.fsync) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        eprintln!("qrgate: {e}");
                        return error;
                    }
                }
            };
            let report = registration::sync(&config, &api, dry_run).await;
            say(&report.render_register());
            let mut ok = report.failures() == 0;
            if let Some(store) = store {
                let now = chrono::Utc::now().timestamp_millis();
                if let Err(e) = registration::record(&store, &report, now).await {
                    eprintln!("qrgate: Mercado Pago is up to date, but the QR links could not be kept in {}: {e}", config.store.path.display());
                    ok = false;
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                error
            }
        }
    }
}

/// `qrgate backup PATH`: the store `serve` would open, copied online.
fn backup(config: Option<&std::path::Path>, to: &std::path::Path, force: bool) -> ExitCode {
    /// sysexits.h's EX_CONFIG, as systemd and scripts read it.
    const CONFIG_ERROR: u8 = 78;
    let config = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qrgate: {e}");
            return ExitCode::from(CONFIG_ERROR);
        }
    };
    match qrgate::store::backup::backup(&config.store.path, to, force) {
        Ok(copied) => {
            println!(
                "qrgate: {} backed up to {} ({} pages, {} bytes)",
                config.store.path.display(),
                to.display(),
                copied.pages,
                copied.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qrgate: {e}");
            ExitCode::FAILURE
        }
    }
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

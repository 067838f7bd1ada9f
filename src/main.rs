//! The `qrgate` command: `serve` (the default), `check-config`, `health`
//! (asks a running qrgate whether it is ready), `demo` and `simulator` (with
//! the default-on `demo` feature), `pos register` / `pos list` (stores and
//! POS at Mercado Pago), and `backup` (an online copy of the store). A
//! configuration error exits 78 (`EX_CONFIG`) whatever the subcommand but
//! `health`, which a container engine reads as 0 or 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use qrgate::app::App;
use qrgate::config::{self, Config, ConfigError, Purpose, EX_CONFIG};

#[derive(Parser)]
#[command(
    name = "qrgate",
    version,
    about = "Mercado Pago QR payments for fuel pumps and vending machines"
)]
struct Cli {
    /// The TOML configuration file. Without it: QRGATE_CONFIG, else
    /// /etc/qrgate/qrgate.toml when it exists, else the development defaults
    /// (loopback only).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the book (the default).
    Serve,
    /// Check the configuration and print it as qrgate would run it, every
    /// secret masked. Exit status: 0 when valid, 78 when not.
    CheckConfig,
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
    /// Ask the running qrgate's /readyz whether it can take sales: exit 0
    /// when ready, 1 otherwise, with one line saying why (health checks).
    Health,
    /// The Mercado Pago simulator on its own (the `mpsim` command): `qrgate
    /// simulator` serves it, `qrgate simulator scan|pay|notify|…` drives it.
    #[cfg(feature = "demo")]
    Simulator(mpsim::cli::Args),
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

/// `--help`'s list of the environment qrgate reads.
fn environment_help() -> String {
    let mut out = String::from("Environment:\n");
    for (name, meaning) in config::ENVIRONMENT {
        out.push_str(&format!("  {name}\n      {meaning}\n"));
    }
    out.push_str(&format!(
        "\nExit status: {EX_CONFIG} on a configuration error, whatever the subcommand."
    ));
    out
}

fn main() -> ExitCode {
    let matches = Cli::command().after_help(environment_help()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let command = cli.command.unwrap_or(Cmd::Serve);
    #[cfg(feature = "demo")]
    if matches!(command, Cmd::Demo) && cli.config.is_some() {
        eprintln!(
            "qrgate: `qrgate demo` runs on its own configuration (ports the OS picks, a temporary \
             store, simulators); it takes no --config. Use `qrgate serve --config PATH`."
        );
        return ExitCode::from(2);
    }
    let path = config::locate(
        cli.config.as_deref(),
        &|name| std::env::var(name).ok(),
        Path::new(config::SYSTEM_CONFIG),
    );
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
    let result = match command {
        Cmd::Serve => runtime.block_on(serve(path)),
        Cmd::CheckConfig => return check_config(path.as_deref()),
        #[cfg(feature = "demo")]
        Cmd::Demo => runtime.block_on(qrgate::demo::run()),
        Cmd::Pos { command } => return runtime.block_on(pos(path, command)),
        Cmd::Backup { path: to, force } => return backup(path.as_deref(), &to, force),
        Cmd::Health => return runtime.block_on(qrgate::healthcheck::run(path.as_deref())),
        #[cfg(feature = "demo")]
        Cmd::Simulator(args) => return runtime.block_on(mpsim::cli::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qrgate: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `qrgate check-config`: the effective configuration on stdout, or the
/// errors on stderr.
fn check_config(path: Option<&Path>) -> ExitCode {
    match Config::check(path, &|name| std::env::var(name).ok()) {
        Ok(text) => {
            match path {
                Some(p) => println!("# file: {}", p.display()),
                None => println!("# no configuration file: the development defaults"),
            }
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qrgate: {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

async fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    // The configuration is checked before anything binds or logs.
    let config = Config::load(path.as_deref())?;
    qrgate::telemetry::init(&config.log);
    match &path {
        Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
        None => tracing::warn!(
            "no configuration file (--config, {} or {}): running the development defaults, on \
             loopback only: embedded broker taking anonymous clients, demo POS pump-1 and vending-1",
            config::CONFIG_ENV,
            config::SYSTEM_CONFIG
        ),
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
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
    qrgate::service::spawn(app.http_addr(), app.book().store().clone(), token.clone());
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
    // Only Mercado Pago's secrets: the console's token and the MQTT
    // passwords belong to `serve`.
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::load_for(path.as_deref(), &env, Purpose::Registration) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qrgate: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Warnings (retried calls) go to stderr, apart from the table.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
                match open_store(&config).await {
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
                if let Err(e) = registration::record(store.as_ref(), &report, now).await {
                    let kept_in = config.store.url.as_ref().map_or_else(
                        || config.store.path.display().to_string(),
                        ToString::to_string,
                    );
                    eprintln!("qrgate: Mercado Pago is up to date, but the QR links could not be kept in {kept_in}: {e}");
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

/// The store `serve` would use, opened beside it (no single-instance lock).
async fn open_store(
    config: &Config,
) -> Result<Box<dyn qrgate::store::Store>, qrgate::store::StoreError> {
    Ok(match &config.store.url {
        Some(url) => {
            let password = config.store.password.as_ref().map(|p| p.expose());
            Box::new(qrgate::store::PgStore::open(url, password).await?)
        }
        None => Box::new(qrgate::store::SqliteStore::open(
            &config.store.path,
            config.store.fsync,
        )?),
    })
}

/// `qrgate backup PATH`: the store `serve` would open, copied online.
fn backup(config: Option<&Path>, to: &Path, force: bool) -> ExitCode {
    // Only the store's path is needed: a backup run from cron need not hold
    // the service's secrets (the console's token, MQTT passwords).
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::load_for(config, &env, Purpose::Registration) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qrgate: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Some(url) = &config.store.url {
        eprintln!(
            "qrgate: the store is PostgreSQL ({url}); `qrgate backup` copies SQLite files only. \
             Back it up with pg_dump: pg_dump --format=custom --file={} '{url}' \
             (docs/operations.md, \"PostgreSQL\")",
            to.display()
        );
        return ExitCode::FAILURE;
    }
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
    qrgate::service::stopping();
    token.cancel();
}

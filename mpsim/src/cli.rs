//! The simulator as a command, for device makers and integrators who try qrgate without Mercado
//! Pago: `mpsim serve` runs it on an address of their choosing; every other command is one call
//! of its control API (`control`), so a script or a second terminal plays the customer and MP's
//! backend. `qrgate simulator` is this same command inside qrgate's binary (its `demo` feature).
//!
//! `serve` prints one JSON line first, on stdout, before anything else is written there:
//! `{"mpsim":"listening","base_url":…,"control":…,"access_token":…,"collector_id":…}`, so
//! that a script or a test started on port 0 learns where it is. Its log goes to stderr.
//!
//! Exit status: 0 done; 1 the simulator refused (its message is printed); 2 it could not be
//! reached, or `serve` could not start.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::{json, Value};

use crate::{Simulator, SimulatorConfig};

/// Where `serve` listens by default, and where the other commands look for it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";
const DEFAULT_URL: &str = "http://127.0.0.1:8090";
/// Longer than a scan (10 s) or a round of notifications (22 s) can take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const SITE_CURRENCIES: &[&str] = &["ARS", "BRL", "CLP", "COP", "MXN", "PEN", "UYU"];

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The running simulator the commands talk to.
    #[arg(long, global = true, env = "MPSIM_URL", default_value = DEFAULT_URL)]
    pub sim: String,
    /// Print the control API's JSON answer instead of a sentence.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the simulator (the default).
    ///
    /// Mercado Pago's API for qrgate, and the control API the other commands call, under /_sim/.
    Serve(Serve),
    /// A customer scans a POS's QR.
    ///
    /// Its POS URL is polled once, as Mercado Pago's app does; an order answer opens a merchant
    /// order, remembered as the POS's last scan.
    Scan {
        /// A POS registered here (its external_id or name), an attended POS, or a POS URL.
        target: String,
    },
    /// The customer pays.
    ///
    /// The IPN and the webhook go to the order's notification_url before this returns, unless
    /// notifications are withheld.
    Pay {
        /// A POS (the merchant order its last scan opened, while payable; else it is scanned
        /// first), a merchant order, an external_reference (its newest payable merchant order) or
        /// an Orders API order.
        target: String,
        /// approved, rejected or in_process.
        #[arg(long, default_value = "approved")]
        status: String,
        /// Why a rejected payment was rejected, in Mercado Pago's words
        /// (cc_rejected_insufficient_amount, cc_rejected_call_for_authorize…).
        #[arg(long)]
        status_detail: Option<String>,
        /// What an approved payment paid, when not what is left to pay (a short or an over
        /// payment).
        #[arg(long)]
        amount: Option<String>,
    },
    /// Send notifications now.
    Notify {
        /// Without it, every withheld notification; a merchant order: its IPN (a POS: its last
        /// scan's; a reference: each of its merchant orders); a payment: its webhook.
        target: Option<String>,
    },
    /// Keep payments' notifications instead of sending them, or stop keeping them.
    ///
    /// While on, qrgate must find payments by reconciliation, or be told by `notify`. Turning it
    /// off sends nothing by itself.
    WithholdNotifications {
        #[arg(value_parser = ["on", "off"])]
        switch: String,
    },
    /// A refund made at Mercado Pago itself (the seller's panel).
    ///
    /// qrgate is not told: its own refunds are its operator's, through its console.
    Refund {
        /// The payment's id.
        payment: String,
        /// How much; all that is left of the payment by default.
        amount: Option<String>,
    },
    /// Mercado Pago gives up on an unpaid order.
    Expire {
        /// A merchant order (a POS: its last scan's; a reference: each payable one), an attended
        /// POS's order, or an Orders API order.
        target: String,
    },
    /// Everything the simulator holds, as JSON.
    ///
    /// Stores, POS, merchant orders, payments, refunds, the latest notifications, withheld ones.
    State,
}

#[derive(ClapArgs, Debug)]
pub struct Serve {
    /// Address to listen on; port 0 lets the OS pick one (the first line on stdout says which).
    #[arg(long, env = "MPSIM_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// The access token Mercado Pago's API requires (give qrgate the same one).
    #[arg(long, env = "MPSIM_ACCESS_TOKEN", default_value = "TEST-sim-token")]
    pub access_token: String,
    /// The seller's user id: qrgate's `[mercadopago] collector_id` must be this.
    #[arg(long, default_value_t = 178_106_235)]
    pub collector_id: u64,
    /// Shown as the merchant orders' sponsor_id (Mercado Pago usually shows none).
    #[arg(long)]
    pub sponsor_id: Option<u64>,
    /// The site's currency: ARS BRL CLP COP MXN PEN UYU.
    #[arg(long, default_value = "ARS")]
    pub currency: String,
}

/// `serve` with every default, for a command line that names no command.
#[derive(Parser)]
struct ServeDefaults {
    #[command(flatten)]
    serve: Serve,
}

pub async fn run(args: Args) -> ExitCode {
    let call = match args.command {
        None => return serve(ServeDefaults::parse_from(["mpsim"]).serve).await,
        Some(Command::Serve(options)) => return serve(options).await,
        Some(Command::State) => Call::get("state"),
        Some(Command::Scan { target }) => Call::post("scan", json!({"target": target})),
        Some(Command::Pay {
            target,
            status,
            status_detail,
            amount,
        }) => Call::post(
            "pay",
            json!({"target": target, "status": status, "status_detail": status_detail,
                   "amount": amount}),
        ),
        Some(Command::Notify { target }) => Call::post("notify", json!({"target": target})),
        Some(Command::WithholdNotifications { switch }) => {
            Call::post("withhold-notifications", json!({"on": switch == "on"}))
        }
        Some(Command::Refund { payment, amount }) => {
            Call::post("refund", json!({"target": payment, "amount": amount}))
        }
        Some(Command::Expire { target }) => Call::post("expire", json!({"target": target})),
    };
    let kind = call.name;
    match call.send(&args.sim).await {
        Err(message) => {
            eprintln!("mpsim: {message}");
            ExitCode::from(2)
        }
        Ok((status, answer)) if status >= 400 => {
            let message = answer["message"].as_str().unwrap_or("(no message)");
            let code = answer["error"].as_str().unwrap_or("error");
            if args.json {
                println!("{answer}");
            }
            eprintln!("mpsim: {kind}: {message} ({code})");
            ExitCode::from(1)
        }
        Ok((_, answer)) => {
            if args.json {
                println!("{answer}");
            } else {
                println!("{}", describe(kind, &answer));
            }
            ExitCode::SUCCESS
        }
    }
}

async fn serve(options: Serve) -> ExitCode {
    // One line per scan, payment, notification and refund; actix's own start and stop lines
    // say nothing a device maker needs. RUST_LOG replaces this filter.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,actix_server=warn")),
        )
        .with_target(false)
        .try_init();
    let currency = options.currency.to_ascii_uppercase();
    if !SITE_CURRENCIES.contains(&currency.as_str()) {
        eprintln!(
            "mpsim: --currency {}: one of {}",
            options.currency,
            SITE_CURRENCIES.join(" ")
        );
        return ExitCode::from(2);
    }
    let listener = match std::net::TcpListener::bind(options.listen) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "mpsim: cannot listen on {}: {error} (choose another with --listen; port 0 lets \
                 the OS pick one)",
                options.listen
            );
            return ExitCode::from(2);
        }
    };
    let config = SimulatorConfig {
        access_token: options.access_token,
        collector_id: options.collector_id,
        sponsor_id: options.sponsor_id,
        site_currency: currency,
    };
    let (access_token, collector_id) = (config.access_token.clone(), config.collector_id);
    let sim = match Simulator::start_on(listener, config).await {
        Ok(sim) => sim,
        Err(error) => {
            eprintln!("mpsim: cannot start: {error}");
            return ExitCode::from(2);
        }
    };
    let first_line = json!({
        "mpsim": "listening",
        "base_url": sim.base_url(),
        "control": format!("{}{}/", sim.base_url(), crate::control::PREFIX),
        // The simulator's own token, which qrgate must be given; it opens nothing real.
        "access_token": access_token,
        "collector_id": collector_id,
    });
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{first_line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        // Nobody reads the address: the simulator still serves whoever knows it.
        tracing::warn!("stdout is closed: the listening line could not be printed");
    }
    drop(stdout);
    stopped().await;
    tracing::info!("stopping");
    sim.stop().await;
    ExitCode::SUCCESS
}

/// SIGTERM or Ctrl-C.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// One call of the control API.
struct Call {
    name: &'static str,
    body: Option<Value>,
}

impl Call {
    fn get(name: &'static str) -> Call {
        Call { name, body: None }
    }

    fn post(name: &'static str, body: Value) -> Call {
        Call {
            name,
            body: Some(body),
        }
    }

    /// (HTTP status, JSON answer), or why the simulator could not be asked.
    async fn send(self, sim: &str) -> Result<(u16, Value), String> {
        let url = format!(
            "{}{}/{}",
            sim.trim_end_matches('/'),
            crate::control::PREFIX,
            self.name
        );
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|error| format!("cannot make an HTTP client: {error}"))?;
        let request = match &self.body {
            None => client.get(&url),
            Some(body) => client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string()),
        };
        let unreachable = |error: reqwest::Error| {
            format!(
                "cannot reach the simulator at {sim}: {error} (start it with `mpsim serve`, or \
                 name it with --sim or MPSIM_URL)"
            )
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(unreachable)?;
        let answer = serde_json::from_str(&text).map_err(|_| {
            format!("{url} answered HTTP {status} without JSON: is it a simulator? {text:.200}")
        })?;
        Ok((status, answer))
    }
}

/// One or a few lines that say what happened, in the words of the device contract and MP.
fn describe(kind: &str, answer: &Value) -> String {
    let text = |key: &str| match &answer[key] {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_owned(),
        other => other.to_string(),
    };
    match kind {
        "scan" if answer["answer"] == "order" => format!(
            "{}: HTTP {} an order of {} {} (external_reference {}): {}",
            text("pos"),
            text("http_status"),
            text("total_amount"),
            text("currency_id"),
            text("external_reference"),
            match answer["order_id"].as_str() {
                Some(order) => format!("Orders API order {order}"),
                None => format!("merchant order {} opened", text("merchant_order")),
            }
        ),
        "scan" => format!(
            "{}: HTTP {} {}{}: nothing to pay",
            text("pos"),
            text("http_status"),
            text("kind"),
            answer["message"]
                .as_str()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        ),
        "pay" => {
            let what = match answer["order_id"].as_str() {
                Some(order) => format!("Orders API order {order}"),
                None => format!(
                    "{} {} on merchant order {}",
                    text("amount"),
                    text("currency_id"),
                    text("merchant_order")
                ),
            };
            format!(
                "payment {} {} ({}): {what} (external_reference {}){}",
                text("payment"),
                text("status"),
                text("status_detail"),
                text("external_reference"),
                notifications(answer)
            )
        }
        "notify" => {
            let line = notifications(answer);
            if line.is_empty() {
                "nothing to send".to_owned()
            } else {
                line.trim_start_matches("; ").to_owned()
            }
        }
        "withhold-notifications" => format!(
            "notifications withheld: {}{}",
            if answer["withholding"] == true {
                "on"
            } else {
                "off"
            },
            match answer["withheld"].as_u64() {
                Some(waiting) if waiting > 0 => {
                    format!(" ({waiting} waiting; `mpsim notify` sends them)")
                }
                _ => String::new(),
            }
        ),
        "refund" => format!(
            "refund {} of payment {}: {} of {} {} refunded, payment {} ({})",
            text("refund"),
            text("payment"),
            text("refunded"),
            text("amount"),
            text("currency_id"),
            text("status"),
            text("status_detail")
        ),
        "expire" => {
            let expired: Vec<String> = answer["expired"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    e.as_object()
                        .and_then(|o| o.iter().next())
                        .map(|(what, id)| format!("{} {id}", what.replace('_', " ")))
                        .unwrap_or_default()
                })
                .collect();
            format!("expired: {}", expired.join(", "))
        }
        _ => serde_json::to_string_pretty(answer).unwrap_or_default(),
    }
}

/// "; notifications: POST url -> 200, …" or "; 2 notification(s) withheld …".
fn notifications(answer: &Value) -> String {
    let sent: Vec<String> = answer["notifications"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let status = n["status"]
                .as_u64()
                .map_or("no answer".to_owned(), |s| format!("HTTP {s}"));
            format!("POST {} -> {status}", n["url"].as_str().unwrap_or("?"))
        })
        .collect();
    let withheld = answer["withheld"].as_u64().unwrap_or(0);
    let mut line = String::new();
    if !sent.is_empty() {
        line.push_str("; notifications: ");
        line.push_str(&sent.join(", "));
    }
    if withheld > 0
        && answer["notifications"]
            .as_array()
            .is_some_and(Vec::is_empty)
    {
        line.push_str(&format!(
            "; {withheld} notification(s) withheld (`mpsim notify` sends them)"
        ));
    }
    line
}

//! `mpsim`: the Mercado Pago simulator as a process of its own (see `cli`).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mpsim",
    version,
    about = "A Mercado Pago simulator: its API for qrgate, and commands that play the customer's app and Mercado Pago's backend"
)]
struct Cli {
    #[command(flatten)]
    args: mpsim::cli::Args,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(mpsim::cli::run(cli.args)),
        Err(error) => {
            eprintln!("mpsim: cannot start the runtime: {error}");
            ExitCode::from(2)
        }
    }
}

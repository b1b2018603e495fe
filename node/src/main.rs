//! The `tether` binary.

use clap::Parser;
use tether_node::config::{Cli, Command, Config};
use tracing_subscriber::EnvFilter;

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("TETHER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let json = args.log_json;
            init_logging(json);
            let config = match Config::load(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tether: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let result = actix_rt::System::new().block_on(tether_node::server::run(config));
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tether: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => match tether_node::check::run(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tether check: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Admin(cmd) => match tether_node::admin::run(cmd) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tether admin: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

//! The `tether` binary.

use clap::Parser;
use tether_node::config::{Cli, Command, Config};

/// `--features dhat-heap` only (issue 17): every allocation recorded by dhat-rs.
#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            tether_node::heap_profile::start();
            let config = match Config::load(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tether: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let mut telemetry = match tether_node::telemetry::init(
                &config.telemetry,
                config.log_json,
                &config.node_id,
            ) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("tether: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let result = actix_rt::System::new().block_on(tether_node::server::run(config));
            // The node drained: export the spans still buffered before exiting.
            telemetry.shutdown();
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

//! `tether-chaos`: the SREs' chaos suite (see `tether_chaos_tests::cli`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    tether_chaos_tests::cli::run(tether_chaos_tests::cli::Cli::parse())
}

//! The `chatserver` binary: parses the command line and hands the settings
//! to the library ([`chatserver::serve`]).

use std::process::ExitCode;

use chatserver::cli::Args;
use clap::Parser;

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // A subcommand beside the positional form `PORT BLOCK TIMEOUT`, so it
    // is told apart by hand.
    if std::env::args().nth(1).as_deref() == Some("hash-password") {
        return chatserver::hash_password::run(std::env::args().skip(2).collect());
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // clap's whole message: what is wrong (every missing argument
            // named), the usage, and where help is; help and version go to
            // stdout with status 0, errors to stderr with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let settings = match args.into_settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("chatserver: {e}; try 'chatserver --help'");
            return ExitCode::from(2);
        }
    };
    chatserver::logging::init();
    match chatserver::serve(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatserver: {e}");
            ExitCode::FAILURE
        }
    }
}

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
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            eprintln!(
                "chatserver: {}; try 'chatserver --help'",
                summary(&e.to_string())
            );
            return ExitCode::from(2);
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

/// clap's message on one line: its first paragraph (which may list what
/// is missing on the lines below "…not provided:"), without the usage.
fn summary(s: &str) -> String {
    let paragraph: Vec<&str> = s
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let text = paragraph.join(" ");
    text.strip_prefix("error: ").unwrap_or(&text).to_owned()
}

//! The `chatserver` binary: parses the command line and hands the settings
//! to the library ([`chatserver::serve`]).

use std::process::ExitCode;

use chatserver::cli::Args;
use chatserver::config_file::{self, ConfigFile};
use clap::{CommandFactory, FromArgMatches};

#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // A subcommand beside the positional form `PORT BLOCK TIMEOUT`, so it
    // is told apart by hand.
    if std::env::args().nth(1).as_deref() == Some("hash-password") {
        return chatserver::hash_password::run(std::env::args().skip(2).collect());
    }
    if std::env::args().nth(1).as_deref() == Some("user") {
        return chatserver::user_command::run(std::env::args().skip(2).collect());
    }
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = Args::command();
    // `--config FILE`: its keys become flags before the command line's.
    let file = match ConfigFile::from_args(&argv, &command) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("chatserver: {e}");
            return ExitCode::from(2);
        }
    };
    let merged = file
        .as_ref()
        .map_or_else(|| argv.clone(), |file| file.merge(&argv));
    let parsed = command
        .clone()
        .try_get_matches_from(&merged)
        .and_then(|matches| Args::from_arg_matches(&matches).map(|args| (args, matches)));
    let (args, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // A value from the file is named by its line.
            if let Some(explained) = file.as_ref().and_then(|file| file.explain(&e, &argv)) {
                eprintln!("chatserver: {explained}");
                return ExitCode::from(2);
            }
            // clap's whole message: what is wrong (every missing argument
            // named), the usage, and where help is; help and version go to
            // stdout with status 0, errors to stderr with status 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let print_config = args.print_config();
    let settings = match args.into_settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("chatserver: {e}; try 'chatserver --help'");
            return ExitCode::from(2);
        }
    };
    if print_config {
        print!("{}", config_file::render(&command, &matches));
        return ExitCode::SUCCESS;
    }
    chatserver::logging::init();
    match chatserver::serve(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatserver: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `chatserver hash-password`: prints the Argon2id hash of a password, in
//! PHC string form, for the credentials file.
//!
//! On a terminal the password is read twice without echo; otherwise one
//! line of standard input is the password (for scripts).

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::Argon2;
use chatproto::Password;

/// Runs `chatserver hash-password` with the arguments after it.
pub fn run(args: Vec<String>) -> ExitCode {
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            println!(
                "Usage: chatserver hash-password\n\n\
                 Reads a password (twice and without echo on a terminal, else one line of\n\
                 standard input) and prints its Argon2id hash for the credentials file:\n\
                 `username $argon2id$v=19$...`."
            );
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "chatserver hash-password: unexpected argument {other:?}: it reads the password from the terminal or standard input; try 'chatserver hash-password --help'"
            );
            return ExitCode::from(2);
        }
    }
    let password = match read_password() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chatserver hash-password: {e}");
            return ExitCode::FAILURE;
        }
    };
    match hash(&password) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chatserver hash-password: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The PHC string of `password` with a fresh random salt and Argon2id's
/// default parameters (19 MiB, 2 passes, 1 lane: OWASP's minimum).
pub fn hash(password: &Password) -> Result<String, String> {
    // The OS random generator, through uuid (already a dependency).
    let salt = SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes())
        .map_err(|e| format!("cannot make a salt: {e}"))?;
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash: {e}"))
}

/// A password: twice without echo on a terminal, else one line of
/// standard input (for scripts).
pub(crate) fn read_password() -> Result<Password, String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        let password = Password::new(&first).map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        if again != first {
            return Err("the passwords differ".to_owned());
        }
        Ok(password)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return Err("no password on standard input".to_owned());
        }
        Password::new(line).map_err(|e| e.to_string())
    }
}

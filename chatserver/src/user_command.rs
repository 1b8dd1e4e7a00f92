//! `chatserver user add|passwd|remove|list`: edits the credentials file in
//! place, safely.
//!
//! The file is checked before any change (a file with a mistake is left
//! alone, the mistake named with its line). A change keeps every other
//! line as it was, comments included, and writes new passwords as
//! Argon2id hashes. The new contents go to a temporary file beside the
//! target, with the target's mode and owner, are flushed to disk, and
//! replace the target in one rename (a symlink is followed to the file it
//! names), so a crash leaves either the old file or the new one.
//!
//! A running server reads the file at start-up: restart it to apply the
//! change, on every node of a cluster.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chatproto::{Password, Username};
use clap::{Parser, Subcommand};

use crate::credentials;

/// Edits the accounts of the credentials file.
#[derive(Debug, Parser)]
#[command(name = "chatserver user")]
struct UserArgs {
    /// The credentials file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "credentials.txt",
        global = true
    )]
    credentials: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Adds an account; its password is read without echo on a terminal
    /// (twice), else from one line of standard input.
    Add {
        /// The new account's name.
        name: Username,
    },
    /// Sets an account's password (read as for `add`).
    Passwd {
        /// The account.
        name: Username,
    },
    /// Removes an account.
    Remove {
        /// The account.
        name: Username,
    },
    /// Lists the accounts, one a line, and whether each password is
    /// hashed.
    List,
}

/// Why the file was not changed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The file cannot be read, or holds a mistake.
    #[error("{0}")]
    Credentials(#[from] credentials::CredentialsError),
    /// `add` of a name the file has.
    #[error("{path}: there is already an account '{name}'", path = path.display())]
    Exists {
        /// The file.
        path: PathBuf,
        /// The name.
        name: Username,
    },
    /// `passwd` or `remove` of a name the file does not have.
    #[error("{path}: no account '{name}'", path = path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The name.
        name: Username,
    },
    /// The password could not be read or hashed.
    #[error("{0}")]
    Password(String),
    /// Writing the new file failed; the old one is untouched.
    #[error("cannot write {path}: {source}", path = path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs `chatserver user` with the arguments after `user`.
pub fn run(args: Vec<String>) -> ExitCode {
    let args =
        match UserArgs::try_parse_from(std::iter::once("chatserver user".to_owned()).chain(args)) {
            Ok(args) => args,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            }
        };
    let path = &args.credentials;
    let done = match &args.action {
        Action::List => list(path).map(|lines| {
            for line in lines {
                println!("{line}");
            }
        }),
        Action::Add { name } => read_password()
            .and_then(|password| add(path, name, &password))
            .map(|()| println!("added {name} to {}", path.display())),
        Action::Passwd { name } => read_password()
            .and_then(|password| passwd(path, name, &password))
            .map(|()| println!("changed the password of {name} in {}", path.display())),
        Action::Remove { name } => {
            remove(path, name).map(|()| println!("removed {name} from {}", path.display()))
        }
    };
    match done {
        Ok(()) => {
            if !matches!(args.action, Action::List) {
                eprintln!(
                    "chatserver user: restart the server to apply it (in a cluster, change every node's file, then restart each)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chatserver user: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Each account: its name, and whether its password is hashed.
pub fn list(path: &Path) -> Result<Vec<String>, EditError> {
    let text = read_checked(path)?;
    Ok(accounts_in(&text)
        .map(|(_, name, hashed)| {
            format!(
                "{name}{}",
                if hashed { "" } else { " (plaintext password)" }
            )
        })
        .collect())
}

/// Adds `name` with `password`, hashed. A file that does not exist yet
/// is made (readable by its owner only), and one with no account yet
/// (only comments) is fine.
pub fn add(path: &Path, name: &Username, password: &Password) -> Result<(), EditError> {
    let text = match credentials::load(path) {
        Ok(_) | Err(credentials::CredentialsError::Empty { .. }) => read_checked_text(path)?,
        Err(credentials::CredentialsError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            let hash = crate::hash_password::hash(password).map_err(EditError::Password)?;
            return create(path, &format!("{name} {hash}\n"));
        }
        Err(e) => return Err(e.into()),
    };
    if accounts_in(&text).any(|(_, n, _)| n == name.as_str()) {
        return Err(EditError::Exists {
            path: path.to_owned(),
            name: name.clone(),
        });
    }
    let hash = crate::hash_password::hash(password).map_err(EditError::Password)?;
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(&format!("{name} {hash}\n"));
    replace(path, &new)
}

/// Sets `name`'s password to `password`, hashed.
pub fn passwd(path: &Path, name: &Username, password: &Password) -> Result<(), EditError> {
    let hash = crate::hash_password::hash(password).map_err(EditError::Password)?;
    edit_line(path, name, |line| {
        // The name as written, then the new credential.
        let written = line.split_whitespace().next().unwrap_or_default();
        Some(format!("{written} {hash}"))
    })
}

/// Removes `name`.
pub fn remove(path: &Path, name: &Username) -> Result<(), EditError> {
    edit_line(path, name, |_| None)
}

/// The file's text, once it is known to parse.
fn read_checked(path: &Path) -> Result<String, EditError> {
    credentials::load(path)?;
    read_checked_text(path)
}

fn read_checked_text(path: &Path) -> Result<String, EditError> {
    std::fs::read_to_string(path).map_err(|source| {
        EditError::Credentials(credentials::CredentialsError::Read {
            path: path.to_owned(),
            source,
        })
    })
}

/// The accounts' lines: (line index, name, hashed).
fn accounts_in(text: &str) -> impl Iterator<Item = (usize, &str, bool)> {
    text.lines().enumerate().filter_map(|(index, line)| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut fields = line.split_whitespace();
        let name = fields.next()?;
        let hashed = fields.next().is_some_and(|p| p.starts_with('$'));
        Some((index, name, hashed))
    })
}

/// Replaces `name`'s line with what `change` makes of it (`None`: no
/// line), every other line kept as it was.
fn edit_line(
    path: &Path,
    name: &Username,
    change: impl FnOnce(&str) -> Option<String>,
) -> Result<(), EditError> {
    let text = read_checked(path)?;
    let Some((at, _, _)) = accounts_in(&text).find(|(_, n, _)| *n == name.as_str()) else {
        return Err(EditError::Missing {
            path: path.to_owned(),
            name: name.clone(),
        });
    };
    let mut change = Some(change);
    let mut new = String::with_capacity(text.len());
    for (index, line) in text.lines().enumerate() {
        let line = match index == at {
            true => change.take().and_then(|change| change(line)),
            false => Some(line.to_owned()),
        };
        if let Some(line) = line {
            new.push_str(&line);
            new.push('\n');
        }
    }
    replace(path, &new)
}

/// Writes `text` over `path` atomically, keeping its mode and owner.
fn replace(path: &Path, text: &str) -> Result<(), EditError> {
    let write_error = |source| EditError::Write {
        path: path.to_owned(),
        source,
    };
    // A symlink is followed: the file it names is the one replaced.
    let target = std::fs::canonicalize(path).map_err(write_error)?;
    let dir = target.parent().unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let written = (|| {
        let metadata = std::fs::metadata(&target)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.set_permissions(metadata.permissions())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // As root, the new file keeps the old one's owner; as its
            // owner, this changes nothing.
            let _ = std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid()));
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &target)?;
        // The rename itself reaches the disk with the directory.
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(write_error)
}

/// Makes `path`, which does not exist, holding `text`, readable and
/// writable by its owner only.
fn create(path: &Path, text: &str) -> Result<(), EditError> {
    let write_error = |source| EditError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(write_error)?;
    file.write_all(text.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

/// A password, read as `hash-password` reads one.
fn read_password() -> Result<Password, EditError> {
    crate::hash_password::read_password().map_err(EditError::Password)
}

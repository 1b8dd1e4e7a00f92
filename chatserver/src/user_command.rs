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
//! A running server reloads the file on SIGHUP: with `--pid-file` (the
//! server's), the command sends it. `--config FILE` reads the server's
//! configuration file for `credentials`, `pid-file` and, to remind the
//! operator that every node's file must change alike, `nats`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[cfg(unix)]
use std::os::unix::ffi::OsStrExt;

use chatproto::{Password, Username};
use clap::{Parser, Subcommand};

use crate::credentials;

/// Edits the accounts of the credentials file.
#[derive(Debug, Parser)]
#[command(name = "chatserver user")]
struct UserArgs {
    /// The credentials file [default: the --config file's `credentials`,
    /// else credentials.txt].
    #[arg(long, value_name = "FILE", global = true)]
    credentials: Option<PathBuf>,
    /// The running server's --pid-file: it is sent SIGHUP, so that it
    /// reloads the credentials file at once [default: the --config
    /// file's `pid-file`].
    #[arg(long, value_name = "FILE", global = true)]
    pid_file: Option<PathBuf>,
    /// The server's configuration file, for the three above.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
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
    let server = match args.config.as_deref().map(ServerFiles::read).transpose() {
        Ok(server) => server.unwrap_or_default(),
        Err(e) => {
            eprintln!("chatserver user: {e}");
            return ExitCode::from(2);
        }
    };
    let credentials = args
        .credentials
        .clone()
        .or(server.credentials)
        .unwrap_or_else(|| PathBuf::from("credentials.txt"));
    let pid_file = args.pid_file.clone().or(server.pid_file);
    let path = &credentials;
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
        Ok(()) if matches!(args.action, Action::List) => ExitCode::SUCCESS,
        Ok(()) => {
            if server.cluster {
                eprintln!(
                    "chatserver user: cluster mode: make the same change to every node's credentials file and reload each node; a node whose accounts differ from the others' is not ready (/readyz) until they agree"
                );
            }
            match pid_file.as_deref().map(signal_reload) {
                Some(Ok(pid)) => {
                    eprintln!(
                        "chatserver user: the server (pid {pid}) reloads its credentials now"
                    );
                    ExitCode::SUCCESS
                }
                Some(Err(e)) => {
                    eprintln!(
                        "chatserver user: the file is changed, but the server was not told: {e}"
                    );
                    // Not 1: the change is made, and doing it again would fail.
                    ExitCode::from(3)
                }
                None => {
                    eprintln!(
                        "chatserver user: a running server applies it when it reloads: `kill -HUP <its pid>`, `systemctl reload chatserver`, or --pid-file here"
                    );
                    ExitCode::SUCCESS
                }
            }
        }
        Err(e) => {
            eprintln!("chatserver user: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the command takes from the server's configuration file.
#[derive(Debug, Default)]
struct ServerFiles {
    credentials: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    /// It names NATS servers: cluster mode.
    cluster: bool,
}

impl ServerFiles {
    /// Reads `path` as the server would (`chatserver --config`), with
    /// its checks and its errors.
    fn read(path: &Path) -> Result<ServerFiles, String> {
        use clap::CommandFactory;
        let command = crate::cli::Args::command();
        let file =
            crate::config_file::ConfigFile::read(path, &command).map_err(|e| e.to_string())?;
        let argv = ["chatserver".into()];
        let matches = command
            .try_get_matches_from(file.merge(&argv))
            .map_err(|e| {
                // As the server says it: the key's line, and clap's reason.
                file.explain(&e, &argv)
                    .unwrap_or_else(|| format!("{}: {}", path.display(), e.kind()))
            })?;
        // The server resolves a relative path against its own working
        // directory, which this command cannot know: it would edit, or
        // make, another file than the server reads.
        let absolute = |key: &str, value: Option<&PathBuf>| {
            match value {
            Some(value) if value.is_relative() => Err(format!(
                "{}: {key} = {:?} is relative to the server's working directory: give an absolute path there, or --{key} here",
                path.display(),
                value.display().to_string()
            )),
            value => Ok(value.cloned()),
        }
        };
        Ok(ServerFiles {
            credentials: absolute("credentials", matches.get_one::<PathBuf>("credentials"))?,
            pid_file: absolute("pid-file", matches.get_one::<PathBuf>("pid_file"))?,
            cluster: matches.contains_id("nats"),
        })
    }
}

/// Sends SIGHUP to the process `pid_file` names, once it looks like a
/// chatserver (a stale file may name another process now); its pid.
#[cfg(unix)]
fn signal_reload(pid_file: &Path) -> Result<i32, String> {
    let shown = pid_file.display();
    let text = std::fs::read_to_string(pid_file).map_err(|e| format!("{shown}: {e}"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| format!("{shown}: not a process id: {:?}", text.trim()))?;
    #[cfg(target_os = "linux")]
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|_| format!("{shown}: no process {pid} (is the server running?)"))?;
        let program = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let program = Path::new(std::ffi::OsStr::from_bytes(program));
        if program.file_name() != Some(std::ffi::OsStr::new("chatserver")) {
            return Err(format!(
                "{shown}: process {pid} is {}, not chatserver (a stale pid file?)",
                program.display()
            ));
        }
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(pid, libc::SIGHUP) };
    if sent != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(pid)
}

#[cfg(not(unix))]
fn signal_reload(_pid_file: &Path) -> Result<i32, String> {
    Err("this system has no SIGHUP: restart the server".to_owned())
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

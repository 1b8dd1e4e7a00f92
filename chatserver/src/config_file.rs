//! `--config FILE`: a TOML file whose keys are chatserver's long flag
//! names, and `--print-config`, the effective configuration.
//!
//! The file is turned into the flags it stands for, placed before the
//! command line's, so clap checks both the same way; a key the command
//! line also gives is left out (the command line wins). What clap refuses
//! in the file is reported with the file's name and the key's line.
//!
//! ```toml
//! listen = "0.0.0.0:4000"
//! lockout-attempts = 5
//! admin = ["root", "ops"]   # a repeatable flag takes an array
//! no-rate-limit = true      # a flag without a value takes a bool
//! ```

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};
use toml_edit::{Document, Value};

/// The flag that names the file, and the one that prints the result.
pub const CONFIG_FLAG: &str = "config";
/// Prints the effective configuration (as TOML) and exits.
pub const PRINT_CONFIG_FLAG: &str = "print-config";

/// Flags whose values may hold a password: printed without it.
const SECRET_FLAGS: [&str; 2] = ["db", "nats"];

/// Why the configuration file cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// It cannot be read.
    #[error("cannot read the configuration file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// It is not TOML.
    #[error("{path}: {reason}")]
    NotToml {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A key that is not a flag, a value of the wrong type, or a value
    /// the flag refuses.
    #[error("{path}:{line}: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key's line, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The flags a configuration file stands for.
#[derive(Debug, Default)]
pub struct ConfigFile {
    path: PathBuf,
    /// Each key given: its flag name, its line, and the arguments it
    /// becomes.
    keys: Vec<(String, usize, Vec<OsString>)>,
}

impl ConfigFile {
    /// The file named by `--config` in `argv` (program name first), if
    /// any, read and checked against `command`'s flags.
    pub fn from_args(
        argv: &[OsString],
        command: &Command,
    ) -> Result<Option<ConfigFile>, ConfigError> {
        match flag_value(argv, CONFIG_FLAG) {
            Some(path) => ConfigFile::read(Path::new(&path), command).map(Some),
            None => Ok(None),
        }
    }

    /// Reads and checks `path`.
    pub fn read(path: &Path, command: &Command) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        ConfigFile::parse(path, &text, command)
    }

    /// Checks `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str, command: &Command) -> Result<ConfigFile, ConfigError> {
        let document = Document::parse(text).map_err(|e| ConfigError::NotToml {
            path: path.to_owned(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })?;
        let table = document.as_table();
        let mut keys = Vec::new();
        for (key, item) in table.iter() {
            let line = table
                .key(key)
                .and_then(toml_edit::Key::span)
                .map_or(1, |span| line_of(text, span.start));
            let bad = |reason: String| ConfigError::BadKey {
                path: path.to_owned(),
                line,
                reason,
            };
            let arg = command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(key))
                .filter(|_| ![CONFIG_FLAG, PRINT_CONFIG_FLAG].contains(&key))
                .ok_or_else(|| {
                    bad(format!(
                        "unknown key '{key}': not a chatserver flag (see chatserver --help)"
                    ))
                })?;
            let flag = format!("--{key}");
            let takes_value = !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
            let repeatable = matches!(arg.get_action(), ArgAction::Append);
            let mut args = Vec::new();
            match item.as_value() {
                Some(Value::Boolean(b)) if !takes_value => {
                    if *b.value() {
                        args.push(OsString::from(&flag));
                    }
                }
                Some(Value::Array(values)) if repeatable => {
                    for value in values.iter() {
                        let value = scalar(value).ok_or_else(|| {
                            bad(format!("'{key}' takes an array of strings or numbers"))
                        })?;
                        args.push(OsString::from(&flag));
                        args.push(OsString::from(value));
                    }
                }
                Some(value) if takes_value => {
                    let value = scalar(value).ok_or_else(|| {
                        bad(format!(
                            "'{key}' takes a string or a number{}",
                            if repeatable {
                                ", or an array of them"
                            } else {
                                ""
                            }
                        ))
                    })?;
                    args.push(OsString::from(&flag));
                    args.push(OsString::from(value));
                }
                _ if !takes_value => return Err(bad(format!("'{key}' takes true or false"))),
                _ => return Err(bad(format!("'{key}' takes a value, not a table"))),
            }
            keys.push((key.to_owned(), line, args));
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            keys,
        })
    }

    /// `argv` with the file's flags before the command line's, except
    /// those the command line gives itself.
    pub fn merge(&self, argv: &[OsString]) -> Vec<OsString> {
        let mut merged: Vec<OsString> = argv.iter().take(1).cloned().collect();
        for (key, _, args) in &self.keys {
            if flag_given(argv, key) {
                continue;
            }
            merged.extend(args.iter().cloned());
        }
        merged.extend(argv.iter().skip(1).cloned());
        merged
    }

    /// Where a clap error that names flag `flag` (as `--name <VALUE>` or
    /// `--name`) came from, if from this file and not the command line.
    pub fn locate(&self, flag: &str, argv: &[OsString]) -> Option<String> {
        let name = flag.trim_start_matches('-').split([' ', '=']).next()?;
        let (_, line, _) = self.keys.iter().find(|(key, _, _)| key == name)?;
        (!flag_given(argv, name)).then(|| format!("{}:{line}", self.path.display()))
    }

    /// A clap `error` about a value from this file, as `FILE:LINE: reason`
    /// (clap's first line); `None` if it is not about one of the file's
    /// keys (`argv`: the command line the file was merged into).
    pub fn explain(&self, error: &clap::Error, argv: &[OsString]) -> Option<String> {
        let arg = error.get(clap::error::ContextKind::InvalidArg)?;
        let place = self.locate(&arg.to_string(), argv)?;
        let message = error.to_string();
        let first = message.lines().next().unwrap_or_default();
        Some(format!(
            "{place}: {}",
            first.strip_prefix("error: ").unwrap_or(first)
        ))
    }
}

/// The effective configuration, as a TOML file that `--config` reads back:
/// every flag given (in the file or on the command line) as a key, and
/// every other flag that has a default as a comment with it; secrets left
/// out.
pub fn render(command: &Command, matches: &clap::ArgMatches) -> String {
    let mut out = String::from("# chatserver --print-config\n");
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if [CONFIG_FLAG, PRINT_CONFIG_FLAG, "help", "version"].contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let default = matches.value_source(id) == Some(clap::parser::ValueSource::DefaultValue);
        let value: Value = match arg.get_action() {
            ArgAction::SetTrue if matches.get_flag(id) => true.into(),
            ArgAction::SetTrue => continue,
            action => {
                let Some(raw) = matches.get_raw(id) else {
                    continue;
                };
                let values: Vec<String> = raw.map(|value| shown(long, value)).collect();
                match (action, values.as_slice()) {
                    (ArgAction::Append, _) => values
                        .iter()
                        .map(String::as_str)
                        .collect::<toml_edit::Array>()
                        .into(),
                    (_, [one]) => one.as_str().into(),
                    _ => continue,
                }
            }
        };
        // A default is a comment: written as a key it would be "given",
        // and clash with a flag given that excludes it.
        let line = format!("{long} = {value}");
        match default {
            true => out.push_str(&format!("# {line}  (default)\n")),
            false => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

/// A flag's value as printed: a connection string without its password.
fn shown(flag: &str, value: &OsStr) -> String {
    let value = value.to_string_lossy();
    if !SECRET_FLAGS.contains(&flag) {
        return value.into_owned();
    }
    match flag {
        "db" => crate::database::Location::parse(&value).to_string(),
        _ => value
            .parse::<crate::bus::BusUrl>()
            .map_or_else(|_| "***".to_owned(), |url| url.to_string()),
    }
}

/// A TOML string or number as a flag's value.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        _ => None,
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The value of `--name VALUE` or `--name=VALUE` in `argv`.
fn flag_value(argv: &[OsString], name: &str) -> Option<OsString> {
    let flag = format!("--{name}");
    let prefix = format!("--{name}=");
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            return args.next().cloned();
        }
        if let Some(value) = text.strip_prefix(&prefix) {
            return Some(OsString::from(value));
        }
        if text == "--" {
            break;
        }
    }
    None
}

/// Whether `argv` gives `--name` (with or without `=VALUE`).
fn flag_given(argv: &[OsString], name: &str) -> bool {
    let flag = format!("--{name}");
    let prefix = format!("--{name}=");
    argv.iter().skip(1).any(|arg| {
        let text = arg.to_string_lossy();
        text == flag || text.starts_with(&prefix)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(Path::new("chat.toml"), text, &crate::cli::Args::command())
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn keys_become_flags_before_the_command_lines_which_win() {
        let file = parse(
            "# a comment\nlisten = \"127.0.0.1:4000\"\nlockout-attempts = 5\n\
             admin = [\"root\", \"ops\"]\nno-rate-limit = true\nno-db = false\n",
        )
        .unwrap();
        let argv = os(&["chatserver", "--lockout-attempts", "7"]);
        let merged = file.merge(&argv);
        assert_eq!(
            merged,
            os(&[
                "chatserver",
                "--listen",
                "127.0.0.1:4000",
                "--admin",
                "root",
                "--admin",
                "ops",
                "--no-rate-limit",
                "--lockout-attempts",
                "7",
            ])
        );
        assert_eq!(
            file.locate("--listen <ADDR>", &argv).as_deref(),
            Some("chat.toml:2")
        );
        // Given on the command line: not the file's fault.
        let argv = os(&["chatserver", "--lockout-attempts=0"]);
        assert_eq!(file.locate("--lockout-attempts <N>", &argv), None);
    }

    #[test]
    fn a_bad_key_is_named_with_its_line() {
        let bad = |text: &str| match parse(text) {
            Err(ConfigError::BadKey { line, reason, .. }) => (line, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            bad("listen = \"x\"\n\nlissen = \"y\""),
            (
                3,
                "unknown key 'lissen': not a chatserver flag (see chatserver --help)".to_owned()
            )
        );
        assert_eq!(bad("no-db = \"yes\"").1, "'no-db' takes true or false");
        assert_eq!(
            bad("listen = true").1,
            "'listen' takes a string or a number"
        );
        assert_eq!(
            bad("listen = [\"a\", \"b\"]").1,
            "'listen' takes a string or a number"
        );
        assert_eq!(
            bad("[listen]\nx = 1").1,
            "'listen' takes a value, not a table"
        );
        assert_eq!(bad("config = \"other.toml\"").0, 1);
        assert!(matches!(
            parse("listen = "),
            Err(ConfigError::NotToml { .. })
        ));
    }

    #[test]
    fn the_config_flag_is_found_in_either_form() {
        assert_eq!(
            flag_value(&os(&["c", "--config", "a.toml"]), CONFIG_FLAG),
            Some(OsString::from("a.toml"))
        );
        assert_eq!(
            flag_value(&os(&["c", "--config=b.toml"]), CONFIG_FLAG),
            Some(OsString::from("b.toml"))
        );
        assert_eq!(flag_value(&os(&["c", "--configure"]), CONFIG_FLAG), None);
    }
}

//! Interactive use: prompts for the login, then a line editor with history
//! and completion, with incoming messages printed above the prompt.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use chatproto::{Command, CommandName, ErrorCode, Password, Username};
use rustyline::completion::Completer;
use rustyline::config::Configurer;
use rustyline::error::ReadlineError;
use rustyline::highlight::{CmdKind, Highlighter};
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{ColorMode, Context, Editor, ExternalPrinter, Helper};

use crate::display::{error_text, Style};
use crate::session::{Format, Session, Sink, WaitError};
use crate::terminal::SavedTerminal;
use crate::transport::Transport;
use crate::Credentials;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the interactive client; returns the exit status.
pub fn run(session: Session, stream: Transport, credentials: Option<Credentials>) -> u8 {
    let style = Style::detect(true);
    let saved = SavedTerminal::save();
    let mut editor = match Editor::<ChatHelper, DefaultHistory>::new() {
        Ok(editor) => editor,
        Err(e) => {
            eprintln!("chatcli: cannot start the line editor: {e}");
            return 1;
        }
    };
    editor.set_auto_add_history(false);
    editor.set_helper(Some(ChatHelper {
        session: session.clone(),
        masking: false,
    }));
    let printer = match editor.create_external_printer() {
        Ok(printer) => printer,
        Err(e) => {
            eprintln!("chatcli: cannot start the line editor: {e}");
            return 1;
        }
    };
    session.start_receiving(
        stream,
        Format::Interactive(style),
        Box::new(PrinterSink(printer)),
        Box::new(move |mut sink: Box<dyn Sink>, line: String, code: u8| {
            // Hand the last line to the editor like the others, so it comes
            // after every line before it, and give the editor a moment to
            // draw them; then put the terminal back (the editor, on the
            // other thread, cannot) and leave.
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let last = line.clone();
            std::thread::spawn(move || {
                sink.line(last);
                let _ = done_tx.send(());
            });
            let printed = done_rx.recv_timeout(Duration::from_millis(300)).is_ok();
            if printed {
                // The printer only queued it for the editor's thread, which
                // draws it when it next runs: on a loaded machine 50 ms was
                // seen not to be enough (the line was lost at exit).
                std::thread::sleep(Duration::from_millis(250));
            }
            saved.restore();
            let mut out = std::io::stdout().lock();
            // Bracketed paste off, cursor shown: the editor's own cleanup
            // does not run on this path.
            let _ = write!(out, "\x1b[?2004l\x1b[?25h");
            if printed {
                // The editor redrew its prompt under the last line.
                let _ = write!(out, "\r\x1b[2K");
            } else {
                let _ = write!(out, "\r\x1b[2K{line}\r\n");
            }
            let _ = out.flush();
            std::process::exit(i32::from(code));
        }),
    );

    if !log_in(&mut editor, &session, credentials, style) {
        return 0;
    }
    loop {
        match editor.readline("> ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                handle_line(&session, line, style);
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => {
                // Leave cleanly: log out and let the server say bye.
                if session.send(Command::Logout).is_ok() {
                    session.wait_ended(Duration::from_secs(3));
                }
                println!("Logged out.");
                return 0;
            }
            Err(e) => {
                eprintln!("chatcli: cannot read the terminal: {e}");
                return 1;
            }
        }
    }
}

/// Asks for a user name and password until a login succeeds; false when
/// the user gave up (Ctrl-C or Ctrl-D).
fn log_in(
    editor: &mut Editor<ChatHelper, DefaultHistory>,
    session: &Session,
    mut given: Option<Credentials>,
    style: Style,
) -> bool {
    loop {
        let (user, password) = match given.take() {
            Some(c) => (c.user, c.password),
            None => match prompt_credentials(editor, style) {
                Some(c) => c,
                None => return false,
            },
        };
        let Ok(id) = session.send(Command::Login {
            user: user.clone(),
            password,
        }) else {
            // The session has ended: the receiving thread says why and
            // exits with the matching status.
            loop {
                std::thread::park();
            }
        };
        match session.wait_login(id, ANSWER_TIMEOUT) {
            Ok(Ok(())) => {
                println!("Logged in as {user}. Type 'help' for the commands.");
                return true;
            }
            Ok(Err(frame)) => {
                let why = match frame.code {
                    ErrorCode::SessionElsewhere => format!("{user} is already logged in elsewhere"),
                    _ => error_text(&frame),
                };
                println!("{}", style.error(&format!("Login failed: {why}.")));
            }
            // The receiving thread reports the end and exits the process.
            Err(WaitError::Ended) => loop {
                std::thread::park();
            },
            Err(WaitError::TimedOut) => {
                println!(
                    "{}",
                    style.error("Login failed: no answer from the server.")
                );
            }
        }
    }
}

/// `Username:` and `Password:` (not echoed); `None` on Ctrl-C or Ctrl-D.
fn prompt_credentials(
    editor: &mut Editor<ChatHelper, DefaultHistory>,
    style: Style,
) -> Option<(Username, Password)> {
    loop {
        let user = editor.readline("Username: ").ok()?;
        let user = match Username::new(user.trim()) {
            Ok(user) => user,
            Err(e) => {
                println!("{}", style.error(&format!("{e}")));
                continue;
            }
        };
        set_masking(editor, true);
        let cursor = editor.set_cursor_visibility(false).ok().flatten();
        let password = editor.readline("Password: ");
        drop(cursor);
        set_masking(editor, false);
        match Password::new(&password.ok()?) {
            Ok(password) => return Some((user, password)),
            Err(e) => println!("{}", style.error(&format!("{e}"))),
        }
    }
}

fn set_masking(editor: &mut Editor<ChatHelper, DefaultHistory>, on: bool) {
    if let Some(helper) = editor.helper_mut() {
        helper.masking = on;
    }
    // Highlighting (hence masking) must apply even where colour is off.
    editor.set_color_mode(if on {
        ColorMode::Forced
    } else {
        ColorMode::Enabled
    });
}

/// One line typed after login.
fn handle_line(session: &Session, line: &str, style: Style) {
    let command = match Command::parse(line) {
        Ok(command) => command,
        Err(e) => {
            println!("{}", style.error(&format!("error: {e}")));
            return;
        }
    };
    if command
        == (Command::Debug {
            target: chatproto::DebugTarget::Client,
        })
    {
        println!("{}", session.state().debug_line());
        return;
    }
    if let Err(e) = session.send(command) {
        println!("{}", style.error(&format!("error: {e}")));
    }
}

/// Prints above the prompt, keeping the line being typed intact.
struct PrinterSink<P>(P);

impl<P: ExternalPrinter + Send> Sink for PrinterSink<P> {
    fn line(&mut self, line: String) {
        let _ = self.0.print(line);
    }
}

/// Completion of commands and user names; masking of the password.
struct ChatHelper {
    session: Session,
    masking: bool,
}

impl Completer for ChatHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        if self.masking {
            return Ok((pos, Vec::new()));
        }
        let before = &line[..pos];
        let start = before.rfind([' ', '\t']).map_or(0, |i| i + 1);
        let word = &before[start..];
        let words_before = before[..start].split_whitespace().count();
        let candidates: Vec<String> = if words_before == 0 {
            CommandName::ALL
                .iter()
                .map(|c| c.as_str())
                .filter(|c| c.starts_with(word))
                .map(|c| format!("{c} "))
                .collect()
        } else if words_before == 1 && takes_user(before) {
            let state = self.session.state();
            state
                .names
                .iter()
                .filter(|n| n.starts_with(word))
                .map(|n| format!("{n} "))
                .collect()
        } else if words_before == 1 && before.trim_start().starts_with("debug") {
            ["server", "client"]
                .iter()
                .filter(|t| t.starts_with(word))
                .map(|t| t.to_string())
                .collect()
        } else {
            Vec::new()
        };
        Ok((start, candidates))
    }
}

fn takes_user(line: &str) -> bool {
    let first = line.split_whitespace().next().unwrap_or("");
    matches!(
        CommandName::from_word(first),
        Some(CommandName::Message | CommandName::Block | CommandName::Unblock)
    )
}

impl Highlighter for ChatHelper {
    fn highlight<'l>(&self, line: &'l str, _pos: usize) -> Cow<'l, str> {
        if self.masking {
            Cow::Borrowed("")
        } else {
            Cow::Borrowed(line)
        }
    }

    fn highlight_char(&self, _line: &str, _pos: usize, kind: CmdKind) -> bool {
        self.masking && kind != CmdKind::MoveCursor
    }
}

impl Hinter for ChatHelper {
    type Hint = String;
}

impl Validator for ChatHelper {}

impl Helper for ChatHelper {}

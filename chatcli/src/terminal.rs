//! The terminal's settings, saved at start so that the receiving thread can
//! put them back before exiting while the line editor has the terminal in
//! raw mode (the server ended the session; the user is mid-line).

#[derive(Clone)]
pub struct SavedTerminal {
    #[cfg(unix)]
    termios: Option<rustix::termios::Termios>,
}

impl SavedTerminal {
    pub fn save() -> SavedTerminal {
        SavedTerminal {
            #[cfg(unix)]
            termios: rustix::termios::tcgetattr(std::io::stdin()).ok(),
        }
    }

    pub fn restore(&self) {
        #[cfg(unix)]
        if let Some(termios) = &self.termios {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                termios,
            );
        }
    }
}

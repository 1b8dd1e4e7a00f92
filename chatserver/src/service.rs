//! Telling a service manager how the server is doing, over systemd's
//! notification protocol (`Type=notify`; the `sd-notify` crate): ready
//! once every listener is open and the state is loaded, stopping when a
//! shutdown begins. Without `NOTIFY_SOCKET` in the environment (not
//! started by such a manager), nothing is sent.

use tracing::warn;

/// Every listener is open and the state loaded: clients may come.
/// `status` is a line for `systemctl status`.
pub fn ready(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// A shutdown has begun.
pub fn stopping() {
    #[cfg(unix)]
    send(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(unix)]
fn send(states: &[sd_notify::NotifyState<'_>]) {
    // A manager that asked for notifications and cannot get them would
    // think the server failed to start: worth a warning, not an exit.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

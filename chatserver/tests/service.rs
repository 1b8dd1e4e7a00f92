//! Readiness for a service manager (systemd's `Type=notify`): with
//! `NOTIFY_SOCKET` set, the server says `READY=1` once it listens, and
//! `STOPPING=1` when a shutdown begins.

#![cfg(unix)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{TestServer, CREDENTIALS};

#[test]
fn readiness_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server = TestServer::start_with_env(
        CREDENTIALS,
        &["--listen", "127.0.0.1:0"],
        &[],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0; 1024];
    let n = socket.recv(&mut buf).unwrap();
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(said.lines().any(|l| l == "READY=1"), "{said:?}");
    assert!(
        said.contains(&format!("STATUS=serving on {}", server.addr)),
        "{said:?}"
    );
    // Ready means clients are served.
    let mut alice = server.login("alice");
    alice.send("whoami");
    assert_eq!(alice.recv()["cmd"], "whoami");

    server.signal("TERM");
    let n = socket.recv(&mut buf).unwrap();
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(said.lines().any(|l| l == "STOPPING=1"), "{said:?}");
}

/// `contrib/chatserver.service` is a unit systemd accepts (checked with
/// `systemd-analyze verify` where it is installed, with this build's
/// binary in `ExecStart`).
#[test]
fn the_service_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/chatserver.service"
    ))
    .unwrap();
    assert!(unit.contains("\nType=notify\n"), "readiness is notified");
    for hardening in [
        "DynamicUser=yes",
        "StateDirectory=chatserver",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not checked");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chatserver.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/chatserver",
            env!("CARGO_BIN_EXE_chatserver"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
        })
        .ok_or(())
}

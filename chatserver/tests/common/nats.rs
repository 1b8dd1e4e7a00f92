//! NATS for the bus tests: the server `CHATSERVER_TEST_NATS` names
//! (`.ci/test` starts a private one when it is not set), with a subject
//! prefix of the test's own; or, for tests that stop and restart it, a
//! private `nats-server` of the test's own on a free loopback port.
// Each test binary that includes this uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The shared test server's URL.
pub fn shared_url() -> String {
    std::env::var("CHATSERVER_TEST_NATS").unwrap_or_else(|_| {
        panic!(
            "CHATSERVER_TEST_NATS is not set: run the test suite with .ci/test (which starts a \
             private nats-server), or set it to a NATS URL such as nats://127.0.0.1:4222"
        )
    })
}

/// A subject prefix no other test (or test run) uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "chatserver-test.{}.{}.{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A nats-server of this test's own, killed on drop.
#[derive(Debug)]
pub struct PrivateNats {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its client port on 127.0.0.1.
    pub port: u16,
}

impl PrivateNats {
    /// Starts one on a free port.
    pub fn start() -> PrivateNats {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn(&dir, None);
        let port = read_port(&dir, child.id());
        PrivateNats {
            child: Some(child),
            dir,
            port,
        }
    }

    /// Starts one on `port` (free a moment ago).
    pub fn start_on(port: u16) -> PrivateNats {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn(&dir, Some(port));
        assert_eq!(read_port(&dir, child.id()), port);
        PrivateNats {
            child: Some(child),
            dir,
            port,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, after [`PrivateNats::kill`].
    pub fn restart(&mut self) {
        self.kill();
        let child = spawn(&self.dir, Some(self.port));
        assert_eq!(read_port(&self.dir, child.id()), self.port);
        self.child = Some(child);
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nats-server binary: `CHATSERVER_TEST_NATS_SERVER`, or `nats-server`
/// on the PATH or in /usr/sbin (Debian's package).
fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("CHATSERVER_TEST_NATS_SERVER") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found: install it (Debian: nats-server) or set \
             CHATSERVER_TEST_NATS_SERVER to its path"
        )
    })
}

fn spawn(dir: &tempfile::TempDir, port: Option<u16>) -> Child {
    // A previous run's ports file would be read as this one's.
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    let port = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
    Command::new(binary())
        .args(["-a", "127.0.0.1", "-p", &port, "--ports_file_dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start nats-server")
}

/// The client port from the ports file nats-server writes once it listens.
fn read_port(dir: &tempfile::TempDir, pid: u32) -> u16 {
    let path = dir.path().join(format!("nats-server_{pid}.ports"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text) {
                let url = ports["nats"][0].as_str().unwrap_or_default();
                if let Some(port) = url.rsplit(':').next().and_then(|p| p.parse().ok()) {
                    return port;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "nats-server wrote no ports file in {}",
            dir.path().display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

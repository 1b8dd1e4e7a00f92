//! `chatserver user add|passwd|remove|list`: the credentials file edited
//! in place, comments kept, passwords hashed, atomically (mode kept,
//! symlinks followed), mistakes refused clearly; a server started on the
//! result takes the new accounts.

mod common;

use std::process::Command;

use common::TestServer;

/// `chatserver user ARGS` with `password` on standard input; (status,
/// stdout, stderr).
fn user(file: &std::path::Path, args: &[&str], password: &str) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatserver"));
    cmd.arg("user").args(args).arg("--credentials").arg(file);
    let (code, out, err) = common::run_with_input(cmd, password);
    (code, out, err)
}

const FILE: &str = "# the team\nalice pw-alice\n\n# ops\nbob pw-bob\n";

#[test]
fn accounts_are_added_changed_and_removed_keeping_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials.txt");
    std::fs::write(&file, FILE).unwrap();
    #[cfg(unix)]
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();

    let (code, out, err) = user(&file, &["add", "carol"], "pw-carol\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added carol"), "{out}");
    assert!(
        err.contains("a running server applies it when it reloads"),
        "{err}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with(FILE), "the rest is kept: {text}");
    assert!(text.contains("\ncarol $argon2id$"), "hashed: {text}");
    assert!(!text.contains("pw-carol"), "{text}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "the mode is kept");
    }

    let (code, _, err) = user(&file, &["passwd", "alice"], "new-secret\n");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = user(&file, &["remove", "bob"], "");
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# the team\nalice $argon2id$"), "{text}");
    assert!(
        text.contains("\n\n# ops\ncarol $argon2id$"),
        "comments kept, bob gone: {text}"
    );
    let (code, out, _) = user(&file, &["list"], "");
    assert_eq!(code, 0);
    assert_eq!(out, "alice\ncarol\n");

    // A server on the file takes the new password and the new account.
    let credentials = std::fs::read_to_string(&file).unwrap();
    let server = TestServer::start_with(&credentials, &["--listen", "127.0.0.1:0"], &[]);
    for (name, password) in [("alice", "new-secret"), ("carol", "pw-carol")] {
        let mut c = server.connect();
        c.send(&format!("login {name} {password}"));
        assert_eq!(c.recv_type("ok")["user"], name);
    }
    let mut c = server.connect();
    c.send("login bob pw-bob");
    assert_eq!(c.recv()["code"], "invalid_credentials");
}

#[test]
fn mistakes_are_refused_and_leave_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials.txt");
    std::fs::write(&file, FILE).unwrap();
    for (args, password, said) in [
        (
            &["add", "alice"][..],
            "x-secret\n",
            "there is already an account 'alice'",
        ),
        (&["passwd", "zed"], "x-secret\n", "no account 'zed'"),
        (&["remove", "zed"], "", "no account 'zed'"),
        (
            &["add", "bad name!"],
            "x-secret\n",
            "invalid value 'bad name!'",
        ),
        (&["add", "dave"], "", "no password on standard input"),
    ] {
        let (code, _, err) = user(&file, args, password);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(said), "{args:?}: {err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), FILE, "{args:?}");
    }
    // A file with a mistake is not edited: the mistake is named.
    let broken = dir.path().join("broken.txt");
    std::fs::write(&broken, "alice pw-alice\nbob\n").unwrap();
    let (code, _, err) = user(&broken, &["add", "carol"], "pw-carol\n");
    assert_ne!(code, 0);
    assert!(err.contains("broken.txt:2:"), "{err}");
}

#[test]
fn a_new_file_is_made_private_and_a_symlink_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("new.txt");
    let (code, _, err) = user(&file, &["add", "alice"], "pw-alice\n");
    assert_eq!(code, 0, "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let (code, _, err) = user(&link, &["add", "bob"], "pw-bob\n");
        assert_eq!(code, 0, "{err}");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::read_to_string(&file)
            .unwrap()
            .contains("\nbob $argon2id$"));
    }
}

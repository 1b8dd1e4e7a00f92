//! Replays the committed seeds of the `http_websocket` fuzz target
//! (`fuzz/seeds/http_websocket/*`) through the target's own check, so its
//! invariants are tested on the stable toolchain, in CI, without a fuzzer.
//! (The core's targets are replayed by `chatproto/tests/fuzz_seeds.rs`.)

#[path = "../../fuzz/src/http_websocket.rs"]
mod check;

use std::path::PathBuf;

#[test]
fn http_websocket_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/http_websocket");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check::check_http_websocket(&data));
        assert!(result.is_ok(), "seed {} fails its check", path.display());
        count += 1;
    }
    assert!(count > 0, "no seeds for http_websocket");
}

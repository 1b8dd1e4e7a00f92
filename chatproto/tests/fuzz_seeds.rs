//! Replays every committed fuzz seed (`fuzz/seeds/<target>/*`) through the
//! fuzz targets' own check functions, so the invariants they assert are
//! tested on the stable toolchain, in CI, without a fuzzer.

#[allow(dead_code, clippy::all)]
#[path = "../../fuzz/src/lib.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "seed {} fails its check", path.display());
        count += 1;
    }
    assert!(count > 0, "no seeds for {target}");
}

#[test]
fn frame_decoder_seeds() {
    replay("frame_decoder", checks::check_frame_decoder);
}

#[test]
fn inline_parser_seeds() {
    replay("inline_parser", checks::check_inline_parser);
}

#[test]
fn json_request_seeds() {
    replay("json_request", checks::check_json_request);
}

#[test]
fn server_session_seeds() {
    replay("server_session", checks::check_server_session);
}

#[test]
fn cluster_schedule_seeds() {
    replay("cluster_schedule", checks::check_cluster_schedule);
}

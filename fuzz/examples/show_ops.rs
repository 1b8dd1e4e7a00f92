//! Prints the operations a `server_session` input decodes to, one per
//! line: `cargo +nightly run --example show_ops -- FILE` (for reading a
//! crash or a seed).
use arbitrary::{Arbitrary, Unstructured};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: show_ops FILE (a server_session input)");
        return ExitCode::from(2);
    };
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("{}: {e}", path.to_string_lossy());
            return ExitCode::FAILURE;
        }
    };
    match Vec::<chatproto_fuzz::Op>::arbitrary(&mut Unstructured::new(&data)) {
        // The target runs at most the first 200.
        Ok(ops) => ops.iter().take(200).for_each(|op| println!("{op:?}")),
        Err(e) => println!("(no operations: {e})"),
    }
    ExitCode::SUCCESS
}

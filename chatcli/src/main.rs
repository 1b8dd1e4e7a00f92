//! The chatproto command-line client (work in progress: see issue 4).

fn main() {
    eprintln!("chatcli: the client is not built yet (issue 4)");
    std::process::exit(2);
}

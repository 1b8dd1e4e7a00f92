//! The chatproto server binary (work in progress: see issue 3).

fn main() {
    eprintln!("chatserver: the TCP server is not built yet (issue 3)");
    std::process::exit(2);
}

//! Benchmarks and the load generator for chatproto (see issue 5).

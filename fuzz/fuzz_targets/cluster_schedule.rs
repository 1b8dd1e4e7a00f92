#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chatproto_fuzz::check_cluster_schedule(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isdp_fuzz::targets::inbound_bytes::run(data));

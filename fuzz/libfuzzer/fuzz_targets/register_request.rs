#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isdp_fuzz::targets::register_request::run(data));

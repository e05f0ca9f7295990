#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isdp_fuzz::targets::xds_resources::run(data));

//! `limiter_requests`: see `limiter_svc::fuzzing::limiter_requests` for the input format and the properties.
#![no_main]
#![deny(unsafe_code)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| limiter_svc::fuzzing::limiter_requests(data));

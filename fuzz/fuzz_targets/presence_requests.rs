//! `presence_requests`: see `presence_svc::fuzzing::presence_requests` for the input format and the properties.
#![no_main]
#![deny(unsafe_code)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| presence_svc::fuzzing::presence_requests(data));

//! `router_requests`: see `router_svc::fuzzing::router_requests` for the input format and the properties.
#![no_main]
#![deny(unsafe_code)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_svc::fuzzing::router_requests(data));

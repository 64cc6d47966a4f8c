//! `jwt_verify`: see `plumbing::fuzzing::jwt_verify` for the input format and the properties.
#![no_main]
#![deny(unsafe_code)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| plumbing::fuzzing::jwt_verify(data));

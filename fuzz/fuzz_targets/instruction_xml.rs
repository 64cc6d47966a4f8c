//! `instruction_xml`: see `router_svc::fuzzing::instruction_xml` for the input format and the properties.
#![no_main]
#![deny(unsafe_code)]

libfuzzer_sys::fuzz_target!(|data: &[u8]| router_svc::fuzzing::instruction_xml(data));

//! The router's gRPC face: [`api`] authorises, validates ([`requests`]) and converts, and
//! hands the domain to [`crate::engine`]; [`forward`] passes a call for a communication
//! that runs on another replica to that replica, once; [`watch`] streams a timeline.

pub mod api;
pub mod forward;
pub mod requests;
pub mod watch;

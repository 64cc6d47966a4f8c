//! The Switchboard v1 contract: generated clients, servers and messages for
//! `switchboard.presence.v1`, `switchboard.limiter.v1` and `switchboard.router.v1`, plus
//! the file descriptor set that the reflection service serves (it keeps source info, so
//! `grpcurl describe` shows every comment written in the `.proto` files).
#![forbid(unsafe_code)]
#![allow(clippy::all, missing_docs)] // generated code

pub mod codec;

/// `switchboard.presence.v1`: presence of client applications and account keys.
pub mod presence {
    pub mod v1 {
        tonic::include_proto!("switchboard.presence.v1");
    }
}

/// `switchboard.limiter.v1`: concurrency slots and limits.
pub mod limiter {
    pub mod v1 {
        tonic::include_proto!("switchboard.limiter.v1");
    }
}

/// `switchboard.router.v1`: applications and communications.
pub mod router {
    pub mod v1 {
        tonic::include_proto!("switchboard.router.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Switchboard proto and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("switchboard_descriptor");

//! The ports of a communication's shell ([`crate::runner`]): the other services as the
//! machine's work needs them. [`slot`] takes and releases limiter slots; [`presence`]
//! reads the dialled identities; [`legs`] opens the relay streams to the devices. The
//! webhook client ([`crate::webhook`]) and the record store ([`crate::store`]) are the
//! other two ports.

pub mod legs;
pub mod presence;
pub mod slot;

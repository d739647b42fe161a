//! Matrix application service machinery for Myelin, independent of the
//! server crate: the registration files bridges and bots are configured
//! with, the namespaces that decide which users, aliases and rooms an
//! application service claims, and the shape of the transactions the
//! homeserver pushes to it.
//!
//! Everything here is pure: the server crate reads the files, stores the
//! queues and does the HTTP, and asks this crate what each step means.

pub mod namespace;
pub mod registration;
pub mod transaction;

pub use namespace::{Namespace, Namespaces};
pub use registration::{Registration, RegistrationError, Registrations};

//! Matrix server-server protocol machinery for Myelin, independent of the
//! server crate: server keys and their checks, request signing and its
//! verification, server discovery, the outbound IP address policy, room
//! server ACLs, the checks of received PDUs and the shape of outgoing
//! transactions.
//!
//! Everything here is pure or has its I/O injected, so it is tested
//! without a server or a network. The server crate wires it in.

pub mod discovery;
pub mod ip_ranges;
pub mod media;
pub mod pdu;
pub mod request_auth;
pub mod server_acl;
pub mod server_keys;
pub mod transaction;

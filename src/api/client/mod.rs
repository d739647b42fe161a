//! The client-server API handlers, one module per area of the spec.

pub mod account;
pub mod admin;
pub mod appservice;
pub mod devices;
pub mod directory;
pub mod discovery;
pub mod integrations;
pub mod keys;
pub mod legacy;
pub mod media;
pub mod membership;
pub mod profile;
pub mod push_rules;
pub mod pushers;
pub mod relations;
pub mod reporting;
pub mod room_events;
pub mod room_keys;
pub mod search;
pub mod session;
pub mod sliding_sync;
pub mod spaces;
pub mod sync;
pub mod threepids;
pub mod user_data;
pub mod websocket;

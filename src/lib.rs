//! Myelin, a Matrix homeserver.
//!
//! Layers call downward only: [`api`] (HTTP handlers) → [`services`] (the
//! rules) → [`storage`] (bytes). See ARCHITECTURE.md.

pub mod api;
pub mod cli;
pub mod config;
pub mod events;
pub mod front;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod services;
pub mod storage;
pub mod tls;

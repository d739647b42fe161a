//! Sliding sync connections: for each (user, device, `conn_id`), what was
//! sent at each position the client was given, so that the next request
//! sends only what is new to the client.
//!
//! Connections live in memory. A position the server does not know (after
//! a restart, an eviction, or a made-up one) is refused with
//! `M_UNKNOWN_POS`, and the client starts the connection again, as the
//! MSC4186 protocol expects. Positions carry the boot time so that one from
//! before a restart never matches a new connection's.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use super::error::{Error, Result};

/// Connections kept at most; the least recently used go first.
const MAX_CONNECTIONS: usize = 10_000;
/// Positions kept per connection: the newest and the one before, so that a
/// client retrying a request whose answer it lost is still understood.
const POSITIONS_KEPT: usize = 2;

/// Who a connection belongs to: user, device, connection ID.
pub type ConnectionKey = (String, String, String);

/// What a client has been sent, as of one position.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The stream position and typing serial the answer covered.
    pub stream: u64,
    pub typing: u64,
    /// Room ID → what was last sent about the room.
    pub rooms: HashMap<String, RoomSent>,
    /// List name → the room count last sent.
    pub list_counts: BTreeMap<String, u64>,
}

/// A room as last sent on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomSent {
    /// The stream position the room was sent up to.
    pub stream: u64,
    /// The membership the room was sent with.
    pub membership: String,
    /// The room configuration it was sent with; a new one sends it afresh.
    pub config: RoomConfigKey,
}

/// A room configuration, compared to see whether a room must be re-sent.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RoomConfigKey {
    pub required_state: Vec<(String, String)>,
    pub timeline_limit: u64,
}

struct Connection {
    positions: VecDeque<(u64, Snapshot)>,
    last_used: u64,
}

pub struct Connections {
    inner: Mutex<Inner>,
}

struct Inner {
    connections: HashMap<ConnectionKey, Connection>,
    next_position: u64,
    uses: u64,
}

impl Connections {
    /// `boot_ms`: the boot time, from which positions are numbered.
    pub fn new(boot_ms: u64) -> Self {
        Connections {
            inner: Mutex::new(Inner {
                connections: HashMap::new(),
                next_position: boot_ms.saturating_mul(1000),
                uses: 0,
            }),
        }
    }

    /// What the client was sent as of `pos`; an empty snapshot when it
    /// gives none (a new connection, which forgets the old one).
    pub fn snapshot(&self, key: &ConnectionKey, pos: Option<&str>) -> Result<Snapshot> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pos) = pos else {
            inner.connections.remove(key);
            return Ok(Snapshot::default());
        };
        let unknown = || Error::UnknownPos(format!("unknown position {pos:?}"));
        let wanted: u64 = pos.parse().map_err(|_| unknown())?;
        inner.uses += 1;
        let uses = inner.uses;
        let connection = inner.connections.get_mut(key).ok_or_else(unknown)?;
        connection.last_used = uses;
        connection
            .positions
            .iter()
            .find(|(position, _)| *position == wanted)
            .map(|(_, snapshot)| snapshot.clone())
            .ok_or_else(unknown)
    }

    /// Records what an answer sent, after the snapshot at `base` (if any);
    /// returns the answer's position.
    pub fn record(&self, key: &ConnectionKey, base: Option<&str>, snapshot: Snapshot) -> String {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next_position += 1;
        inner.uses += 1;
        let (position, uses) = (inner.next_position, inner.uses);
        if !inner.connections.contains_key(key) && inner.connections.len() >= MAX_CONNECTIONS {
            evict_least_recently_used(&mut inner.connections);
        }
        let connection = inner
            .connections
            .entry(key.clone())
            .or_insert_with(|| Connection {
                positions: VecDeque::new(),
                last_used: uses,
            });
        connection.last_used = uses;
        // Positions after the one the client answered from are abandoned.
        if let Some(base) = base.and_then(|b| b.parse::<u64>().ok()) {
            connection.positions.retain(|(p, _)| *p <= base);
        }
        connection.positions.push_back((position, snapshot));
        while connection.positions.len() > POSITIONS_KEPT {
            connection.positions.pop_front();
        }
        position.to_string()
    }
}

fn evict_least_recently_used(connections: &mut HashMap<ConnectionKey, Connection>) {
    let oldest = connections
        .iter()
        .min_by_key(|(_, connection)| connection.last_used)
        .map(|(key, _)| key.clone());
    if let Some(oldest) = oldest {
        connections.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conn: &str) -> ConnectionKey {
        ("@a:x".to_owned(), "DEV".to_owned(), conn.to_owned())
    }

    #[test]
    fn positions_are_known_per_connection_and_the_previous_one_is_kept() {
        let connections = Connections::new(1);
        let first = connections.record(
            &key("a"),
            None,
            Snapshot {
                stream: 5,
                ..Snapshot::default()
            },
        );
        assert_eq!(
            connections
                .snapshot(&key("a"), Some(&first))
                .unwrap()
                .stream,
            5
        );
        assert!(matches!(
            connections.snapshot(&key("b"), Some(&first)),
            Err(Error::UnknownPos(_))
        ));
        let second = connections.record(
            &key("a"),
            Some(&first),
            Snapshot {
                stream: 9,
                ..Snapshot::default()
            },
        );
        // A retry from the first position is still understood.
        assert_eq!(
            connections
                .snapshot(&key("a"), Some(&first))
                .unwrap()
                .stream,
            5
        );
        assert_eq!(
            connections
                .snapshot(&key("a"), Some(&second))
                .unwrap()
                .stream,
            9
        );
        let third = connections.record(&key("a"), Some(&second), Snapshot::default());
        assert!(connections.snapshot(&key("a"), Some(&first)).is_err());
        assert!(connections.snapshot(&key("a"), Some(&third)).is_ok());
        assert!(connections.snapshot(&key("a"), Some("garbage")).is_err());
        // Starting again without a position forgets the connection.
        connections.snapshot(&key("a"), None).unwrap();
        assert!(connections.snapshot(&key("a"), Some(&third)).is_err());
    }

    #[test]
    fn positions_from_before_a_restart_are_unknown() {
        let before = Connections::new(1_000);
        let old = before.record(&key("a"), None, Snapshot::default());
        let after = Connections::new(2_000);
        after.record(&key("a"), None, Snapshot::default());
        assert!(after.snapshot(&key("a"), Some(&old)).is_err());
    }
}

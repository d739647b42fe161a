//! Live push sessions (the WebSocket extension): at most one per device,
//! and a way to end them all when the server stops.
//!
//! A new session of a device ends the one before it. On shutdown every
//! session is told to close, and the server waits for them before the
//! database closes. Holds no data of its own; never touches storage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

/// (user ID, device ID) → the live session's number and its ender.
type Live = HashMap<(String, String), (u64, Arc<Notify>)>;

#[derive(Default)]
pub struct Connections {
    live: Mutex<Live>,
    next: AtomicU64,
    /// Sessions not yet finished, replaced ones included.
    open: AtomicU64,
    drained: Notify,
    stopping: StopSignal,
}

struct StopSignal(watch::Sender<bool>);

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(watch::channel(false).0)
    }
}

/// A live session's hold on its device; dropping it ends the hold.
pub struct Session {
    connections: Arc<Connections>,
    key: (String, String),
    number: u64,
    /// Notified when a newer session of the device replaces this one.
    pub replaced: Arc<Notify>,
    /// Turns true when the server stops.
    pub stopping: watch::Receiver<bool>,
}

impl Connections {
    /// Opens the device's session, ending the one it had.
    pub fn open(self: &Arc<Self>, user_id: &str, device_id: &str) -> Session {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let replaced = Arc::new(Notify::new());
        let key = (user_id.to_owned(), device_id.to_owned());
        self.open.fetch_add(1, Ordering::SeqCst);
        let before = self
            .live
            .lock()
            .expect("connections lock")
            .insert(key.clone(), (number, replaced.clone()));
        if let Some((_, ender)) = before {
            ender.notify_one();
        }
        Session {
            connections: self.clone(),
            key,
            number,
            replaced,
            stopping: self.stopping.0.subscribe(),
        }
    }

    /// Sessions open now.
    pub fn count(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Tells every session to close and waits until all have.
    pub async fn stop_all(&self) {
        self.stopping.0.send_replace(true);
        loop {
            let drained = self.drained.notified();
            if self.count() == 0 {
                return;
            }
            drained.await;
        }
    }

    /// Whether the server is stopping (a session opened now must close).
    pub fn stopping(&self) -> bool {
        *self.stopping.0.borrow()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut live = self.connections.live.lock().expect("connections lock");
        if live.get(&self.key).is_some_and(|(n, _)| *n == self.number) {
            live.remove(&self.key);
        }
        drop(live);
        if self.connections.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.connections.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_session_of_a_device_replaces_the_first() {
        let connections = Arc::new(Connections::default());
        let first = connections.open("@a:x", "D");
        let other = connections.open("@a:x", "E");
        let second = connections.open("@a:x", "D");
        tokio::time::timeout(std::time::Duration::from_secs(1), first.replaced.notified())
            .await
            .expect("the first session is told to end");
        assert_eq!(connections.count(), 3);
        drop(first);
        // The first one's end does not remove the second's hold.
        assert!(connections
            .live
            .lock()
            .unwrap()
            .contains_key(&("@a:x".into(), "D".into())));
        drop(second);
        drop(other);
        assert_eq!(connections.count(), 0);
        connections.stop_all().await;
        assert!(connections.stopping());
    }
}

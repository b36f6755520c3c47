//! The caption event stream: every stream caption goes to each connected
//! server-sent-events client through a small bounded queue of its own. A
//! client that leaves, or falls so far behind that its queue is full, is
//! dropped; the others never wait for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// One event: its id and its JSON data (shared by every client).
#[derive(Clone, Debug)]
pub struct Event {
    pub id: u64,
    pub data: Arc<str>,
}

/// Events queued per client before it counts as stuck.
const CLIENT_QUEUE: usize = 16;

#[derive(Debug)]
pub struct Broadcaster {
    clients: Mutex<Vec<(u64, SyncSender<Event>)>>,
    next_client: AtomicU64,
    max_clients: usize,
}

/// A client's queue; leaving (drop) removes it from the broadcaster.
#[derive(Debug)]
pub struct Subscription<'a> {
    id: u64,
    hub: &'a Broadcaster,
    pub events: Receiver<Event>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.hub.lock().retain(|(id, _)| *id != self.id);
    }
}

impl Broadcaster {
    pub fn new(max_clients: usize) -> Self {
        Broadcaster {
            clients: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(0),
            max_clients,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, SyncSender<Event>)>> {
        // A list of senders stays valid after a panic elsewhere.
        self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new client's queue, or `None` when `max_clients` are connected.
    pub fn subscribe(&self) -> Option<Subscription<'_>> {
        let mut clients = self.lock();
        if clients.len() >= self.max_clients {
            return None;
        }
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(CLIENT_QUEUE);
        clients.push((id, tx));
        Some(Subscription {
            id,
            hub: self,
            events: rx,
        })
    }

    /// Sends `event` to every client; drops those gone or stuck.
    pub fn publish(&self, event: &Event) {
        self.lock().retain(|(_, client)| match client.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!("dropping an event-stream client that stopped reading");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Clients connected.
    pub fn clients(&self) -> usize {
        self.lock().len()
    }

    /// Disconnects every client (at shutdown): their queues end.
    pub fn close(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64) -> Event {
        Event {
            id,
            data: Arc::from(format!("{{\"n\":{id}}}")),
        }
    }

    #[test]
    fn every_client_gets_every_event_and_a_gone_one_is_dropped() {
        let hub = Broadcaster::new(4);
        let a = hub.subscribe().unwrap();
        let b = hub.subscribe().unwrap();
        hub.publish(&event(1));
        drop(b);
        assert_eq!(hub.clients(), 1, "leaving unsubscribes");
        hub.publish(&event(2));
        assert_eq!(a.events.try_recv().unwrap().id, 1);
        assert_eq!(a.events.try_recv().unwrap().id, 2);
    }

    #[test]
    fn a_stuck_client_is_dropped_and_the_cap_holds() {
        let hub = Broadcaster::new(2);
        let stuck = hub.subscribe().unwrap();
        let other = hub.subscribe().unwrap();
        assert!(hub.subscribe().is_none(), "cap of 2");
        for id in 0..=CLIENT_QUEUE as u64 {
            hub.publish(&event(id));
            // `other` is drained as a live client would be.
            while other.events.try_recv().is_ok() {}
        }
        assert_eq!(hub.clients(), 1);
        assert_eq!(
            stuck.events.iter().count(),
            CLIENT_QUEUE,
            "its queue ended after the events it held"
        );
        hub.close();
        assert!(other.events.recv().is_err());
    }
}

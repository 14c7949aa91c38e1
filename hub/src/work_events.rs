//! The bounded channel on which a hub transport hands the engine its work events.

/// Work events from a hub transport to the engine (a [`WorkSource`](spokelet_work_api::source::WorkSource)).
///
/// Bounded ([`EVENT_BUFFER`]): a transport waits when the engine is behind, so a hub streaming
/// works faster than they can be taken costs at most that many works of memory. The engine
/// only files each event (the work runs as a task), so the waits are short and a transport still
/// reads its heartbeats and watch in time.
pub type HubEvents = tokio::sync::mpsc::Receiver<spokelet_work_api::source::WorkEvent>;

/// Work events a transport may have in flight to the engine. Each is at most one work (4 MiB by
/// the codec's limit), so this bounds the backlog to about a gigabyte in the worst case and a
/// few megabytes in practice, while being deep enough that a resync of thousands of works flows.
pub const EVENT_BUFFER: usize = 256;

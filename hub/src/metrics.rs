//! Prometheus metrics of the hub connection (registered under `spokelet_hub`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set: a list of (name, value) pairs.
type Labels = Vec<(String, String)>;

/// Hub metrics. Clones share the same series, so the transport and `/metrics` see the same values.
#[derive(Debug, Clone, Default)]
pub struct HubMetrics {
    /// 1 while a subscription to the hub is established.
    pub connected: Gauge,
    /// Reconnect attempts after the first connect (failed connects included).
    pub reconnects: Counter,
    /// Events received, by event type (`heartbeat`, `spec.create_request`, ..., `invalid`).
    pub events: Family<Labels, Counter>,
    /// Status events published, by kind (`update_request`, `resync_response`).
    pub statuses: Family<Labels, Counter>,
    /// Statuses waiting in the outbox (latest per work) for the hub to be reachable.
    pub outbox: Gauge,
    /// Statuses the hub refused, by gRPC code (`resource_exhausted`, `invalid_argument`, ...).
    pub refused: Family<Labels, Counter>,
}

impl HubMetrics {
    /// Registers every metric in `registry` (the caller picks the prefix: `spokelet_hub` via
    /// `root.sub_registry_with_prefix("hub")`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connected",
            "1 while subscribed to the hub",
            self.connected.clone(),
        );
        registry.register(
            "reconnects",
            "Reconnect attempts to the hub",
            self.reconnects.clone(),
        );
        registry.register(
            "events_received",
            "Hub events received by type",
            self.events.clone(),
        );
        registry.register(
            "statuses_published",
            "Status events published to the hub",
            self.statuses.clone(),
        );
        registry.register("outbox", "Statuses waiting to be published", self.outbox.clone());
        registry.register(
            "statuses_refused",
            "Status events the hub refused, by gRPC code",
            self.refused.clone(),
        );
    }

    /// Counts one received event of `kind`.
    pub fn event(&self, kind: &str) {
        self.events
            .get_or_create(&vec![("type".to_string(), kind.to_string())])
            .inc();
    }

    /// Counts one status the hub refused with `code`.
    pub fn refused(&self, code: &str) {
        self.refused
            .get_or_create(&vec![("code".to_string(), code.to_string())])
            .inc();
    }

    /// Counts one published status of `kind`.
    pub fn status(&self, kind: &str) {
        self.statuses
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }
}

/// Registers `metrics` under `spokelet_hub` in the root registry.
pub fn register(metrics: &HubMetrics, root: &mut Registry) {
    metrics.register(root.sub_registry_with_prefix("hub"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_under_prefix() {
        let mut root = Registry::with_prefix("spokelet");
        let m = HubMetrics::default();
        register(&m, &mut root);
        m.connected.set(1);
        m.event("heartbeat");
        m.status("update_request");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &root).unwrap();
        assert!(out.contains("spokelet_hub_connected 1"), "{out}");
        assert!(
            out.contains("spokelet_hub_events_received_total{type=\"heartbeat\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("spokelet_hub_statuses_published_total{kind=\"update_request\"} 1"),
            "{out}"
        );
    }
}

//! The Compute Pool's inventory: NodeInventories summed, turned into OCM's shapes and reported to the spoke and the hub.
//!
//! - [`aggregate`]: per-node summaries and the pool's totals ([`PoolInventory`]).
//! - [`claims`]: the claims and the ManagedCluster status they make.
//! - [`spoke_claims`]: ClusterClaim objects on the spoke.
//! - [`reporter`]: the watch, debounce and heartbeat that decide when to report.

pub mod aggregate;
pub mod claims;
pub mod reporter;
pub mod spoke_claims;

pub use aggregate::{NodeSummary, PoolInventory, PoolTotals};
pub use claims::{Claim, ClusterFacts};
pub use reporter::{PoolMetrics, PoolReport, PoolReportArgs, PoolReporter, RunningReporter};

//! Shared harness for the end-to-end tests: mosquitto brokers, the daemon binary, an upstream
//! collector on the district broker, a QoS 1 device publisher and event workloads.
//!
//! Everything here is synchronous (plain threads): rumqttc's blocking `Client`/`Connection` pair
//! is driven from a dedicated thread per connection, so no test ever publishes from the thread
//! that polls the event loop.
//!
//! One file per job:
//! - `site.rs`: a whole site (brokers, collector, gateways) in one scratch dir; `builder.rs`:
//!   what a test asks of it, over a typed `Config`; `gateway.rs`: one gateway (its config file,
//!   log and process); `checks.rs`: what a site's tests check upstream;
//! - `config.rs`: the test config, its constants, and writing a `Config` as a file;
//! - `broker.rs`: a real mosquitto; `collector.rs`: what arrives upstream; `summary.rs`:
//!   summaries parsed, totals per window and key; `publisher.rs`: a device publisher and a
//!   seeded gateway session;
//! - `daemon.rs`: the gateway binary (long-running processes, one-shot CLI runs, `/api/status`);
//! - `events.rs`: device events and workloads; `wait.rs`: waiting for conditions (a deadline
//!   only ends a broken test); `util.rs`: ports, clocks, logs, a deterministic RNG, a tmpfs;
//! - `http.rs`, `pki.rs`, `pg.rs`, `district.rs`: HTTP, test certificates, PostgreSQL and the
//!   district receiver.

// Each integration-test crate that includes this module uses a different subset of it.
#![allow(dead_code, unused_imports)]

pub mod broker;
pub mod builder;
pub mod checks;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod district;
pub mod events;
pub mod gateway;
pub mod http;
pub mod pg;
pub mod pki;
pub mod publisher;
pub mod site;
pub mod summary;
pub mod util;
pub mod wait;

pub use broker::*;
pub use builder::*;
pub use collector::*;
pub use config::*;
pub use daemon::*;
pub use events::*;
pub use gateway::*;
pub use http::{base64, http, http_from, Reply};
pub use pki::{make_ca, make_ca_with, make_leaf, make_leaf_with};
pub use publisher::*;
pub use site::*;
pub use summary::*;
pub use util::*;
pub use wait::*;

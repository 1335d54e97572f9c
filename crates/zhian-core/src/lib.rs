//! The pure core: payload validation, dedup decisions, window assignment, late re-issue and
//! summary building.
//!
//! Also vendor payload mapping ([`mapping`]) and the Modbus value rules: register decoding and counter steps (baseline, increase, wrap,
//! reset).
//!
//! Nothing in here imports tokio, redb or a network crate, and nothing reads a clock: every
//! function takes `now` (Unix milliseconds) as an argument. The committer drives [`engine`]
//! against the redb-backed [`engine::Ledger`]; the property tests drive it against an in-memory
//! one and a simple model.

pub mod care;
pub mod clock;
pub mod commit_policy;
pub mod commit_schedule;
pub mod counter;
pub mod daily;
pub mod devices;
pub mod engine;
pub mod event;
pub mod mapping;
pub mod occupancy;
pub mod summary;
pub mod window;

pub use event::{Event, Kind, Reject};

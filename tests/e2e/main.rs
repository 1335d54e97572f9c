//! The end-to-end tests, one binary: each module starts its sites (real mosquitto brokers,
//! PostgreSQL, the gateway binary) through the shared harness in `tests/common`. One binary
//! instead of one per file: the harness and the crate are compiled and linked once, not
//! eighteen times (2 cores).
//!
//! `cargo test --test e2e` runs them all; `cargo test --test e2e field_faults::` one module.

#[path = "../common/mod.rs"]
mod common;

mod care_daily;
mod demo;
mod device_table;
mod district;
mod district_config;
mod district_dashboard;
mod district_faults;
mod district_layers;
mod district_occupancy;
mod e2e_modbus;
mod e2e_mqtt;
mod e2e_status;
mod field_faults;
mod fleet;
mod key_loss;
mod lan_attacker;
mod occupancy;
mod operator;
mod privacy;
mod reload;
mod site_broker;
mod store_faults;
mod systemd_notify;
mod tls;
mod vendor;

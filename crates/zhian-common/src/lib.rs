//! What the gateway box and the district receiver share at run time, so the receiver can be a
//! crate of its own without a copy of any of it:
//! - [`backoff`]: the one jittered reconnect backoff;
//! - [`logfmt`]: log and error text escaped (no forged lines) and redacted (no secrets);
//! - [`mqtt`]: MQTT client settings (URL, credentials, TLS) into rumqttc options;
//! - [`config`]: config value types (durations, sizes, secrets, broker URLs, UTC offsets),
//!   [`config::Problem`]s that name their key, secrets from files and systemd credentials;
//! - [`fleet_key`]: the fleet's Ed25519 key pair on disk, signing and verifying;
//! - [`listener`]: the HTTP listener's connection limits and response deadline.
//!
//! Nothing here reads a gateway's or a receiver's whole config, the store or the database.

pub mod backoff;
pub mod config;
pub mod fleet_key;
pub mod listener;
pub mod logfmt;
pub mod mqtt;

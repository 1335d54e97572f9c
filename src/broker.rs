//! The embedded MQTT broker (`[broker] enabled = true`) for sites without one, on rumqttd.
//!
//! Behind the default cargo feature `embedded-broker`; a slim build
//! (`--no-default-features`) leaves rumqttd and its dependencies out and refuses
//! `broker.enabled = true` at config time.
//!
//! rumqttd keeps sessions and queues in memory. Devices get their PUBACK from the broker when it
//! has the message, before the gateway has committed it, so a crash of this process can lose the
//! last moments of device traffic that a persistent site broker (mosquitto with
//! `persistence true`) would have kept. Use a site broker where that matters; see the README.

use std::net::SocketAddr;

#[cfg(feature = "embedded-broker")]
/// Memory: rumqttd keeps a log per topic filter of `max_segment_count` segments of
/// `max_segment_size`; 4 × 1 MiB bounds it on a small box (the gateway reads as it goes).
/// Largest payload the embedded broker takes: above the contract's 64 KiB, so an oversized
/// device message reaches validation and is rejected (and counted) by the gateway.
const MAX_PAYLOAD: usize = 1 << 20;

/// Start the broker on `listen` in its own threads; returns once it accepts connections.
#[cfg(feature = "embedded-broker")]
pub fn start(listen: SocketAddr, credentials: Option<(&str, &str)>) -> Result<(), String> {
    use std::time::{Duration, Instant};
    // Refuse a port someone else holds (a site mosquitto on 1883, say) instead of quietly
    // talking to it.
    drop(
        std::net::TcpListener::bind(listen)
            .map_err(|e| format!("broker.listen: cannot listen on {listen}: {e}"))?,
    );
    let auth = match credentials {
        Some((u, p)) => format!(
            "[v4.1.connections.auth]\n{} = {}\n",
            toml_str(u),
            toml_str(p)
        ),
        None => String::new(),
    };
    let text = format!(
        r#"id = 0
[router]
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 1048576
max_segment_count = 4

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PAYLOAD}
max_inflight_count = 1000
dynamic_filters = true
{auth}"#
    );
    let config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| format!("embedded broker config: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| format!("embedded broker thread: {e}"))?;
    // Wait until the broker holds the port. A bind probe, not a connection: rumqttd logs an
    // error for every connection that closes without an MQTT CONNECT.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(listen).is_ok() {
        if Instant::now() > deadline {
            return Err(format!(
                "embedded broker did not start listening on {listen}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%listen, "embedded MQTT broker listening");
    Ok(())
}

#[cfg(feature = "embedded-broker")]
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Without the `embedded-broker` feature there is nothing to start.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(listen: SocketAddr, _credentials: Option<(&str, &str)>) -> Result<(), String> {
    Err(format!(
        "broker.enabled: this build has no embedded broker (cargo feature `embedded-broker`); cannot listen on {listen}"
    ))
}

//! Shared MQTT client setup (options, credentials, TLS) for the device input and the forwarder.

use crate::config::{BrokerUrl, Secret};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::path::Path;
use std::time::Duration;

/// Largest incoming packet we accept from a broker: the MQTT maximum (a remaining length of
/// 268,435,455 bytes plus the fixed header), so that any message a broker delivers (mosquitto's
/// `message_size_limit` is 0, no limit, by default) reaches validation and is rejected as
/// `too_large` and acknowledged, instead of killing the connection and being redelivered after
/// every reconnect (field notes). rumqttc reads a packet whole: a message that large costs its
/// size in memory while it is read; a site broker's `message_size_limit` keeps that down.
pub const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;
/// Largest packet we send (a summary for hundreds of devices is well under this).
pub const MAX_OUTGOING_PACKET: usize = 4 << 20;

pub struct ClientSettings<'a> {
    pub url: &'a str,
    pub client_id: String,
    pub username: Option<&'a str>,
    pub password: Option<&'a Secret>,
    pub ca_file: Option<&'a Path>,
    pub client_cert: Option<&'a Path>,
    pub client_key: Option<&'a Path>,
    pub keep_alive: Duration,
}

/// Build rumqttc options. Errors are reported with the config key they come from.
pub fn options(s: &ClientSettings<'_>, section: &str) -> Result<MqttOptions, String> {
    let url = BrokerUrl::parse(s.url).map_err(|e| format!("{section}.url: {e}"))?;
    let mut o = MqttOptions::new(s.client_id.clone(), url.host.clone(), url.port);
    o.set_keep_alive(s.keep_alive.max(Duration::from_secs(5)));
    o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    if let Some(u) = s.username {
        o.set_credentials(u, s.password.map(|p| p.0.clone()).unwrap_or_default());
    }
    if url.tls {
        let tls = match s.ca_file {
            Some(ca) => {
                let ca = std::fs::read(ca).map_err(|e| format!("{section}.ca_file: {e}"))?;
                let client_auth = match (s.client_cert, s.client_key) {
                    (Some(c), Some(k)) => Some((
                        std::fs::read(c).map_err(|e| format!("{section}.client_cert: {e}"))?,
                        std::fs::read(k).map_err(|e| format!("{section}.client_key: {e}"))?,
                    )),
                    _ => None,
                };
                TlsConfiguration::Simple {
                    ca,
                    alpn: None,
                    client_auth,
                }
            }
            None => TlsConfiguration::default(),
        };
        o.set_transport(Transport::Tls(tls));
    }
    Ok(o)
}

/// Install the ring crypto provider once per process (rustls needs one chosen).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! `zhian-gateway demo`: a self-contained site. The embedded broker, simulated devices with a
//! daily rhythm (MQTT door controllers and cameras, a Modbus TCP vehicle gate served
//! in-process), the real pipeline, and the status page on 127.0.0.1:8080.
//!
//! The site is `config/demo.toml` (embedded in the binary); only the simulators are extra.

use crate::config::{self, Config};
use crate::core::summary::rfc3339_utc;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

/// The demo site's config, as shipped in `config/demo.toml`.
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");

/// Where the simulated vehicle-gate controller listens (must match `config/demo.toml`).
const GATE_ADDR: &str = "127.0.0.1:15020";

/// The demo config, with `data_dir` overridden when given.
pub fn config(data_dir: Option<PathBuf>) -> Result<Config, Vec<config::Problem>> {
    let mut cfg = config::load_str(DEMO_TOML)?;
    if let Some(d) = data_dir {
        cfg.gateway.data_dir = d;
    }
    Ok(cfg)
}

/// How busy the compound is at local hour `h` (0.0-1.0): morning and evening peaks.
pub fn rhythm(hour: f64) -> f64 {
    let bump = |centre: f64, width: f64| (-((hour - centre) / width).powi(2)).exp();
    (0.08 + 0.9 * bump(7.8, 1.3) + 0.8 * bump(18.3, 1.6) + 0.25 * bump(12.5, 1.5)).min(1.0)
}

fn local_hour(tz_secs: i32) -> f64 {
    let now = crate::clock::now_ms() / 1000 + i64::from(tz_secs);
    (now.rem_euclid(86_400)) as f64 / 3600.0
}

/// Run the demo until `shutdown`.
pub async fn run(
    data_dir: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::RunError> {
    let cfg = config(data_dir).map_err(|p| {
        crate::RunError::Broker(
            p.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let stop = CancellationToken::new();
    let tz = cfg.site_offset_s();
    let gate = Arc::new(Mutex::new(GateState::default()));
    {
        // Continue the simulated controller's counters from what an earlier demo run in the
        // same data dir stored, so a second run does not read a "reset" worth 48k vehicles.
        let stored = crate::store::Store::open_read_only(&cfg.gateway.data_dir)
            .and_then(|s| s.counters())
            .unwrap_or_default();
        let last = |point: &str| {
            stored
                .iter()
                .find(|(k, _)| k.as_str() == format!("vehicle\0gate-east\0{point}"))
                .map(|(_, r)| r.value as u32)
        };
        let mut g = gate.lock().expect("gate");
        // A controller that has been counting for a while: the first reading is a baseline.
        g.add(0, last("plates_in").unwrap_or(48_211));
        g.add(2, last("plates_out").unwrap_or(48_150));
    }
    tokio::spawn(serve_gate(gate.clone(), stop.clone()));
    tokio::spawn(drive_gate(gate, tz, stop.clone()));
    let broker_port = cfg
        .broker
        .listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(11883);
    tokio::spawn(simulate_mqtt(broker_port, tz, stop.clone()));
    println!("zhian-gateway demo");
    println!(
        "  status page      http://{}/  (English: ?lang=en)",
        cfg.status.listen
    );
    println!("  embedded broker  mqtt://{}  (district view: mosquitto_sub -p {broker_port} -t 'zhian/district/#' -v)", cfg.broker.listen);
    println!("  simulated        door-1..door-4 and cam-1..cam-3 over MQTT; vehicle gate gate-east over Modbus TCP {GATE_ADDR}");
    println!("  store            {}", cfg.gateway.data_dir.display());
    println!(
        "  pseudonym keys   {}",
        cfg.privacy.key_dir(&cfg.gateway.data_dir).display()
    );
    println!("  the same site as a file: config/demo.toml; Ctrl-C stops");
    let r = crate::run(cfg, shutdown).await;
    stop.cancel();
    r
}

/// MQTT doors and cameras. Waits for the embedded broker, then publishes forever.
async fn simulate_mqtt(port: u16, tz: i32, stop: CancellationToken) {
    let mut opts = MqttOptions::new("zhian-demo-devices", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let poll_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = poll_stop.cancelled() => return,
                r = eventloop.poll() => if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    // Event ids unique across demo runs in the same data dir (dedup holds keys for 24 h).
    let mut seq: u64 = crate::clock::now_ms() as u64;
    let mut last: Vec<(String, String)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let busy = rhythm(local_hour(tz));
        let hour = local_hour(tz);
        let now = crate::clock::now_ms();
        for door in 1..=4 {
            if fastrand::f64() < 0.6 * busy {
                seq += 1;
                // Mornings people leave, evenings they come home.
                let entry_share = if hour < 12.0 { 0.3 } else { 0.65 };
                let action = if fastrand::f64() < entry_share {
                    "entry"
                } else {
                    "exit"
                };
                let result = if fastrand::f64() < 0.04 {
                    "denied"
                } else {
                    "granted"
                };
                let topic = format!("zhian/access/door-{door}");
                let payload = format!(
                    r#"{{"id":"door-{door}-{seq}","ts":"{}","action":"{action}","result":"{result}","subject":"card:{}"}}"#,
                    rfc3339_utc(now),
                    10_000 + fastrand::u32(0..5000)
                );
                last.push((topic.clone(), payload.clone()));
                let _ = client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await;
            }
        }
        for cam in 1..=3 {
            let roll = fastrand::f64();
            let action = if roll < 0.015 * busy {
                Some("stranger")
            } else if roll < 0.02 * busy {
                Some("loitering")
            } else if roll < 0.0206 {
                Some("fire_lane_blocked")
            } else if roll < 0.0209 {
                Some("high_altitude_throw")
            } else {
                None
            };
            if let Some(action) = action {
                seq += 1;
                let payload = format!(
                    r#"{{"id":"cam-{cam}-{seq}","ts":{now},"action":"{action}","subject":"face:{}"}}"#,
                    fastrand::u32(0..100_000)
                );
                let _ = client
                    .publish(
                        format!("zhian/camera/cam-{cam}"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await;
            }
        }
        // Devices resend now and then (counted once), and one is a little broken.
        if fastrand::f64() < 0.05 {
            if let Some((topic, payload)) = last.get(fastrand::usize(0..last.len().max(1))).cloned()
            {
                let _ = client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await;
            }
        }
        if fastrand::f64() < 0.004 {
            let _ = client
                .publish(
                    "zhian/access/door-4",
                    QoS::AtLeastOnce,
                    false,
                    r#"{"id":"door-4-x","action":"entry"}"#,
                )
                .await;
        }
        if last.len() > 200 {
            last.drain(..100);
        }
    }
}

/// Registers and coils of the simulated vehicle-gate controller.
#[derive(Default)]
struct GateState {
    regs: HashMap<u16, u16>,
    barrier_open: bool,
}

impl GateState {
    fn add(&mut self, at: u16, n: u32) {
        let v = (u32::from(*self.regs.get(&at).unwrap_or(&0)) << 16
            | u32::from(*self.regs.get(&(at + 1)).unwrap_or(&0)))
        .wrapping_add(n);
        self.regs.insert(at, (v >> 16) as u16);
        self.regs.insert(at + 1, v as u16);
    }
}

/// Vehicles come and go with the same rhythm; the barrier opens for each.
async fn drive_gate(gate: Arc<Mutex<GateState>>, tz: i32, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let busy = rhythm(local_hour(tz));
        let mut g = gate.lock().expect("gate");
        g.barrier_open = false;
        if fastrand::f64() < 0.35 * busy {
            let inbound = fastrand::bool();
            g.add(if inbound { 0 } else { 2 }, 1);
            g.barrier_open = true;
        }
    }
}

#[derive(Clone)]
struct GateService(Arc<Mutex<GateState>>);

impl tokio_modbus::server::Service for GateService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let g = self.0.lock().expect("gate");
        let r = match req {
            Request::ReadHoldingRegisters(a, n) => Ok(Response::ReadHoldingRegisters(
                (a..a.saturating_add(n))
                    .map(|i| g.regs.get(&i).copied().unwrap_or(0))
                    .collect(),
            )),
            Request::ReadCoils(a, n) => Ok(Response::ReadCoils(
                (a..a.saturating_add(n))
                    .map(|i| i == 0 && g.barrier_open)
                    .collect(),
            )),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(std::future::ready(r))
    }
}

async fn serve_gate(gate: Arc<Mutex<GateState>>, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::bind(GATE_ADDR).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, addr = GATE_ADDR, "demo: cannot serve the simulated vehicle gate");
            return;
        }
    };
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let service = GateService(gate);
    let on_connected = move |stream, _addr| {
        let service = service.clone();
        async move { Ok(Some((service, stream))) }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        r = server.serve(&on_connected, |e| tracing::debug!(error = %e, "demo gate connection")) => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "demo: gate server stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let cfg = config(Some("/tmp/x".into())).unwrap();
        assert!(cfg.broker.enabled);
        assert_eq!(cfg.modbus.devices[0].tcp.as_deref(), Some(GATE_ADDR));
        assert_eq!(cfg.gateway.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn rhythm_peaks_in_the_morning_and_evening() {
        assert!(rhythm(8.0) > 0.8 && rhythm(18.3) > 0.7);
        assert!(rhythm(3.0) < 0.15);
        assert!((0..=96).all(|q| (0.0..=1.0).contains(&rhythm(q as f64 / 4.0))));
    }
}

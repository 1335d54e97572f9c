//! The district's side of the fleet (contract: "Fleet configuration"): `fleet push` signs a
//! change and publishes it per gateway, canaries first; `fleet diag` asks one box for its status
//! report and log tail. Only `district.toml`'s `[mqtt]` section is read (broker, prefix,
//! credentials): the database is not needed. Behind the `district` feature (the box build
//! leaves it out).
//!
//! Which gateways a `--layer` or `--all` names is read from the boxes' retained `status`
//! messages, which carry their site labels: a box that never connected is not found (name it
//! with `--gateway`).

use crate::backoff::Backoff;
use crate::mqtt::{options, ClientSettings};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, QoS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use zhian_common::fleet_key::SigningKey;
use zhian_proto::{self as proto, ConfigPhase};

/// Which gateways a push goes to.
#[derive(Debug, Clone)]
pub enum Targets {
    Gateways(Vec<String>),
    /// `district|street|community|compound` = label.
    Layer(String, String),
    All,
}

/// A push, as the command line gave it.
#[derive(Debug, Clone)]
pub struct Push {
    pub fragment: String,
    pub targets: Targets,
    pub canary: usize,
    pub serial: Option<u64>,
    /// How long to wait for the canaries' and then the others' reports.
    pub timeout: Duration,
    /// Publish to the rest without waiting for their reports.
    pub no_wait: bool,
}

/// How a push ended: exit 0 all applied (or sent, with `--no_wait`), 1 stopped by a
/// `rejected` or `rolled_back`, 2 reports missing at the timeout, 78 bad input.
pub type Exit = u8;

/// `[mqtt]` of `district.toml`, with its password filled from `password_file`.
pub fn broker_of(path: &Path) -> Result<zhian_district::config::Broker, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("{}: {}", path.display(), e.message()))?;
    let mqtt = table
        .get("mqtt")
        .cloned()
        .unwrap_or(toml::Value::Table(Default::default()));
    let mut b: zhian_district::config::Broker = mqtt
        .try_into()
        .map_err(|e: toml::de::Error| format!("{}: mqtt: {}", path.display(), e.message()))?;
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let file = b.password_file.clone();
    zhian_common::config::fill_secret("mqtt", &mut b.password, file.as_ref(), creds.as_deref())
        .map_err(|p| p.to_string())?;
    Ok(b)
}

fn connect(
    b: &zhian_district::config::Broker,
    role: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    crate::mqtt::install_crypto_provider();
    let s = ClientSettings {
        url: &b.url,
        client_id: format!("{}-{role}-{}", b.client_id, std::process::id()),
        username: b.username.as_deref(),
        password: b.password.as_ref(),
        ca_file: b.ca_file.as_deref(),
        client_cert: b.client_cert.as_deref(),
        client_key: b.client_key.as_deref(),
        keep_alive: b.keep_alive.0,
    };
    let mut o = options(&s, "mqtt")?;
    o.set_clean_session(true);
    Ok(AsyncClient::new(o, 256))
}

/// What a box last said, from its retained messages and the live reports.
#[derive(Debug, Default, Clone)]
struct Known {
    site: Option<proto::Site>,
    /// Its retained `config/set` (serial, fragment, signature), checked against our key before
    /// its serial counts.
    set: Option<(u64, String, String)>,
    /// Its newest `config/state`.
    state: Option<proto::ConfigState>,
}

struct Session {
    client: AsyncClient,
    events: EventLoop,
    prefix: String,
    known: BTreeMap<String, Known>,
    /// Packet ids of our publishes not yet PUBACKed.
    unacked: usize,
}

impl Session {
    /// Poll once; take in what arrived. Errors end the push (the broker is gone).
    async fn step(&mut self) -> Result<(), String> {
        match self.events.poll().await {
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                self.take(&p.topic, &p.payload);
                Ok(())
            }
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                self.unacked = self.unacked.saturating_sub(1);
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("district broker: {e}")),
        }
    }

    fn take(&mut self, topic: &str, payload: &[u8]) {
        let Some(rest) = topic
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return;
        };
        let Some((gw, leaf)) = rest.split_once('/') else {
            return;
        };
        if payload.is_empty() {
            return;
        }
        let k = self.known.entry(gw.to_string()).or_default();
        match leaf {
            "status" => {
                if let Ok(s) = serde_json::from_slice::<proto::Status>(payload) {
                    if s.site.is_some() {
                        k.site = s.site;
                    }
                }
            }
            "config/set" => {
                if let Ok(s) = serde_json::from_slice::<proto::ConfigSet>(payload) {
                    k.set = Some((s.serial, s.fragment, s.sig));
                }
            }
            "config/state" => {
                if let Ok(s) = serde_json::from_slice::<proto::ConfigState>(payload) {
                    k.state = Some(s);
                }
            }
            _ => {}
        }
    }

    /// Poll until nothing arrived for `quiet` (the retained messages after a SUBACK), at most
    /// `max`.
    async fn settle(&mut self, quiet: Duration, max: Duration) -> Result<(), String> {
        let end = Instant::now() + max;
        loop {
            match tokio::time::timeout(quiet, self.step()).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            }
            if Instant::now() > end {
                return Ok(());
            }
        }
    }

    async fn connected(&mut self) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(end, self.events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("district broker: {e}")),
                Err(_) => return Err("district broker: no CONNACK within 15 s".into()),
            }
        }
    }

    /// Publish each (gateway, `config/set` payload), retained at QoS 1, polling the connection
    /// whenever the client's request queue is full (a push to thousands of boxes).
    async fn send(&mut self, msgs: &[(String, Vec<u8>)]) -> Result<(), String> {
        for (g, bytes) in msgs {
            let topic = proto::config_set_topic(&self.prefix, g);
            loop {
                match self
                    .client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, true, bytes.clone())
                {
                    Ok(()) => break,
                    Err(rumqttc::ClientError::TryRequest(_)) => self.step().await?,
                    Err(e) => return Err(e.to_string()),
                }
            }
            self.unacked += 1;
        }
        Ok(())
    }

    /// Wait until every publish was PUBACKed.
    async fn flushed(&mut self, timeout: Duration) -> Result<(), String> {
        let end = Instant::now() + timeout;
        while self.unacked > 0 {
            match tokio::time::timeout_at(end, self.step()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(format!(
                        "{} publish(es) not acknowledged by the broker",
                        self.unacked
                    ))
                }
            }
        }
        Ok(())
    }

    /// Poll until each of `gws` reported a final state for `serial` or one reported a failure
    /// (`stop_on_failure`), at most until `end`. Prints each report as it comes.
    async fn await_reports(
        &mut self,
        gws: &[String],
        serial: u64,
        end: Instant,
        stop_on_failure: bool,
    ) -> Result<(), String> {
        let mut shown: BTreeMap<String, ConfigPhase> = BTreeMap::new();
        loop {
            let mut all_final = true;
            let mut failed = false;
            for g in gws {
                let st = self
                    .known
                    .get(g)
                    .and_then(|k| k.state.as_ref())
                    .filter(|s| s.serial == serial);
                match st {
                    Some(s) => {
                        if shown.get(g) != Some(&s.state) {
                            shown.insert(g.clone(), s.state);
                            eprintln!(
                                "  {g}: {}{}",
                                s.state.as_str(),
                                s.reason
                                    .as_deref()
                                    .map(|r| format!(" ({r})"))
                                    .unwrap_or_default()
                            );
                        }
                        if !s.state.is_final() {
                            all_final = false;
                        } else if s.state != ConfigPhase::Applied {
                            failed = true;
                        }
                    }
                    None => all_final = false,
                }
            }
            if all_final || (failed && stop_on_failure) {
                return Ok(());
            }
            match tokio::time::timeout_at(end, self.step()).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            }
        }
    }

    fn outcome(&self, g: &str, serial: u64) -> Option<&proto::ConfigState> {
        self.known
            .get(g)
            .and_then(|k| k.state.as_ref())
            .filter(|s| s.serial == serial && s.state.is_final())
    }
}

fn label<'a>(site: &'a proto::Site, layer: &str) -> Option<&'a str> {
    match layer {
        "district" => site.district.as_deref(),
        "street" => site.street.as_deref(),
        "community" => site.community.as_deref(),
        "compound" => site.compound.as_deref(),
        _ => None,
    }
}

/// `fleet push`. Prints progress to stderr and one line per gateway (`gateway state [reason]`)
/// to stdout at the end.
pub async fn push(config: &Path, key: &Path, p: Push) -> Exit {
    match push_inner(config, key, p).await {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("fleet push: {msg}");
            code
        }
    }
}

async fn push_inner(config: &Path, key: &Path, p: Push) -> Result<Exit, (Exit, String)> {
    let bad = |m: String| (78u8, m);
    let b = broker_of(config).map_err(bad)?;
    let key = SigningKey::load(key).map_err(bad)?;
    if let Some(why) = super::rules::refuse_keys(&p.fragment) {
        return Err(bad(why));
    }
    if let Targets::Layer(l, _) = &p.targets {
        if !["district", "street", "community", "compound"].contains(&l.as_str()) {
            return Err(bad(format!(
                "--layer {l}=...: the layer is district, street, community or compound"
            )));
        }
    }
    let (client, events) = connect(&b, "push").map_err(bad)?;
    let mut s = Session {
        client,
        events,
        prefix: b.topic_prefix.clone(),
        known: BTreeMap::new(),
        unacked: 0,
    };
    let net = |m: String| (2u8, m);
    s.connected().await.map_err(net)?;
    for leaf in ["status", "config/set", "config/state"] {
        s.client
            .subscribe(format!("{}/+/{leaf}", b.topic_prefix), QoS::AtLeastOnce)
            .await
            .map_err(|e| net(e.to_string()))?;
    }
    s.settle(Duration::from_millis(1500), Duration::from_secs(20))
        .await
        .map_err(net)?;
    let mut targets: Vec<String> = match &p.targets {
        Targets::Gateways(g) => g.clone(),
        Targets::Layer(l, v) => s
            .known
            .iter()
            .filter(|(_, k)| k.site.as_ref().and_then(|site| label(site, l)) == Some(v.as_str()))
            .map(|(g, _)| g.clone())
            .collect(),
        Targets::All => s
            .known
            .iter()
            .filter(|(_, k)| k.site.is_some())
            .map(|(g, _)| g.clone())
            .collect(),
    };
    targets.sort();
    targets.dedup();
    if let Some(g) = targets.iter().find(|g| !proto::valid_gateway_id(g)) {
        return Err(bad(format!(
            "--gateway {g:?}: a gateway id is 1-64 of [a-z0-9-]"
        )));
    }
    if targets.is_empty() {
        return Err(bad(
            "no gateway matches (a box is found by its retained status; name it with --gateway)"
                .into(),
        ));
    }
    // The serials the boxes took: of changes signed with this key (anyone who can publish to
    // the broker can leave a retained `config/set`, or a `rejected` report quoting any serial;
    // neither may push the next serial out of reach).
    let ours = zhian_common::fleet_key::Trust(vec![key.public()]);
    let floor = targets
        .iter()
        .filter_map(|g| s.known.get(g).map(|k| (g, k)))
        .flat_map(|(g, k)| {
            let set = k.set.as_ref().and_then(|(serial, fragment, sig)| {
                ours.verify(&proto::config_signed_bytes(g, *serial, fragment), sig)
                    .ok()
                    .map(|_| *serial)
            });
            let state = k
                .state
                .as_ref()
                .filter(|st| st.state != ConfigPhase::Rejected)
                .map(|st| st.serial);
            [set, state]
        })
        .flatten()
        .filter(|n| *n < super::rules::MAX_SERIAL)
        .max()
        .unwrap_or(0);
    if p.serial.is_some_and(|n| n > super::rules::MAX_SERIAL) {
        return Err(bad(format!(
            "--serial above 2^53 ({}): a box that took it could take no other",
            super::rules::MAX_SERIAL
        )));
    }
    let serial = match p.serial {
        Some(n) => n,
        None => (floor + 1).max(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
    };
    let canaries: Vec<String> = targets.iter().take(p.canary).cloned().collect();
    let rest: Vec<String> = targets.iter().skip(p.canary).cloned().collect();
    eprintln!(
        "fleet push: serial {serial} to {} gateway(s){}",
        targets.len(),
        if canaries.is_empty() {
            String::new()
        } else {
            format!(", {} canary first: {}", canaries.len(), canaries.join(" "))
        }
    );
    let msg_for = |g: &str| {
        let sig = key.sign(&proto::config_signed_bytes(g, serial, &p.fragment));
        serde_json::to_vec(&proto::ConfigSet {
            schema: proto::ConfigV1,
            serial,
            fragment: p.fragment.clone(),
            sig,
        })
        .expect("config/set serializes")
    };
    let end = Instant::now() + p.timeout;
    let mut stopped = false;
    if !canaries.is_empty() {
        let msgs: Vec<_> = canaries.iter().map(|g| (g.clone(), msg_for(g))).collect();
        s.send(&msgs).await.map_err(net)?;
        s.flushed(Duration::from_secs(30)).await.map_err(net)?;
        eprintln!("fleet push: sent to the canaries; waiting for their reports");
        s.await_reports(&canaries, serial, end, true)
            .await
            .map_err(net)?;
        let failed: Vec<&String> = canaries
            .iter()
            .filter(|g| {
                s.outcome(g, serial)
                    .is_some_and(|st| st.state != ConfigPhase::Applied)
            })
            .collect();
        let missing: Vec<&String> = canaries
            .iter()
            .filter(|g| s.outcome(g, serial).is_none())
            .collect();
        if !failed.is_empty() {
            eprintln!("fleet push: rollout stopped: a canary did not apply serial {serial}; the other {} gateway(s) were not sent it", rest.len());
            stopped = true;
        } else if !missing.is_empty() {
            eprintln!("fleet push: rollout stopped: no final report from {} within {}; the other {} gateway(s) were not sent it",
                missing.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(" "),
                humantime::format_duration(p.timeout), rest.len());
            stopped = true;
        }
    }
    if !stopped && !rest.is_empty() {
        let msgs: Vec<_> = rest.iter().map(|g| (g.clone(), msg_for(g))).collect();
        s.send(&msgs).await.map_err(net)?;
        s.flushed(Duration::from_secs(60)).await.map_err(net)?;
        eprintln!("fleet push: sent to {} gateway(s)", rest.len());
        if !p.no_wait {
            s.await_reports(&rest, serial, end, false)
                .await
                .map_err(net)?;
        }
    }
    let mut code = 0u8;
    let sent: BTreeSet<&String> = if stopped {
        canaries.iter().collect()
    } else {
        targets.iter().collect()
    };
    for g in &targets {
        let line = if !sent.contains(g) {
            "not_sent".to_string()
        } else {
            match s.outcome(g, serial) {
                Some(st) => {
                    if st.state != ConfigPhase::Applied {
                        code = code.max(1);
                    }
                    match &st.reason {
                        Some(r) => format!("{} {r}", st.state.as_str()),
                        None => st.state.as_str().to_string(),
                    }
                }
                None if p.no_wait && !canaries.contains(g) => "sent".to_string(),
                None => {
                    code = code.max(2);
                    "no_report".to_string()
                }
            }
        };
        println!("{g} {line}");
    }
    if stopped {
        // The rollout's verdict: stopped by a canary (a missing report beside it is not news).
        code = 1;
    }
    let _ = s.client.try_disconnect();
    Ok(code)
}

/// `fleet diag`: the box's reply (JSON) on stdout. Exit 0 answered, 1 no answer within
/// `timeout`, 78 bad input, 2 broker trouble.
pub async fn diag(config: &Path, key: &Path, gateway: &str, timeout: Duration) -> Exit {
    let r = async {
        let b = broker_of(config).map_err(|e| (78u8, e))?;
        let key = SigningKey::load(key).map_err(|e| (78u8, e))?;
        if !proto::valid_gateway_id(gateway) {
            return Err((78, format!("--gateway {gateway:?}: 1-64 of [a-z0-9-]")));
        }
        let (client, mut events) = connect(&b, "diag").map_err(|e| (78u8, e))?;
        let reply_topic = proto::diag_reply_topic(&b.topic_prefix, gateway);
        client
            .subscribe(reply_topic.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| (2u8, e.to_string()))?;
        let id = format!("{:016x}", fastrand::u64(..));
        let at = proto::Timestamp(crate::clock::now_ms());
        let req = proto::DiagRequest {
            schema: proto::DiagRequestV1,
            id: id.clone(),
            at,
            sig: key.sign(&proto::diag_signed_bytes(gateway, &id, at)),
        };
        let end = Instant::now() + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match tokio::time::timeout_at(end, events.poll()).await {
                Err(_) => {
                    return Err((1, format!("no reply from {gateway} within {} (is it online, with fleet.trust naming this key's fleet.pub?)", humantime::format_duration(timeout))))
                }
                Ok(Err(e)) => {
                    eprintln!("fleet diag: district broker: {e}; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => {
                    client
                        .try_publish(
                            proto::diag_request_topic(&b.topic_prefix, gateway),
                            QoS::AtLeastOnce,
                            false,
                            serde_json::to_vec(&req).expect("request serializes"),
                        )
                        .map_err(|e| (2u8, e.to_string()))?;
                }
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) if p.topic == reply_topic => {
                    if let Ok(r) = serde_json::from_slice::<proto::DiagReply>(&p.payload) {
                        if r.id == id {
                            println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                            let _ = client.try_disconnect();
                            return Ok(0);
                        }
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
    }
    .await;
    match r {
        Ok(c) => c,
        Err((c, m)) => {
            eprintln!("fleet diag: {m}");
            c
        }
    }
}

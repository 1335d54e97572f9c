//! What serde cannot check: ranges, required keys, cross-key and cross-section rules. Each
//! problem names its key path.

use super::*;

pub(crate) fn is_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

pub(crate) fn is_action_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// Checks what serde cannot: ranges, required keys, cross-key rules.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    validate_health(&c.health, &mut p);
    validate_care(&c.care, &mut p);
    if let Some(o) = &c.occupancy {
        if o.long_stay.0 < Duration::from_secs(60) {
            p.push(problem(
                "occupancy.long_stay",
                format!("{} must be at least 1m", o.long_stay),
            ));
        }
        if o.max_stay.0 <= o.long_stay.0 {
            p.push(problem(
                "occupancy.max_stay",
                format!(
                    "{} must be longer than occupancy.long_stay ({})",
                    o.max_stay, o.long_stay
                ),
            ));
        }
        if o.capacity == Some(0) {
            p.push(problem(
                "occupancy.capacity",
                "0 spaces: leave it out when the compound has no parking count",
            ));
        }
    }
    let probation = c.fleet.probation.0;
    if probation < Duration::from_secs(1) || probation > Duration::from_secs(86_400) {
        p.push(problem(
            "fleet.probation",
            format!("{} must be 1s to 1d", c.fleet.probation),
        ));
    }
    if let Some(t) = &c.fleet.trust {
        if !t.is_absolute() {
            p.push(problem(
                "fleet.trust",
                format!("{} must be an absolute path", t.display()),
            ));
        }
    }
    let g = &c.gateway;
    if g.id.is_empty() {
        p.push(problem("gateway.id", "required (1-64 of [a-z0-9-])"));
    } else if g.id.len() > 64 || !g.id.chars().all(is_id_char) {
        p.push(problem(
            "gateway.id",
            format!("{:?} must be 1-64 of [a-z0-9-]", g.id),
        ));
    }
    if g.data_dir.as_os_str().is_empty() {
        p.push(problem("gateway.data_dir", "must not be empty"));
    }
    if let Some(k) = &c.privacy.key_dir {
        if !k.is_absolute() {
            p.push(problem(
                "privacy.key_dir",
                format!("{} must be an absolute path", k.display()),
            ));
        } else if k.starts_with(&g.data_dir) {
            p.push(problem(
                "privacy.key_dir",
                format!(
                    "{} is inside gateway.data_dir: a copy or backup of the data dir would hold the keys; put it beside it (default: {})",
                    k.display(),
                    Privacy::default().key_dir(&g.data_dir).display()
                ),
            ));
        }
    }
    if c.broker.enabled && !cfg!(feature = "embedded-broker") {
        p.push(problem(
            "broker.enabled",
            "this build has no embedded broker (cargo feature `embedded-broker`); use a site broker",
        ));
    }
    if c.broker.enabled {
        let lan = c
            .broker
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        let creds = (c.broker.username.is_some(), c.broker.password.is_some());
        if lan && creds != (true, true) {
            p.push(problem(
                "broker.username",
                "the embedded broker listens on the LAN: set broker.username and broker.password (devices carry cards, faces and plates)",
            ));
        } else if creds.0 != creds.1 {
            p.push(problem(
                "broker.password",
                "broker.username and broker.password go together",
            ));
        }
    }
    if c.broker.listen.parse::<SocketAddr>().is_err() {
        p.push(problem(
            "broker.listen",
            format!("{:?} is not host:port", c.broker.listen),
        ));
    }
    if c.mqtt.enabled {
        if let Err(e) = BrokerUrl::parse(&c.mqtt.url) {
            p.push(problem("mqtt.url", e));
        }
        if c.mqtt.topics.is_empty() {
            p.push(problem(
                "mqtt.topics",
                "at least one topic filter is needed",
            ));
        }
        for (i, t) in c.mqtt.topics.iter().enumerate() {
            if t.is_empty() || t.len() > 1024 {
                p.push(problem(format!("mqtt.topics[{i}]"), "invalid topic filter"));
            }
        }
        check_client_id(&mut p, "mqtt.client_id", c.mqtt.client_id.as_deref());
        check_backoff(&mut p, "mqtt", c.mqtt.reconnect_min, c.mqtt.reconnect_max);
        sources::compile(&c.mqtt.sources, &mut p);
        // A source must not take canonical messages (contract: "Canonical topics keep working").
        for (i, s) in c.mqtt.sources.iter().enumerate() {
            if let Some(t) = c
                .mqtt
                .topics
                .iter()
                .find(|t| sources::filters_overlap(&s.topic, t))
            {
                p.push(problem(
                    format!("mqtt.sources[{i}].topic"),
                    format!(
                        "{:?} overlaps mqtt.topics {t:?}: canonical messages would be mapped by this source; give the source's devices a topic of their own",
                        s.topic
                    ),
                ));
            }
        }
        check_file(&mut p, "mqtt.ca_file", c.mqtt.ca_file.as_deref());
        check_file(&mut p, "mqtt.client_cert", c.mqtt.client_cert.as_deref());
        check_file(&mut p, "mqtt.client_key", c.mqtt.client_key.as_deref());
        if c.mqtt.client_cert.is_some() && c.mqtt.ca_file.is_none() {
            p.push(problem(
                "mqtt.client_cert",
                "mutual TLS needs mqtt.ca_file (the site broker's CA) as well",
            ));
        }
        if c.mqtt.client_cert.is_some() != c.mqtt.client_key.is_some() {
            p.push(problem(
                "mqtt.client_key",
                "client_cert and client_key go together",
            ));
        }
    }
    let w = c.aggregate.window.0;
    if w < Duration::from_secs(1) || w > Duration::from_secs(24 * 3600) || w.subsec_nanos() != 0 {
        p.push(problem(
            "aggregate.window",
            "must be a whole number of seconds between 1s and 24h",
        ));
    }
    if c.aggregate.grace.0 >= c.aggregate.max_lateness.0 {
        p.push(problem(
            "aggregate.grace",
            "must be shorter than aggregate.max_lateness",
        ));
    }
    if c.aggregate.max_lateness.0 > Duration::from_secs(30 * 24 * 3600) {
        p.push(problem("aggregate.max_lateness", "at most 30d"));
    }
    if c.dedup.ttl.0 < Duration::from_secs(1) {
        p.push(problem("dedup.ttl", "at least 1s"));
    }
    if c.dedup.ttl < c.aggregate.max_lateness {
        p.push(problem(
            "dedup.ttl",
            format!(
                "must be at least aggregate.max_lateness ({}): a message redelivered after its dedup key expired but still within max_lateness would count twice",
                humantime::format_duration(c.aggregate.max_lateness.0)
            ),
        ));
    }
    if c.dedup.purge_batch == 0 {
        p.push(problem("dedup.purge_batch", "at least 1"));
    }
    if c.upstream.max_packet_size.0 < 4096 || c.upstream.max_packet_size.0 > 268_435_455 {
        p.push(problem(
            "upstream.max_packet_size",
            "between 4KiB and 256MiB (the MQTT maximum)",
        ));
    }
    if c.store.max_size.0 < (8 << 20) {
        p.push(problem("store.max_size", "at least 8MiB"));
    }
    if c.store.batch_max == 0 || c.store.batch_max > 65_536 {
        p.push(problem("store.batch_max", "between 1 and 65536"));
    }
    if c.store.batch_linger.0 > Duration::from_secs(2) {
        p.push(problem(
            "store.batch_linger",
            "at most 2s (a device message is acknowledged within about that long)",
        ));
    }
    if c.upstream.enabled {
        if let Err(e) = BrokerUrl::parse(&c.upstream.url) {
            p.push(problem("upstream.url", e));
        }
        let prefix = &c.upstream.topic_prefix;
        if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.ends_with('/') {
            p.push(problem(
                "upstream.topic_prefix",
                "must be non-empty, without wildcards or a trailing '/'",
            ));
        }
        check_client_id(
            &mut p,
            "upstream.client_id",
            c.upstream.client_id.as_deref(),
        );
        if c.upstream.max_inflight == 0 || c.upstream.max_inflight > 1000 {
            p.push(problem("upstream.max_inflight", "between 1 and 1000"));
        }
        if c.upstream.heartbeat.0 < Duration::from_secs(1) {
            p.push(problem("upstream.heartbeat", "at least 1s"));
        }
        check_backoff(
            &mut p,
            "upstream",
            c.upstream.reconnect_min,
            c.upstream.reconnect_max,
        );
        check_file(&mut p, "upstream.ca_file", c.upstream.ca_file.as_deref());
        check_file(
            &mut p,
            "upstream.client_cert",
            c.upstream.client_cert.as_deref(),
        );
        check_file(
            &mut p,
            "upstream.client_key",
            c.upstream.client_key.as_deref(),
        );
        if c.upstream.client_cert.is_some() && c.upstream.ca_file.is_none() {
            p.push(problem(
                "upstream.client_cert",
                "mutual TLS needs upstream.ca_file (the district CA) as well",
            ));
        }
        if c.upstream.client_cert.is_some() != c.upstream.client_key.is_some() {
            p.push(problem(
                "upstream.client_key",
                "client_cert and client_key go together",
            ));
        }
    }
    match c.status.listen.parse::<SocketAddr>() {
        Err(_) => p.push(problem(
            "status.listen",
            format!("{:?} is not ip:port", c.status.listen),
        )),
        Ok(addr) if c.status.enabled => {
            let creds = (
                c.status.username.is_some(),
                c.status.password_hash.is_some(),
            );
            if c.status
                .username
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                p.push(problem(
                    "status.username",
                    "must be non-empty and without ':' (HTTP Basic auth)",
                ));
            } else if !addr.ip().is_loopback() && creds != (true, true) {
                p.push(problem(
                    "status.username",
                    format!("status.listen {addr} is reachable from the LAN: set status.username and status.password_hash (`zhian-gateway hash-password` makes one)"),
                ));
            } else if creds.0 != creds.1 {
                p.push(problem(
                    "status.password_hash",
                    "status.username and status.password_hash go together",
                ));
            }
        }
        Ok(_) => {}
    }
    if let Some(h) = &c.status.password_hash {
        if argon2::PasswordHash::new(&h.0).is_err() {
            p.push(problem(
                "status.password_hash",
                "not a PHC password hash; make one with `zhian-gateway hash-password`",
            ));
        }
    }
    if c.status.max_connections == 0 || c.status.max_connections > 1024 {
        p.push(problem("status.max_connections", "between 1 and 1024"));
    }
    if c.status.refresh.0 < Duration::from_secs(5) {
        p.push(problem("status.refresh", "at least 5s"));
    }
    for (i, a) in c.alerts.actions.iter().enumerate() {
        if a.is_empty() || a.len() > 64 || !a.chars().all(is_action_char) {
            p.push(problem(
                format!("alerts.actions[{i}]"),
                format!("{a:?} must be 1-64 of [a-z0-9_]"),
            ));
        }
    }
    validate_modbus(&c.modbus, &mut p);
    p
}

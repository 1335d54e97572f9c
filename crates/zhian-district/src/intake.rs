//! The receiver's MQTT task: one persistent QoS 1 session with a shared subscription; each
//! message goes to the database task through a bounded channel and is acknowledged only when
//! that task reports it committed. The boxes' fleet topics that are not for the receiver
//! (`config/set`, `diag/request`, `diag/reply`: the subscription `{prefix}/+/#` matches them)
//! are acknowledged at once and kept nowhere.

use super::*;

pub(super) async fn mqtt_task(
    cfg: Arc<DistrictConfig>,
    tx: flume::Sender<Item>,
    current: tokio::sync::watch::Sender<Option<(u64, AsyncClient)>>,
    counters: Arc<Counters>,
    ops: Arc<Ops>,
    stop: CancellationToken,
) {
    let m = &cfg.mqtt;
    let mut backoff = Backoff::new(m.reconnect_min.0, m.reconnect_max.0);
    let filter = cfg.filter();
    let mut gen = 0u64;
    // When the link went down (WARN once per outage, INFO when it is back).
    let mut down_since: Option<Instant> = None;
    'connections: loop {
        let mut opts = match options(&settings(&cfg), "mqtt") {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "district receiver: MQTT cannot start");
                return;
            }
        };
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        gen += 1;
        current.send_replace(Some((gen, client.clone())));
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = client.disconnect().await;
                    // Let the disconnect (and the last acks) go out.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while eventloop.poll().await.is_ok() {}
                    }).await;
                    return;
                }
                p = eventloop.poll() => p,
            };
            match polled {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    backoff.reset();
                    tracing::debug!(url = %m.url, %filter, "district broker connected; subscribing");
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "cannot queue the subscription");
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(s))) => {
                    if s.return_codes.iter().any(|c| {
                        !matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    }) {
                        ops.set_broker_down(Some(format!(
                            "subscription {filter} not granted at QoS 1: {:?}",
                            s.return_codes
                        )));
                        tracing::error!(%filter, codes = ?s.return_codes, "the district broker did not grant the shared subscription at QoS 1 (ACL? shared subscriptions enabled?)");
                    } else {
                        ops.set_broker_down(None);
                        match down_since.take() {
                            Some(at) => {
                                tracing::info!(url = %m.url, %filter, down_ms = at.elapsed().as_millis() as u64, "district broker connected again")
                            }
                            None => {
                                tracing::info!(url = %m.url, %filter, "district broker connected")
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    counters.received.fetch_add(1, Relaxed);
                    ops.received(now_ms() / 1000);
                    let ack = (p.qos != QoS::AtMostOnce).then(|| {
                        let mut slim = rumqttc::Publish::new("", p.qos, Vec::new());
                        slim.pkid = p.pkid;
                        slim
                    });
                    if msg::not_for_the_receiver(&m.topic_prefix, &p.topic) {
                        counters.not_ours.fetch_add(1, Relaxed);
                        if let Some(a) = &ack {
                            let _ = client.try_ack(a);
                        }
                        continue;
                    }
                    let parsed = msg::parse(&m.topic_prefix, &p.topic, &p.payload);
                    let item = Item {
                        parsed: (p.topic.clone(), parsed),
                        gen,
                        ack,
                    };
                    if tx.send_async(item).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    ops.set_broker_down(Some(e.to_string()));
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(error = %e, url = %m.url, "district broker connection lost; reconnecting with backoff");
                    } else {
                        tracing::debug!(error = %e, url = %m.url, delay_ms = delay.as_millis() as u64, "district broker still unreachable");
                    }
                    current.send_replace(None);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue 'connections;
                }
            }
        }
    }
}

/// The topic kind of a message, for the metrics (its leaf, when it is one we know).
pub(super) fn topic_kind(topic: &str) -> &'static str {
    if topic.ends_with("/config/state") {
        return "config_state";
    }
    match topic.rsplit('/').next().unwrap_or("") {
        "summary" => "summary",
        "alert" => "alert",
        "care" => "care",
        "daily" => "daily",
        "status" => "status",
        "heartbeat" => "heartbeat",
        "occupancy" => "occupancy",
        _ => "other",
    }
}

pub(super) type Parsed = (String, Result<msg::Msg, msg::Reject>);

#[cfg(test)]
mod tests {
    #[test]
    fn topic_kinds_name_the_leaf() {
        for (t, k) in [
            ("zhian/district/gw-1/summary", "summary"),
            ("zhian/district/gw-1/heartbeat", "heartbeat"),
            ("zhian/district/gw-1/config/state", "config_state"),
            ("zhian/district/gw-1/occupancy", "occupancy"),
            ("zhian/district/gw-1/state", "other"),
            ("zhian/district/gw-1/nonsense", "other"),
        ] {
            assert_eq!(super::topic_kind(t), k, "{t}");
        }
    }
}

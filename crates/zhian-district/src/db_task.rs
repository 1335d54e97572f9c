//! The receiver's database task: batches, one transaction each, retries while the database's
//! state is at fault (one WARN per outage), rejects for values it cannot store, then the acks.

use super::*;

/// Tracks one database outage: WARN once when it starts (with the reason), INFO once when
/// writes succeed again, DEBUG for every retry in between; feeds `/healthz` and the metrics.
pub(super) struct Outage {
    pub(super) since: Option<(Instant, &'static str)>,
}

impl Outage {
    pub(super) fn failed(&mut self, ops: &Ops, fault: errors::Fault, detail: &str) {
        let kind = fault.kind();
        ops.db_error(kind);
        ops.set_db_down(Some(format!("{kind}: {detail}")));
        match self.since {
            None => {
                tracing::warn!(kind, error = %detail, "database does not take writes; nothing is acknowledged until it does (retrying with backoff)");
                self.since = Some((Instant::now(), kind));
            }
            Some(_) => tracing::debug!(kind, error = %detail, "database still refuses writes"),
        }
    }

    pub(super) fn recovered(&mut self, ops: &Ops) {
        if let Some((at, kind)) = self.since.take() {
            tracing::info!(
                kind,
                down_ms = at.elapsed().as_millis() as u64,
                "database takes writes again"
            );
        }
        ops.set_db_down(None);
    }
}

/// One batch on its way into the database: how far it got, and which messages the database
/// refused as values (indices into the batch).
pub(super) struct Progress {
    pub(super) done: usize,
    pub(super) applied: db::Applied,
    pub(super) refused: Vec<usize>,
}

/// Apply `parsed[p.done..]` in transactions of at most `*chunk` messages. A statement timeout
/// halves the chunk (a batch larger than the database lets one statement run would otherwise
/// time out for ever); a value the database refuses sends that chunk one message at a time.
/// Returns the first error that is the database's state; `p` keeps what committed.
pub(super) async fn commit(
    client: &mut tokio_postgres::Client,
    st: &db::Prepared,
    horizon: batch::Horizon,
    parsed: &[Parsed],
    p: &mut Progress,
    chunk: &mut usize,
    ops: &Ops,
) -> Result<(), tokio_postgres::Error> {
    let mut conflicts = 0;
    while p.done < parsed.len() {
        let end = (p.done + *chunk).min(parsed.len());
        let slice = &parsed[p.done..end];
        let attempt = async {
            let tx = client.transaction().await?;
            let a = db::apply(&tx, st, slice, horizon).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(a)
        }
        .await;
        match attempt {
            Ok(a) => {
                p.applied.add(a);
                p.done = end;
            }
            Err(e) => match errors::of(&e) {
                errors::Fault::Value if !client.is_closed() => {
                    ops.db_error("refused_value");
                    tracing::warn!(error = %pg_error(&e), batch = slice.len(), "database refused a value in the batch; applying its messages one at a time");
                    isolate(client, st, horizon, parsed, p, end).await?;
                }
                // Two receivers' transactions in a deadlock or a serialization failure: the
                // database chose this one to roll back; a retry is the cure, not an outage.
                errors::Fault::Database("conflict") if conflicts < 3 && !client.is_closed() => {
                    conflicts += 1;
                    ops.db_error("conflict");
                    tracing::debug!(error = %pg_error(&e), "transaction conflict; retrying it");
                }
                errors::Fault::Database("timeout") if *chunk > 1 && !client.is_closed() => {
                    ops.db_error("timeout");
                    *chunk = (*chunk / 2).max(1);
                    tracing::debug!(chunk = *chunk, error = %pg_error(&e), "statement timeout: smaller transactions");
                }
                _ => return Err(e),
            },
        }
    }
    Ok(())
}

pub(super) async fn db_task(
    cfg: Arc<DistrictConfig>,
    client: tokio_postgres::Client,
    rx: flume::Receiver<Item>,
    acks: tokio::sync::mpsc::UnboundedSender<(u64, rumqttc::Publish)>,
    counters: Arc<Counters>,
    ops: Arc<Ops>,
    mut outage: Outage,
) {
    let max = cfg.district.batch_max as usize;
    let linger = cfg.district.linger.0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut client = Some(client);
    // The prepared statements of the connection in `client` (prepared again after a reconnect).
    let mut stmts: Option<db::Prepared> = None;
    let mut months = partitions::Partitions::new();
    let mut chunk = max;
    let mut rollcall = Rollcall::new(&cfg);
    loop {
        // Between batches (and at least every `rollcall_every` when idle): the roll-call. It
        // reconnects an idle receiver whose connection was cut; a roll-call that fails is said
        // once (WARN) and when it works again (INFO), apart from the batches' outages, which
        // say whether the database takes the messages.
        if rollcall.due() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match connect(&cfg).await {
                    Ok(c) => {
                        client = Some(c);
                        stmts = None;
                        months.forget();
                    }
                    Err((fault, e)) => outage.failed(&ops, fault, &e),
                }
            }
            if let Some(c) = client.as_ref().filter(|c| !c.is_closed()) {
                match rollcall.run(c, &ops).await {
                    Ok(()) => {
                        if rollcall.failing.take().is_some() {
                            tracing::info!("receivers roll-call works again");
                        }
                        if outage.since.is_some() && ops.db_down().is_some() {
                            // Reconnected while idle: the database is back.
                            outage.recovered(&ops);
                        }
                    }
                    Err(e) => {
                        if rollcall.failing.is_none() {
                            tracing::warn!(error = %pg_error(&e), "receivers roll-call failed (the receivers table or the gateway_state view?); retried every rollcall_every");
                        }
                        rollcall.failing = Some(pg_error(&e));
                    }
                }
                // Months ahead and retention, at start and every `retention.every`. A failure
                // is retried at the next roll-call; batches create the months they need.
                if months.due(&cfg.retention) {
                    if let Err(e) = months.pass(c, &cfg.retention, now_ms()).await {
                        tracing::warn!(error = %pg_error(&e), "retention pass failed (creating months ahead, dropping old ones); retried at the next roll-call");
                    }
                }
            }
        }
        let first = match tokio::time::timeout(rollcall.until_due(), rx.recv_async()).await {
            Ok(Ok(i)) => i,
            Ok(Err(_)) => {
                if let Some(c) = client.as_ref() {
                    rollcall.stopped(c).await;
                }
                return; // the MQTT task stopped
            }
            Err(_) => continue, // time for the roll-call
        };
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while items.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                Ok(Ok(i)) => items.push(i),
                _ => break,
            }
        }
        let (parsed, items): (Vec<Parsed>, Vec<(u64, Option<rumqttc::Publish>)>) = items
            .into_iter()
            .map(|i| (i.parsed, (i.gen, i.ack)))
            .unzip();
        let started = Instant::now();
        ops.batch_writing(true);
        // Commit, retrying through the database's bad days; nothing is acked until it commits.
        let mut p = Progress {
            done: 0,
            applied: db::Applied::default(),
            refused: Vec::new(),
        };
        // The kept range the batch committed under (its `outside_retention` rejects).
        let mut committed_under;
        loop {
            let c = match client.as_mut().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match connect(&cfg).await {
                    Ok(c) => {
                        stmts = None;
                        months.forget();
                        client.insert(c)
                    }
                    Err((fault, e)) => {
                        outage.failed(&ops, fault, &e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            let horizon = cfg.retention.horizon(now_ms());
            committed_under = horizon;
            let attempt = async {
                if stmts.is_none() {
                    stmts = Some(db::Prepared::new(c).await?);
                }
                // The months this batch writes to exist before its transaction starts.
                let times = parsed.iter().filter_map(|(_, m)| match m {
                    Ok(msg::Msg::Summary { start_ms, .. }) => Some(*start_ms),
                    Ok(msg::Msg::Alert { ts_ms, .. }) => Some(*ts_ms),
                    _ => None,
                });
                // (Now: the rejects' month.)
                let times = times
                    .filter(|t| *t >= horizon.min_ms && *t < horizon.max_ms)
                    .chain([now_ms()]);
                months.ensure(c, times, horizon.min_ms).await?;
                let st = stmts.as_ref().expect("prepared above");
                commit(c, st, horizon, &parsed, &mut p, &mut chunk, &ops).await
            }
            .await;
            match attempt {
                Ok(()) => {
                    backoff.reset();
                    outage.recovered(&ops);
                    chunk = (chunk * 2).min(max);
                    break;
                }
                Err(e) => {
                    let fault = errors::of(&e);
                    outage.failed(&ops, fault, &pg_error(&e));
                    // A month this receiver thought existed is gone (dropped by hand, or by
                    // another receiver): ask the database again before the retry.
                    if fault == errors::Fault::Database("partition") {
                        months.forget();
                    }
                    // A read-only server (a primary demoted, a standby not yet promoted): the
                    // next attempt reconnects, so a multi-host `database_url` with
                    // `target_session_attrs=read-write` finds the new primary.
                    if fault == errors::Fault::Database("read_only") {
                        client = None;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        ops.batch_writing(false);
        ops.batch_took(started.elapsed().as_secs_f64());
        ops.batches.fetch_add(1, Relaxed);
        let applied = p.applied;
        for (i, (topic, r)) in parsed.iter().enumerate() {
            let kind = topic_kind(topic);
            match r {
                Err(r) => {
                    ops.message(kind, "rejected");
                    tracing::warn!(topic = %zhian_common::logfmt::Clean(topic), reason = r.reason, detail = %zhian_common::logfmt::Clean(&r.detail), "district receiver: message rejected");
                }
                Ok(_) if p.refused.contains(&i) => ops.message(kind, "rejected"),
                Ok(m) => match batch::outside(m, committed_under) {
                    Some(r) => {
                        ops.message(kind, "rejected");
                        tracing::warn!(topic = %zhian_common::logfmt::Clean(topic), reason = r.reason, detail = %zhian_common::logfmt::Clean(&r.detail), "district receiver: message rejected");
                    }
                    None => ops.message(kind, "kept"),
                },
            }
        }
        counters.kept.fetch_add(applied.kept, Relaxed);
        counters.rejected.fetch_add(applied.rejected, Relaxed);
        counters.batches.fetch_add(1, Relaxed);
        ops.done(items.len());
        // Acks in arrival order, handed to the acker: this task never waits on the MQTT
        // client (its request queue is drained by the MQTT task, which may itself be waiting
        // for this task to take messages: measured, that deadlocked after 6,500 messages).
        for i in items {
            if let (gen, Some(p)) = i {
                if acks.send((gen, p)).is_err() {
                    return;
                }
            }
        }
    }
}

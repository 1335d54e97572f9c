//! Modbus TCP/RTU input: one scheduler task per bus, polling counters and states.
//!
//! A bus is one serial port (every device naming the same `rtu.path` shares it, one request at
//! a time, in turn) or one TCP device (its own connection). A poll reads a unit's points in as
//! few requests as the protocol allows (contiguous points of a table merged, at most 125
//! registers or 2000 bits a request). Readings go to the committer, which turns counter
//! increases into counts and stores the last value in the same transaction.
//!
//! A unit that times out or answers with an exception is retried with backoff and marked
//! offline after `offline_after` failed polls in a row; the scheduler moves on to the next unit,
//! so a silent unit never stalls its bus. tokio-modbus has no timeout of its own, and a late
//! answer after a timeout would poison the next transaction, so after a timeout or transport
//! error the connection (or serial port) is dropped and reopened.

use crate::clock::now_ms;
use crate::committer::Intake;
use crate::config::{ModbusDevice, ModbusPoint, Parity, PointType, Role, Rtu, Table, WordOrder};
use crate::core::counter::{self, Value, Width};
use crate::core::engine::CounterReading;
use crate::stats::Stats;
use crate::store::StateUpdate;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_util::sync::CancellationToken;

/// Most registers in one read request (Modbus limit).
pub const MAX_REGISTERS: u16 = 125;
/// Most coils / discrete inputs in one read request (Modbus limit).
pub const MAX_BITS: u16 = 2000;
/// Longest pause between retries of a failing unit.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// One read request covering contiguous points of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReq {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's points, with their offset from `start`.
    pub points: Vec<(usize, u16)>,
}

/// Group a device's points into as few requests as the protocol allows: points of one table
/// whose addresses touch or overlap are read together, up to the per-request limit. Gaps are
/// never bridged (reading unmapped addresses makes many controllers answer with an exception).
pub fn plan(points: &[ModbusPoint]) -> Vec<ReadReq> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].table, points[i].address));
    let mut out: Vec<ReadReq> = Vec::new();
    for i in order {
        let p = &points[i];
        let (start, width) = (p.address as u16, p.ty.width());
        let limit = if p.table.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        };
        if let Some(last) = out.last_mut() {
            let end = u32::from(last.start) + u32::from(last.count);
            let new_end = (u32::from(start) + u32::from(width)).max(end);
            if last.table == p.table
                && u32::from(start) <= end
                && new_end - u32::from(last.start) <= u32::from(limit)
            {
                last.count = (new_end - u32::from(last.start)) as u16;
                last.points.push((i, start - last.start));
                continue;
            }
        }
        out.push(ReadReq {
            table: p.table,
            start,
            count: width,
            points: vec![(i, 0)],
        });
    }
    out
}

fn decoder(ty: PointType) -> counter::Kind {
    match ty {
        PointType::U16 => counter::Kind::U16,
        PointType::U32 => counter::Kind::U32,
        PointType::I32 => counter::Kind::I32,
        PointType::F32 => counter::Kind::F32,
        PointType::Bool => counter::Kind::Bool,
    }
}

fn width(ty: PointType) -> Width {
    match ty {
        PointType::U32 => Width::U32,
        PointType::I32 => Width::I32,
        _ => Width::U16,
    }
}

/// Why a poll failed.
#[derive(Debug)]
enum PollError {
    Timeout,
    Connect(String),
    Transport(String),
    Exception(tokio_modbus::ExceptionCode),
    Decode,
}

impl PollError {
    /// After these the connection may hold a late or partial answer: reopen it.
    fn poisons_connection(&self) -> bool {
        matches!(
            self,
            PollError::Timeout | PollError::Transport(_) | PollError::Connect(_)
        )
    }
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::Timeout => f.write_str("timeout"),
            PollError::Connect(e) => write!(f, "connect: {e}"),
            PollError::Transport(e) => write!(f, "transport: {e}"),
            PollError::Exception(c) => write!(f, "exception {c:?}"),
            PollError::Decode => f.write_str("short answer"),
        }
    }
}

/// A device on a bus, with its polling state.
struct Unit {
    dev: ModbusDevice,
    reqs: Vec<ReadReq>,
    next_due: Instant,
    fails: u32,
    /// Retry delays after failed polls.
    backoff: crate::backoff::Backoff,
    /// Values sent to the committer since start: only changes are sent again...
    sent: BTreeMap<usize, Value>,
    /// ...except that a counter that changed is sent again on the next polls even if it did not
    /// change again (as many as the glitch rule may hold: it settles held readings with later
    /// ones). Point index -> resends left.
    confirm: BTreeMap<usize, usize>,
}

/// What a bus talks over.
#[derive(Debug, Clone)]
enum Link {
    Tcp(String),
    Rtu(Rtu),
}

/// The buses for `devices`: one per serial path, one per TCP device.
fn buses(devices: &[ModbusDevice]) -> Vec<(Link, Vec<ModbusDevice>)> {
    let mut rtu: BTreeMap<std::path::PathBuf, (Rtu, Vec<ModbusDevice>)> = BTreeMap::new();
    let mut out = Vec::new();
    for d in devices {
        match (&d.tcp, &d.rtu) {
            (Some(addr), _) => out.push((Link::Tcp(addr.clone()), vec![d.clone()])),
            (None, Some(r)) => {
                let path = r.path.clone().unwrap_or_default();
                rtu.entry(path)
                    .or_insert_with(|| (r.clone(), Vec::new()))
                    .1
                    .push(d.clone());
            }
            (None, None) => {}
        }
    }
    out.extend(rtu.into_values().map(|(r, devs)| (Link::Rtu(r), devs)));
    out
}

pub struct Modbus {
    pub devices: Vec<ModbusDevice>,
    pub intake: flume::Sender<Intake>,
    pub stats: Arc<Stats>,
    pub stop: CancellationToken,
}

impl Modbus {
    /// Run every bus until `stop`.
    pub async fn run(self) {
        for d in &self.devices {
            self.stats.modbus_register(&d.name, d.kind);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (link, devs) in buses(&self.devices) {
            let bus = Bus {
                link,
                units: devs
                    .into_iter()
                    .map(|dev| Unit {
                        reqs: plan(&dev.points),
                        backoff: crate::backoff::Backoff::new(dev.poll.0, MAX_RETRY),
                        dev,
                        next_due: Instant::now(),
                        fails: 0,
                        sent: BTreeMap::new(),
                        confirm: Default::default(),
                    })
                    .collect(),
                ctx: None,
                intake: self.intake.clone(),
                stats: self.stats.clone(),
            };
            let stop = self.stop.clone();
            tasks.spawn(async move { bus.run(stop).await });
        }
        drop(self.intake);
        while tasks.join_next().await.is_some() {}
    }
}

struct Bus {
    link: Link,
    units: Vec<Unit>,
    ctx: Option<Context>,
    intake: flume::Sender<Intake>,
    stats: Arc<Stats>,
}

impl Bus {
    fn label(&self) -> String {
        match &self.link {
            Link::Tcp(a) => a.clone(),
            Link::Rtu(r) => r
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        tracing::info!(bus = %self.label(), units = self.units.len(), "modbus bus started");
        loop {
            // The unit due first, in turn: ties go to the one listed first.
            let Some(i) = (0..self.units.len()).min_by_key(|&i| self.units[i].next_due) else {
                return;
            };
            let due = self.units[i].next_due;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            let started = Instant::now();
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.poll(i) => r,
            };
            let unit = &mut self.units[i];
            let dev = &unit.dev;
            match result {
                Ok(values) => {
                    unit.fails = 0;
                    unit.backoff.reset();
                    unit.next_due = started + dev.poll.0;
                    // On the store's clock (across a wall-clock step, see StoreClock).
                    let now = now_ms()
                        + self
                            .stats
                            .clock_offset_ms
                            .load(std::sync::atomic::Ordering::Relaxed);
                    let mut counters = Vec::new();
                    let mut states = Vec::new();
                    // An untrusted gateway clock stamps nothing (contract: "Clocks"): the
                    // values are read again, and counted, once it is trusted.
                    let trusted = self
                        .stats
                        .clock_trusted
                        .load(std::sync::atomic::Ordering::Relaxed);
                    for (idx, v) in values.into_iter().filter(|_| trusted) {
                        let p = &dev.points[idx];
                        let unchanged = unit.sent.get(&idx) == Some(&v);
                        if unchanged {
                            match unit.confirm.get_mut(&idx) {
                                Some(left) if *left > 0 => *left -= 1,
                                _ => continue,
                            }
                        } else if p.role == Role::Counter {
                            unit.confirm.insert(idx, crate::core::counter::MAX_HELD);
                        }
                        match p.role {
                            Role::Counter => {
                                if let Some(value) = v.as_i64() {
                                    counters.push(CounterReading {
                                        kind: dev.kind,
                                        device: dev.name.clone(),
                                        point: p.name.clone(),
                                        action: p.action.clone().unwrap_or_default(),
                                        result: p.result.clone().unwrap_or_else(|| "ok".into()),
                                        value,
                                        width: width(p.ty),
                                        wrap: p.wrap,
                                        max_step: p.max_step,
                                        ts_ms: now,
                                    });
                                }
                            }
                            Role::State => states.push(StateUpdate {
                                key: format!("{}\0{}\0{}", dev.kind, dev.name, p.name),
                                value: v,
                                ts_ms: now,
                            }),
                        }
                        unit.sent.insert(idx, v);
                    }
                    let state_values: Vec<(String, Value)> = dev
                        .points
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.role == Role::State)
                        .filter_map(|(idx, p)| unit.sent.get(&idx).map(|v| (p.name.clone(), *v)))
                        .collect();
                    let came_back = self
                        .stats
                        .modbus()
                        .get(&dev.name)
                        .is_some_and(|h| !h.online);
                    self.stats.modbus_update(&dev.name, |h| {
                        h.polls += 1;
                        h.online = true;
                        h.fails_in_row = 0;
                        h.last_error = None;
                        h.last_seen_ms = Some(now);
                        h.states.extend(state_values);
                    });
                    if came_back {
                        tracing::info!(device = %dev.name, "modbus device online");
                    }
                    if !counters.is_empty() || !states.is_empty() {
                        let reading = Intake::Reading { counters, states };
                        if self.intake.send_async(reading).await.is_err() {
                            return; // committer gone: shutting down
                        }
                    }
                }
                Err(e) => {
                    unit.fails += 1;
                    // The one backoff every reconnect goes through: capped exponential from the
                    // poll interval, full jitter (units on many boxes do not retry in step).
                    unit.next_due = Instant::now() + unit.backoff.next_delay();
                    let offline = unit.fails >= dev.offline_after;
                    let msg = e.to_string();
                    let was_online = self.stats.modbus().get(&dev.name).is_some_and(|h| h.online);
                    self.stats.modbus_update(&dev.name, |h| {
                        h.errors += 1;
                        h.fails_in_row = unit.fails;
                        h.last_error = Some(msg.clone());
                        if offline {
                            h.online = false;
                        }
                    });
                    if offline && (was_online || unit.fails == dev.offline_after) {
                        tracing::warn!(device = %dev.name, unit = dev.unit, error = %msg, fails = unit.fails, "modbus device offline");
                    } else {
                        tracing::debug!(device = %dev.name, unit = dev.unit, error = %msg, "modbus poll failed");
                    }
                    if e.poisons_connection() {
                        self.ctx = None;
                    }
                }
            }
        }
    }

    /// Open the link if needed and select the unit.
    async fn context(&mut self, i: usize) -> Result<&mut Context, PollError> {
        let unit = self.units[i].dev.unit;
        let timeout = self.units[i].dev.timeout.0;
        if self.ctx.is_none() {
            let ctx = match &self.link {
                Link::Tcp(addr) => {
                    let connect = async {
                        let sock = tokio::net::lookup_host(addr.as_str())
                            .await
                            .map_err(|e| PollError::Connect(e.to_string()))?
                            .next()
                            .ok_or_else(|| PollError::Connect(format!("{addr}: no address")))?;
                        tokio_modbus::client::tcp::connect_slave(sock, Slave(unit))
                            .await
                            .map_err(|e| PollError::Connect(e.to_string()))
                    };
                    tokio::time::timeout(timeout.max(Duration::from_secs(1)), connect)
                        .await
                        .map_err(|_| PollError::Connect("timeout".into()))??
                }
                Link::Rtu(r) => {
                    let path = r.path.clone().unwrap_or_default();
                    let builder = tokio_serial::new(path.to_string_lossy(), r.baud)
                        .parity(match r.parity {
                            Parity::None => tokio_serial::Parity::None,
                            Parity::Even => tokio_serial::Parity::Even,
                            Parity::Odd => tokio_serial::Parity::Odd,
                        })
                        .data_bits(match r.data_bits {
                            5 => tokio_serial::DataBits::Five,
                            6 => tokio_serial::DataBits::Six,
                            7 => tokio_serial::DataBits::Seven,
                            _ => tokio_serial::DataBits::Eight,
                        })
                        .stop_bits(if r.stop_bits == 2 {
                            tokio_serial::StopBits::Two
                        } else {
                            tokio_serial::StopBits::One
                        });
                    // Opening a serial port can block (a USB adapter settling): not on a
                    // runtime worker, of which a small box has two.
                    let port = tokio::task::spawn_blocking(move || {
                        tokio_serial::SerialStream::open(&builder)
                    })
                    .await
                    .map_err(|e| PollError::Connect(format!("{}: {e}", path.display())))?
                    .map_err(|e| PollError::Connect(format!("{}: {e}", path.display())))?;
                    tokio_modbus::client::rtu::attach_slave(port, Slave(unit))
                }
            };
            self.ctx = Some(ctx);
        }
        let ctx = self.ctx.as_mut().expect("context just set");
        ctx.set_slave(Slave(unit));
        Ok(ctx)
    }

    /// Read every request of unit `i` and decode its points.
    async fn poll(&mut self, i: usize) -> Result<Vec<(usize, Value)>, PollError> {
        let timeout = self.units[i].dev.timeout.0;
        let reqs = self.units[i].reqs.clone();
        let mut out = Vec::new();
        for req in &reqs {
            let ctx = self.context(i).await?;
            let read = async {
                match req.table {
                    Table::Holding => ctx.read_holding_registers(req.start, req.count).await,
                    Table::Input => ctx.read_input_registers(req.start, req.count).await,
                    Table::Coil => ctx
                        .read_coils(req.start, req.count)
                        .await
                        .map(|r| r.map(|bits| bits.into_iter().map(u16::from).collect())),
                    Table::Discrete => ctx
                        .read_discrete_inputs(req.start, req.count)
                        .await
                        .map(|r| r.map(|bits| bits.into_iter().map(u16::from).collect())),
                }
            };
            let words = match tokio::time::timeout(timeout, read).await {
                Err(_) => return Err(PollError::Timeout),
                Ok(Err(e)) => return Err(PollError::Transport(e.to_string())),
                Ok(Ok(Err(code))) => return Err(PollError::Exception(code)),
                Ok(Ok(Ok(words))) => words,
            };
            let points = &self.units[i].dev.points;
            for &(idx, offset) in &req.points {
                let p = &points[idx];
                let from = usize::from(offset);
                let to = from + usize::from(p.ty.width());
                let slice = words.get(from..to).ok_or(PollError::Decode)?;
                let v = counter::decode(decoder(p.ty), slice, p.word_order == WordOrder::Big)
                    .ok_or(PollError::Decode)?;
                out.push((idx, v));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(name: &str, table: Table, address: u32, ty: PointType) -> ModbusPoint {
        ModbusPoint {
            name: name.into(),
            table,
            address,
            ty,
            word_order: WordOrder::Big,
            role: Role::State,
            action: None,
            result: None,
            wrap: false,
            max_step: 1000,
        }
    }

    #[test]
    fn plan_merges_contiguous_points_only() {
        let points = vec![
            pt("a", Table::Holding, 0, PointType::U16),
            pt("b", Table::Holding, 1, PointType::U32),
            pt("c", Table::Holding, 10, PointType::F32),
            pt("d", Table::Coil, 0, PointType::Bool),
            pt("e", Table::Coil, 1, PointType::Bool),
            pt("f", Table::Input, 3, PointType::U16),
        ];
        let reqs = plan(&points);
        let shape: Vec<_> = reqs
            .iter()
            .map(|r| (r.table, r.start, r.count, r.points.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Table::Holding, 0, 3, 2),
                (Table::Holding, 10, 2, 1),
                (Table::Input, 3, 1, 1),
                (Table::Coil, 0, 2, 2),
            ]
        );
    }

    #[test]
    fn plan_respects_the_register_limit() {
        let points: Vec<_> = (0..130)
            .map(|i| pt(&format!("p{i}"), Table::Holding, i, PointType::U16))
            .collect();
        let reqs = plan(&points);
        assert_eq!(
            reqs.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![125, 5]
        );
        assert_eq!(reqs[1].points[0], (125, 0));
    }
}

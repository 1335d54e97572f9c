//! The Modbus poller against in-process tokio-modbus TCP servers: word orders and f32
//! decoding, exception codes, timeouts, offline marking and recovery.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use zhian_gateway::committer::Intake;
use zhian_gateway::config::{ModbusDevice, ModbusPoint, PointType, Role, Table, WordOrder};
use zhian_gateway::core::counter::Value;
use zhian_gateway::core::event::Kind;
use zhian_gateway::modbus::Modbus;
use zhian_gateway::stats::Stats;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Normal,
    Exception(ExceptionCode),
    /// Never answers in time.
    Silent,
}

#[derive(Clone, Default)]
struct Device {
    regs: Arc<Mutex<HashMap<u16, u16>>>,
    coils: Arc<Mutex<HashMap<u16, bool>>>,
    mode: Arc<Mutex<Option<Mode>>>,
    calls: Arc<Mutex<u64>>,
}

impl Device {
    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = Some(m);
    }
    fn set_regs(&self, start: u16, words: &[u16]) {
        let mut r = self.regs.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            r.insert(start + i as u16, *w);
        }
    }
}

impl tokio_modbus::server::Service for Device {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        *self.calls.lock().unwrap() += 1;
        let mode = self.mode.lock().unwrap().unwrap_or(Mode::Normal);
        let regs = self.regs.lock().unwrap().clone();
        let coils = self.coils.lock().unwrap().clone();
        Box::pin(async move {
            match mode {
                Mode::Silent => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Err(ExceptionCode::ServerDeviceFailure)
                }
                Mode::Exception(c) => Err(c),
                Mode::Normal => match req {
                    Request::ReadHoldingRegisters(a, n) => Ok(Response::ReadHoldingRegisters(
                        (a..a + n)
                            .map(|i| regs.get(&i).copied().unwrap_or(0))
                            .collect(),
                    )),
                    Request::ReadCoils(a, n) => Ok(Response::ReadCoils(
                        (a..a + n)
                            .map(|i| coils.get(&i).copied().unwrap_or(false))
                            .collect(),
                    )),
                    _ => Err(ExceptionCode::IllegalFunction),
                },
            }
        })
    }
}

async fn serve(dev: Device) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = move |stream, _addr| {
            let dev = dev.clone();
            async move { Ok(Some((dev, stream))) }
        };
        let _ = server.serve(&on_connected, |_e| {}).await;
    });
    addr.to_string()
}

fn point(
    name: &str,
    table: Table,
    address: u32,
    ty: PointType,
    order: WordOrder,
    counter: bool,
) -> ModbusPoint {
    ModbusPoint {
        name: name.into(),
        table,
        address,
        ty,
        word_order: order,
        role: if counter { Role::Counter } else { Role::State },
        action: counter.then(|| "entry".to_string()),
        result: None,
        wrap: false,
        max_step: 1000,
    }
}

fn device(name: &str, addr: &str, points: Vec<ModbusPoint>) -> ModbusDevice {
    let toml = format!("name = \"{name}\"\nkind = \"vehicle\"\ntcp = \"{addr}\"\npoll = \"100ms\"\ntimeout = \"200ms\"\noffline_after = 2\n");
    let mut d: ModbusDevice = toml::from_str(&toml).unwrap();
    d.points = points;
    d
}

struct Running {
    rx: flume::Receiver<Intake>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(devices: Vec<ModbusDevice>) -> Running {
    let (tx, rx) = flume::bounded(64);
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Modbus {
            devices,
            intake: tx,
            stats: stats.clone(),
            stop: stop.clone(),
        }
        .run(),
    );
    Running {
        rx,
        stats,
        stop,
        task,
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_word_orders_and_f32() {
    let dev = Device::default();
    // u32 little word order at 0-1, i32 big at 2-3, f32 big at 4-5, coil 0.
    dev.set_regs(0, &[0x0002, 0x0001]);
    dev.set_regs(2, &[0xFFFF, 0xFFFE]);
    let f = 21.5f32.to_bits();
    dev.set_regs(4, &[(f >> 16) as u16, f as u16]);
    dev.coils.lock().unwrap().insert(0, true);
    let addr = serve(dev.clone()).await;
    let r = start(vec![device(
        "gate-1",
        &addr,
        vec![
            point(
                "in_count",
                Table::Holding,
                0,
                PointType::U32,
                WordOrder::Little,
                true,
            ),
            point(
                "signed",
                Table::Holding,
                2,
                PointType::I32,
                WordOrder::Big,
                true,
            ),
            point(
                "temp_c",
                Table::Holding,
                4,
                PointType::F32,
                WordOrder::Big,
                false,
            ),
            point(
                "barrier_open",
                Table::Coil,
                0,
                PointType::Bool,
                WordOrder::Big,
                false,
            ),
        ],
    )]);
    let first = tokio::time::timeout(Duration::from_secs(5), r.rx.recv_async())
        .await
        .unwrap()
        .unwrap();
    let Intake::Reading { counters, states } = first else {
        panic!("expected a reading")
    };
    let values: HashMap<_, _> = counters
        .iter()
        .map(|c| (c.point.as_str(), c.value))
        .collect();
    assert_eq!(values["in_count"], 0x0001_0002);
    assert_eq!(values["signed"], -2);
    assert!(counters.iter().all(|c| c.kind == Kind::Vehicle
        && c.device == "gate-1"
        && c.action == "entry"
        && c.result == "ok"));
    let st: HashMap<_, _> = states
        .iter()
        .map(|s| (s.key.rsplit('\0').next().unwrap().to_string(), s.value))
        .collect();
    assert_eq!(st["temp_c"], Value::Float(21.5));
    assert_eq!(st["barrier_open"], Value::Bool(true));
    // The two holding ranges 0-5 are contiguous: one request for registers, one for coils.
    let calls_before = *dev.calls.lock().unwrap();
    wait_for("two more polls", || {
        r.stats.modbus().get("gate-1").is_some_and(|h| h.polls >= 3)
    })
    .await;
    let per_poll = (*dev.calls.lock().unwrap() - calls_before) as f64 / 2.0;
    assert!(per_poll <= 2.5, "{per_poll} requests per poll");
    // A counter that changed is sent again on the next MAX_HELD polls (the glitch rule settles
    // held readings with later ones); after that, unchanged values are not sent again.
    wait_for("the confirming polls", || {
        r.stats
            .modbus()
            .get("gate-1")
            .is_some_and(|h| h.polls as usize >= 2 + zhian_gateway::core::counter::MAX_HELD)
    })
    .await;
    for _ in 0..zhian_gateway::core::counter::MAX_HELD {
        let Ok(Intake::Reading {
            counters: again,
            states: none,
        }) = r.rx.try_recv()
        else {
            panic!("expected a confirming reading")
        };
        assert!(none.is_empty());
        assert_eq!(again.len(), counters.len());
        assert!(again.iter().all(|c| values[c.point.as_str()] == c.value));
    }
    assert!(r.rx.try_recv().is_err());
    dev.set_regs(0, &[0x0005, 0x0001]);
    let next = tokio::time::timeout(Duration::from_secs(5), r.rx.recv_async())
        .await
        .unwrap()
        .unwrap();
    let Intake::Reading { counters, states } = next else {
        panic!("expected a reading")
    };
    assert_eq!(counters.len(), 1);
    assert_eq!(counters[0].value, 0x0001_0005);
    assert!(states.is_empty());
    r.stop.cancel();
    r.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_and_timeouts_go_offline_and_recover() {
    let good = Device::default();
    good.set_regs(0, &[7]);
    let bad = Device::default();
    bad.set_regs(0, &[9]);
    bad.set_mode(Mode::Exception(ExceptionCode::IllegalDataAddress));
    let (good_addr, bad_addr) = (serve(good.clone()).await, serve(bad.clone()).await);
    let pts = || {
        vec![point(
            "in_count",
            Table::Holding,
            0,
            PointType::U16,
            WordOrder::Big,
            true,
        )]
    };
    let r = start(vec![
        device("good", &good_addr, pts()),
        device("bad", &bad_addr, pts()),
    ]);
    wait_for("bad offline after exceptions", || {
        r.stats
            .modbus()
            .get("bad")
            .is_some_and(|h| !h.online && h.errors >= 2)
    })
    .await;
    let m = r.stats.modbus();
    assert!(
        m["bad"]
            .last_error
            .as_deref()
            .unwrap()
            .contains("IllegalDataAddress"),
        "{:?}",
        m["bad"].last_error
    );
    assert!(m["good"].online);
    // A busy device is "try later", then fine.
    bad.set_mode(Mode::Exception(ExceptionCode::ServerDeviceBusy));
    let errors = r.stats.modbus()["bad"].errors;
    wait_for("a busy answer", || r.stats.modbus()["bad"].errors > errors).await;
    assert!(r.stats.modbus()["bad"]
        .last_error
        .as_deref()
        .unwrap()
        .contains("ServerDeviceBusy"));
    // Silence: the poll times out (and the connection is reopened).
    bad.set_mode(Mode::Silent);
    let errors = r.stats.modbus()["bad"].errors;
    wait_for("a timeout", || r.stats.modbus()["bad"].errors > errors).await;
    assert_eq!(
        r.stats.modbus()["bad"].last_error.as_deref(),
        Some("timeout")
    );
    // Recovery.
    bad.set_mode(Mode::Normal);
    wait_for("bad online again", || r.stats.modbus()["bad"].online).await;
    // The good device kept its turn all along (waited for, not timed: the bad one's phases can
    // pass in under a second on a fast machine).
    wait_for("the good device kept polling", || {
        r.stats.modbus()["good"].polls >= 10
    })
    .await;
    // Both devices' baselines arrived.
    let mut seen = std::collections::BTreeSet::new();
    while let Ok(Intake::Reading { counters, .. }) = r.rx.try_recv() {
        seen.extend(counters.into_iter().map(|c| (c.device, c.value)));
    }
    assert!(
        seen.contains(&("good".to_string(), 7)) && seen.contains(&("bad".to_string(), 9)),
        "{seen:?}"
    );
    r.stop.cancel();
    r.task.await.unwrap();
}

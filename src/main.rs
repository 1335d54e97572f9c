//! Command line of zhian-gateway: thin; the daemon is [`zhian_gateway::run`].

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use zhian_gateway::store::{StoreError, FILE_NAME};

/// sysexits.h EX_IOERR: a damaged store with `store.on_damage = "refuse"`.
const EX_IOERR: u8 = 74;
use zhian_gateway::config::{self, EX_CONFIG};

#[derive(Parser)]
#[command(name = "zhian-gateway", version = zhian_gateway::VERSION, about = "Smart-compound edge gateway: durable, deduplicated counts for the district platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (logs to stderr).
    Run {
        /// Config file.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate the config and what the daemon needs at start (data dir, files the config
    /// names, as the user running this), then print the effective config with secrets redacted.
    CheckConfig {
        /// Config file.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Print nothing when the config is valid (systemd's ExecStartPre=).
        #[arg(long, short)]
        quiet: bool,
    },
    /// A self-contained site: embedded broker, simulated devices, status page on 127.0.0.1:8080.
    Demo {
        /// Where the demo keeps its store (default: gateway.data_dir of config/demo.toml).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Read a password on stdin and print its hash for `status.password_hash`.
    HashPassword,
    /// The district receiver: summaries, alerts, care notices, daily counts, status and
    /// heartbeats from the district broker into PostgreSQL (feature `district`).
    District {
        /// Receiver config (`[district]` and `[mqtt]`).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Only create this receiver's persistent session with the shared subscription on the
        /// district broker, then exit: run it before the first gateway publishes (messages
        /// sent before any receiver subscribed are kept by no session).
        #[arg(long)]
        init: bool,
    },
    /// Read a resident's card or face id on stdin and print its care pseudonym, for
    /// `[[care.residents]] pseudonym = "..."` (so the config need not hold the id). Uses (and
    /// on first use makes) the care key in `privacy.key_dir`: run it as the service user.
    CarePseudonym {
        /// Config file.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Show the canonical event (or the reject) a device message would give, through the
    /// config's `[[mqtt.sources]]` or the canonical payload rules: try a vendor's sample payload
    /// before wiring the device. Exit 0 mapped, 65 rejected, 78 bad config.
    Map {
        /// Config file.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The topic the device publishes on.
        #[arg(long)]
        topic: String,
        /// A file holding the payload (`-`: stdin).
        #[arg(long, value_name = "FILE")]
        payload: PathBuf,
        /// Print the subject as mapped (default: masked, it is personal data).
        #[arg(long)]
        show_subject: bool,
    },
    /// The running daemon's device table: list the devices it tracks, or forget devices by
    /// name or glob (a forgotten device's counted events stay; it comes back with its next
    /// event). Exit 0 done, 1 nothing matched, 75 queued (no daemon answered within 10 s).
    Devices {
        #[command(subcommand)]
        op: DevicesOp,
    },
    /// Fleet configuration (contract: "Fleet configuration"): the fleet key, signed changes to
    /// boxes (canaries first), and a box's diagnostics. `push` and `diag` run at the district
    /// and read only `[mqtt]` of district.toml.
    Fleet {
        #[command(subcommand)]
        op: FleetOp,
    },
    /// Vehicles inside (实有车辆): record a stocktake (盘点) in the running daemon.
    Occupancy {
        #[command(subcommand)]
        op: OccupancyOp,
    },
    /// Offline read of the store (stop the daemon first): pending summaries, open windows,
    /// device states, dedup keys held, disk use.
    Inspect {
        /// The daemon's data dir (gateway.data_dir).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "file",
            conflicts_with = "file"
        )]
        data_dir: Option<PathBuf>,
        /// Read this store file instead (e.g. a quarantined `zhian.redb.damaged-*`).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Load and validate the config, and with `start_needs` also check what the daemon needs at
/// start (`check-config`); on problems print one line each and return exit 78.
fn load(path: Option<PathBuf>, start_needs: bool) -> Result<config::Config, ExitCode> {
    let explicit = path.is_some();
    let path = path.unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    config::load(&path, explicit)
        .and_then(|cfg| {
            let problems = if start_needs {
                zhian_gateway::preflight::check_start_needs(&cfg)
            } else {
                Vec::new()
            };
            if problems.is_empty() {
                Ok(cfg)
            } else {
                Err(problems)
            }
        })
        .map_err(|problems| {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!(
                "{}: {} problem(s); nothing started",
                path.display(),
                problems.len()
            );
            ExitCode::from(EX_CONFIG as u8)
        })
}

/// The receiver's default config path.
#[cfg(feature = "district")]
const DEFAULT_DISTRICT_CONFIG: &str = "/etc/zhian-gateway/district.toml";

#[cfg(feature = "district")]
fn is_district(path: &std::path::Path) -> bool {
    zhian_gateway::district::config::is_district_config(path)
}

#[cfg(not(feature = "district"))]
fn is_district(_: &std::path::Path) -> bool {
    false
}

#[cfg(feature = "district")]
fn load_district(
    path: &std::path::Path,
) -> Result<zhian_gateway::district::config::DistrictConfig, ExitCode> {
    zhian_gateway::district::config::load(path).map_err(|problems| {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!(
            "{}: {} problem(s); nothing started",
            path.display(),
            problems.len()
        );
        ExitCode::from(EX_CONFIG as u8)
    })
}

#[cfg(feature = "district")]
fn check_district(path: &std::path::Path, quiet: bool) -> ExitCode {
    match load_district(path) {
        Ok(cfg) => {
            if !quiet {
                print!("{}", cfg.to_redacted_toml());
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

#[cfg(not(feature = "district"))]
fn check_district(_: &std::path::Path, _: bool) -> ExitCode {
    ExitCode::FAILURE
}

#[cfg(feature = "district")]
fn district(config: Option<PathBuf>, init: bool) -> ExitCode {
    let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_DISTRICT_CONFIG));
    let cfg = match load_district(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if init {
        let rt = match runtime() {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        return match rt.block_on(zhian_gateway::district::init_subscription(&cfg)) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("district --init: {}", zhian_gateway::logfmt::redact_url(&e));
                ExitCode::FAILURE
            }
        };
    }
    serve(move |shutdown| async move {
        zhian_gateway::district::run(cfg, shutdown)
            .await
            .map(|()| zhian_gateway::Stopped::Shutdown)
            .map_err(zhian_gateway::RunError::Broker)
    })
}

#[cfg(not(feature = "district"))]
fn district(_: Option<PathBuf>, _: bool) -> ExitCode {
    eprintln!("this build has no district receiver (cargo feature `district`; the gateway box build leaves it out)");
    ExitCode::from(EX_CONFIG as u8)
}

/// `map`: one sample message through the config's sources (or the canonical rules).
fn map_sample(
    cfg: &config::Config,
    topic: &str,
    payload: &std::path::Path,
    show: bool,
) -> ExitCode {
    use zhian_gateway::core::mapping;
    let bytes = if payload == std::path::Path::new("-") {
        let mut b = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut b) {
            eprintln!("map: cannot read stdin: {e}");
            return ExitCode::FAILURE;
        }
        b
    } else {
        match std::fs::read(payload) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("map: cannot read {}: {e}", payload.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let sources = cfg.sources();
    let source = mapping::source_for(&sources, topic);
    let results: Vec<Result<_, (_, Option<String>)>> = match source {
        Some(s) => mapping::map_all(s, topic, &bytes, cfg.site_offset_s())
            .into_iter()
            .map(|m| m.map_err(|(r, u)| (r, u.map(|u| u.to_string()))))
            .collect(),
        None => vec![zhian_gateway::core::event::parse(topic, &bytes).map_err(|r| (r, None))],
    };
    let via = source.map_or("canonical".to_string(), |s| format!("source {:?}", s.name));
    type Outcome = Result<
        zhian_gateway::core::event::Event,
        (zhian_gateway::core::event::Reject, Option<String>),
    >;
    let one = |result: &Outcome| match result {
        Ok(e) => {
            let subject = e
                .subject
                .as_deref()
                .map(|s| if show { s.to_string() } else { mask(s) });
            serde_json::json!({
                "event": {
                    "kind": e.kind.as_str(),
                    "device": e.device,
                    "id": e.id,
                    "ts": zhian_gateway::core::summary::rfc3339_utc(e.ts_ms),
                    "action": e.action,
                    "result": e.result,
                    "subject": subject,
                },
                "topic": format!("zhian/{}/{}", e.kind.as_str(), e.device),
            })
        }
        Err((reason, detail)) => serde_json::json!({
            "rejected": reason.as_str(),
            "rule": detail,
        }),
    };
    let all_ok = results.iter().all(|r| r.is_ok());
    let mut out = if source.is_some_and(|s| s.each.is_some()) {
        // A batch: one entry per element.
        serde_json::json!({"events": results.iter().map(one).collect::<Vec<_>>()})
    } else {
        one(&results[0])
    };
    out["mapped_by"] = serde_json::Value::String(via);
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(65)
    }
}

/// A subject with its middle masked (`浙A12345` → `浙***5`), so a sample run shows the
/// mapping found it without printing the whole identity.
fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..1].iter().collect();
    let tail: String = chars[chars.len() - 1..].iter().collect();
    format!("{head}***{tail}")
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per core), each
/// holding freed memory of its own: two arenas keep the daemon's RSS near what it uses
/// (BENCHMARKS.md, memory). Other C libraries: nothing to do.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // A fixed mmap threshold: blocks of 1 MiB and more (argon2's 19 MiB for a status-page
        // login, large payloads) are mapped and unmapped on free. glibc's default threshold
        // rises after the first such free, and then each one stays in an arena for good
        // (measured: 125 MiB after 20 wrong passwords; issue 12).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Command::CarePseudonym { config } => match load(config, false) {
            Ok(cfg) => {
                use std::io::BufRead;
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line).is_err() {
                    eprintln!("care-pseudonym: cannot read the subject from stdin");
                    return ExitCode::FAILURE;
                }
                let subject = line.trim();
                if subject.is_empty() {
                    eprintln!(
                        "care-pseudonym: give the card or face id on stdin, as devices send it"
                    );
                    return ExitCode::FAILURE;
                }
                let dir = cfg.privacy.key_dir(&cfg.gateway.data_dir);
                let rotate = match cfg.privacy.rotate {
                    config::KeyRotation::Daily => zhian_gateway::keys::Rotate::Daily,
                    config::KeyRotation::Never => zhian_gateway::keys::Rotate::Never,
                };
                // Only the care key is used; nothing past its life is touched (now = 0).
                match zhian_gateway::keys::SubjectKeys::open(
                    &dir,
                    rotate,
                    0,
                    u64::MAX / 4,
                    u64::MAX / 4,
                    0,
                ) {
                    Ok(mut keys) => match keys.care_pseudonym(subject) {
                        Some(p) => {
                            println!(
                                "{}",
                                p.iter().map(|b| format!("{b:02x}")).collect::<String>()
                            );
                            ExitCode::SUCCESS
                        }
                        None => {
                            eprintln!(
                                "care-pseudonym: cannot make the care key in {}",
                                dir.display()
                            );
                            ExitCode::FAILURE
                        }
                    },
                    Err(e) => {
                        eprintln!("care-pseudonym: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(code) => code,
        },
        Command::Map {
            config,
            topic,
            payload,
            show_subject,
        } => match load(config, false) {
            Ok(cfg) => map_sample(&cfg, &topic, &payload, show_subject),
            Err(code) => code,
        },
        Command::District { config, init } => district(config, init),
        Command::CheckConfig {
            config: Some(path),
            quiet,
        } if is_district(&path) => check_district(&path, quiet),
        Command::CheckConfig { config, quiet } => match load_effective(config, true) {
            Ok((eff, _)) => {
                if !quiet {
                    let cfg = &eff.cfg;
                    for n in config::env_notes(std::env::vars())
                        .into_iter()
                        .chain(config::example_notes(cfg))
                        .chain(eff.problem.clone())
                    {
                        eprintln!("note: {n}");
                    }
                    if let Some(o) = &eff.overlay {
                        let line = format!(
                            "fleet serial {} ({}) overlays the file: {}",
                            o.serial,
                            if o.trial { "on probation" } else { "applied" },
                            if o.keys.is_empty() {
                                "(no keys: every key from the file)".to_string()
                            } else {
                                o.keys.join(", ")
                            }
                        );
                        eprintln!("note: {line}");
                        println!("# {line}");
                        println!("# (data_dir/fleet.json; keys not listed come from the file, the environment or the defaults)");
                    }
                    print!("{}", cfg.to_redacted_toml());
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Inspect {
            data_dir,
            file,
            json,
        } => match zhian_gateway::inspect::report(
            &file.unwrap_or_else(|| data_dir.unwrap_or_default().join(FILE_NAME)),
        ) {
            Ok(r) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r).expect("report serializes")
                    );
                } else {
                    print!("{}", r.to_text());
                }
                ExitCode::SUCCESS
            }
            Err(StoreError::Damaged { path, reason }) => {
                // redb cannot open it at all: say what is wrong with it, nothing more to read.
                eprintln!("inspect: {} cannot be read: {reason}", path.display());
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("inspect: {e}");
                if matches!(e, StoreError::AlreadyOpen(_)) {
                    eprintln!("inspect: the store is in use: stop the daemon first (systemctl stop zhian-gateway), or use the status page");
                }
                ExitCode::FAILURE
            }
        },
        Command::Demo { data_dir } => demo(data_dir),
        Command::Devices { op } => devices(op),
        Command::Fleet { op } => fleet(op),
        Command::Occupancy {
            op: OccupancyOp::Set { config, count },
        } => match load(config, false) {
            Ok(cfg) => ExitCode::from(zhian_gateway::devices::cli(
                &cfg.gateway.data_dir,
                zhian_gateway::devices::Request {
                    op: zhian_gateway::devices::Op::Stocktake,
                    patterns: Vec::new(),
                    count: Some(count),
                },
                false,
            )),
            Err(code) => code,
        },
        Command::HashPassword => {
            use std::io::{BufRead, IsTerminal};
            if std::io::stdin().is_terminal() {
                eprint!("password for the status page: ");
            }
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).is_err() {
                eprintln!("cannot read the password from stdin");
                return ExitCode::FAILURE;
            }
            let password = line.trim_end_matches(['\r', '\n']);
            match zhian_gateway::status::hash_password(password) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot hash: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let (eff, origin) = match load_effective(config, false) {
                Ok(e) => e,
                Err(code) => return code,
            };
            serve(move |shutdown| {
                for n in config::env_notes(std::env::vars()) {
                    tracing::warn!("{n}");
                }
                // A change on trial counts this start; past its limit it is rolled back and the
                // config read again without it.
                let eff = match zhian_gateway::fleet::count_start(&origin) {
                    true => zhian_gateway::fleet::load_effective(&origin).unwrap_or(eff),
                    false => eff,
                };
                let reloads = reload_on_sighup(origin.clone());
                zhian_gateway::run_daemon(eff, Some(origin), shutdown, reloads)
            })
        }
    }
}

/// The daemon's config with the fleet overlay `fleet.json` records, and where it came from;
/// with `start_needs` also what a start needs (`check-config`). Problems: one line each, 78.
fn load_effective(
    path: Option<PathBuf>,
    start_needs: bool,
) -> Result<
    (
        zhian_gateway::fleet::Effective,
        zhian_gateway::fleet::Origin,
    ),
    ExitCode,
> {
    let origin = zhian_gateway::fleet::Origin {
        explicit: path.is_some(),
        path: path.unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH)),
    };
    zhian_gateway::fleet::load_effective(&origin)
        .and_then(|eff| {
            let problems = if start_needs {
                zhian_gateway::preflight::check_start_needs(&eff.cfg)
            } else {
                Vec::new()
            };
            if problems.is_empty() {
                Ok(eff)
            } else {
                Err(problems)
            }
        })
        .map(|eff| (eff, origin.clone()))
        .map_err(|problems| {
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!(
                "{}: {} problem(s); nothing started",
                origin.path.display(),
                problems.len()
            );
            ExitCode::from(EX_CONFIG as u8)
        })
}

/// sysexits.h EX_TEMPFAIL: a restart in place failed; systemd (`Restart=on-failure`) starts
/// the daemon again.
const EX_TEMPFAIL: u8 = 75;

/// Start the binary again in this process (same pid, arguments and environment), for a fleet
/// change that needs a restart. Returns only if the exec failed.
fn restart_in_place() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    tracing::info!("restarting in place for the fleet configuration");
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec();
    tracing::error!(error = %err, "cannot restart in place; exiting for systemd to restart the service");
    ExitCode::from(EX_TEMPFAIL)
}

/// Run the daemon (or the demo) on a small runtime and turn its result into an exit code.
fn serve<F>(make: impl FnOnce(Shutdown) -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<zhian_gateway::Stopped, zhian_gateway::RunError>>,
{
    init_logging();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Register the signal handlers before anything starts: a SIGTERM during start-up then
    // still means a clean stop, not the default kill.
    let shutdown = {
        let _enter = rt.enter();
        shutdown_signal()
    };
    // Built inside the runtime, so what it registers (the SIGHUP handler) exists before start-up.
    let fut = {
        let _enter = rt.enter();
        make(shutdown)
    };
    let result = rt.block_on(fut);
    // Do not wait for a blocking thread stuck on a dead disk: the 5 s budget is spent.
    rt.shutdown_timeout(std::time::Duration::from_millis(300));
    match result {
        Ok(zhian_gateway::Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(zhian_gateway::Stopped::Restart) => restart_in_place(),
        Err(e @ zhian_gateway::RunError::Store(StoreError::Damaged { .. })) => {
            tracing::error!("{e}");
            ExitCode::from(EX_IOERR)
        }
        Err(e) => {
            tracing::error!(error = %e, "zhian-gateway failed");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum OccupancyOp {
    /// Record that N vehicles are inside now (counted on site): from now on, vehicles inside
    /// = N plus the entries less the exits after it. Exit 0 recorded, 1 refused, 75 queued.
    Set {
        /// Config file (for gateway.data_dir).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// The vehicles counted inside (0 to 1000000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(..=zhian_gateway::core::occupancy::MAX_COUNT), allow_negative_numbers = true)]
        count: u64,
    },
}

#[derive(Subcommand)]
enum FleetOp {
    /// Make the fleet key pair: DIR/fleet.key (private, 0600: keep it at the district, offline
    /// if you can) and DIR/fleet.pub (install it on each box, `[fleet] trust`). Never
    /// overwrites a key.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a config fragment and publish it to gateways (retained), canaries first: the rest
    /// get it only once every canary reports `applied`; a `rejected` or `rolled_back` stops the
    /// rollout. Prints one line per gateway. Exit 0 all applied, 1 stopped or failed, 2 reports
    /// missing at the timeout, 78 bad input.
    #[command(group(clap::ArgGroup::new("to").required(true).args(["gateway", "layer", "all"])))]
    Push {
        /// The receiver's district.toml (only `[mqtt]` is read).
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        /// The private key (default: fleet.key beside --config).
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// The TOML fragment: the whole district overlay for these boxes.
        #[arg(long, value_name = "FILE")]
        fragment: PathBuf,
        /// Gateway ids.
        #[arg(long, value_name = "ID", num_args = 1..)]
        gateway: Vec<String>,
        /// Every gateway whose retained status has this label: district=, street=,
        /// community= or compound= (e.g. community=江滨社区).
        #[arg(long, value_name = "LAYER=LABEL")]
        layer: Option<String>,
        /// Every gateway with a retained status on the broker.
        #[arg(long)]
        all: bool,
        /// Send to the first N (by id) first; the rest once all N report `applied`.
        #[arg(long, value_name = "N", default_value_t = 0)]
        canary: usize,
        /// The change's serial (default: above every serial the gateways saw, at least the Unix
        /// time in seconds).
        #[arg(long, value_name = "N")]
        serial: Option<u64>,
        /// How long to wait for reports (canaries, then the rest).
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Do not wait for the reports of the gateways after the canaries.
        #[arg(long)]
        no_wait: bool,
    },
    /// Ask a box for its status report and its last 200 log lines (a request signed with the
    /// fleet key; no subject or secret is in the answer). Prints the reply as JSON.
    Diag {
        /// The receiver's district.toml (only `[mqtt]` is read).
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        #[arg(long, value_name = "ID")]
        gateway: String,
        /// The private key (default: fleet.key beside --config).
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// `--key`, or fleet.key beside the district config.
#[cfg(feature = "district")]
fn key_beside(key: Option<PathBuf>, config: &std::path::Path) -> PathBuf {
    key.unwrap_or_else(|| {
        config
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(zhian_common::fleet_key::PRIVATE_FILE)
    })
}

fn fleet(op: FleetOp) -> ExitCode {
    match op {
        FleetOp::Keygen { out } => match zhian_common::fleet_key::keygen(&out) {
            Ok((k, p)) => {
                println!(
                    "private key: {} (0600; keep it at the district)",
                    k.display()
                );
                println!("public key:  {} (install on each box; [fleet] trust = \"/etc/zhian-gateway/fleet.pub\")", p.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleet keygen: {e}");
                ExitCode::FAILURE
            }
        },
        op => fleet_district(op),
    }
}

#[cfg(feature = "district")]
fn fleet_district(op: FleetOp) -> ExitCode {
    use zhian_gateway::fleet::push;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = match op {
        FleetOp::Keygen { .. } => unreachable!("handled by fleet()"),
        FleetOp::Push {
            config,
            key,
            fragment,
            gateway,
            layer,
            all,
            canary,
            serial,
            timeout,
            no_wait,
        } => {
            let text = match std::fs::read_to_string(&fragment) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("fleet push: {}: {e}", fragment.display());
                    return ExitCode::from(EX_CONFIG as u8);
                }
            };
            let targets = if all {
                push::Targets::All
            } else if let Some(l) = layer {
                match l.split_once('=') {
                    Some((k, v)) => {
                        push::Targets::Layer(k.trim().to_string(), v.trim().to_string())
                    }
                    None => {
                        eprintln!("fleet push: --layer {l}: give LAYER=LABEL (community=江滨社区)");
                        return ExitCode::from(EX_CONFIG as u8);
                    }
                }
            } else {
                push::Targets::Gateways(gateway)
            };
            let key = key_beside(key, &config);
            rt.block_on(push::push(
                &config,
                &key,
                push::Push {
                    fragment: text,
                    targets,
                    canary,
                    serial,
                    timeout,
                    no_wait,
                },
            ))
        }
        FleetOp::Diag {
            config,
            gateway,
            key,
            timeout,
        } => {
            let key = key_beside(key, &config);
            rt.block_on(push::diag(&config, &key, &gateway, timeout))
        }
    };
    ExitCode::from(code)
}

#[cfg(not(feature = "district"))]
fn fleet_district(_: FleetOp) -> ExitCode {
    eprintln!("this build has no fleet push or diag (cargo feature `district`; they run at the district, the box build leaves them out)");
    ExitCode::from(EX_CONFIG as u8)
}

#[derive(Subcommand)]
enum DevicesOp {
    /// List the devices the daemon tracks (all, or those the patterns name), with when each
    /// was last seen and the source it was learned through.
    List {
        /// Config file (for gateway.data_dir).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
        /// Device names or globs (`*`, `?`); `kind/name` with a `/` (`camera/plate-*`).
        patterns: Vec<String>,
    },
    /// Forget the devices the patterns name, from the page, API, metrics, heartbeat and store.
    Forget {
        /// Config file (for gateway.data_dir).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
        /// Device names or globs (`*`, `?`); `kind/name` with a `/` (`camera/plate-*`).
        #[arg(required = true)]
        patterns: Vec<String>,
    },
}

/// `devices list|forget`: a request to the running daemon through its data dir.
fn devices(op: DevicesOp) -> ExitCode {
    use zhian_gateway::devices::{cli, Op, Request};
    let (config, json, req) = match op {
        DevicesOp::List {
            config,
            json,
            patterns,
        } => (
            config,
            json,
            Request {
                op: Op::List,
                patterns,
                count: None,
            },
        ),
        DevicesOp::Forget {
            config,
            json,
            patterns,
        } => (
            config,
            json,
            Request {
                op: Op::Forget,
                patterns,
                count: None,
            },
        ),
    };
    match load(config, false) {
        Ok(cfg) => ExitCode::from(cli(&cfg.gateway.data_dir, req, json)),
        Err(code) => code,
    }
}

#[cfg(feature = "demo")]
fn demo(data_dir: Option<PathBuf>) -> ExitCode {
    serve(|shutdown| async move {
        zhian_gateway::demo::run(data_dir, shutdown)
            .await
            .map(|()| zhian_gateway::Stopped::Shutdown)
    })
}

#[cfg(not(feature = "demo"))]
fn demo(_data_dir: Option<PathBuf>) -> ExitCode {
    eprintln!("this build has no demo (cargo feature `demo`)");
    ExitCode::FAILURE
}

fn init_logging() {
    // The embedded broker logs every client connection and subscription at INFO (text chosen
    // by whoever connects) and a client's ordinary disconnect at ERROR ("no-connection id 0 is
    // already gone"): noise that would bury ours. Off; the daemon reports the broker's state
    // itself (it fails to start on a taken port, and the site link shows its connection).
    // (RUST_LOG=info, as the unit sets, gets it too; name rumqttd in RUST_LOG to see it.)
    let mut spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if !spec.contains("rumqttd") {
        spec.push_str(",rumqttd=off");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=off"));
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    // systemd sets JOURNAL_STREAM when stderr goes to the journal, which stamps its own time.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // No field can start a forged line: control characters are escaped (logfmt).
        // Each line is also kept in memory (the last 200) for `fleet diag`.
        .with_writer(move || {
            zhian_gateway::fleet::log_tail::Tee::new(zhian_gateway::logfmt::EscapingWriter {
                inner: std::io::stderr(),
                keep_ansi: terminal,
            })
        })
        // Colour codes only for a person at a terminal: in journald they make MESSAGE a byte
        // array and break `journalctl -o json` (contract: "Logs").
        .with_ansi(terminal);
    if terminal {
        builder.init();
    } else if journal {
        builder
            .event_format(SyslogPrefix(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init();
    } else {
        builder
            .event_format(SyslogPrefix(tracing_subscriber::fmt::format()))
            .init();
    }
}

/// Each line starts with `<N>`, the syslog priority of its level (3 error, 4 warning, 6 info,
/// 7 debug), which journald files as the entry's priority (`SyslogLevelPrefix=yes`, its default)
/// and strips from the message: `journalctl -p warning` then shows warnings and worse.
struct SyslogPrefix<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPrefix<F>
where
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let n = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{n}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The daemons' runtime: two worker threads (the boxes have two to four cores).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// SIGHUP (`systemctl reload`, a stray `kill -HUP`): re-read the config file. A valid one is
/// handed to the daemon, which applies what can change live; an invalid one is logged, one line
/// per problem, and the running config kept. SIGHUP never stops the daemon.
fn reload_on_sighup(
    origin: zhian_gateway::fleet::Origin,
) -> tokio::sync::mpsc::Receiver<config::Config> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: config reload unavailable");
            return rx;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(path = %origin.path.display(), "SIGHUP: re-reading the config");
            let loaded = {
                let origin = origin.clone();
                tokio::task::spawn_blocking(move || zhian_gateway::fleet::load_effective(&origin))
                    .await
            };
            match loaded {
                Ok(Ok(eff)) => {
                    if let Some(p) = &eff.problem {
                        tracing::error!(problem = %p, "reload: the fleet overlay is not in force");
                    }
                    if tx.send(eff.cfg).await.is_err() {
                        return;
                    }
                }
                Ok(Err(problems)) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "config reload refused; the running config is kept");
                    }
                }
                Err(_) => {}
            }
        }
    });
    rx
}

/// Resolves on the first SIGTERM or SIGINT; the handlers are registered when this is called
/// (inside the runtime), not when it is first polled.
fn shutdown_signal() -> Shutdown {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    Box::pin(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

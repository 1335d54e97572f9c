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
        Command::CheckConfig { config, quiet } => match load(config, true) {
            Ok(cfg) => {
                if !quiet {
                    for n in config::env_notes(std::env::vars())
                        .into_iter()
                        .chain(config::example_notes(&cfg))
                    {
                        eprintln!("note: {n}");
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
            let explicit = config.is_some();
            let path = config.unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
            let cfg = match load(Some(path.clone()).filter(|_| explicit), false) {
                Ok(c) => c,
                Err(code) => return code,
            };
            serve(move |shutdown| {
                for n in config::env_notes(std::env::vars()) {
                    tracing::warn!("{n}");
                }
                let reloads = reload_on_sighup(path, explicit);
                zhian_gateway::run_with_reload(cfg, shutdown, reloads)
            })
        }
    }
}

/// Run the daemon (or the demo) on a small runtime and turn its result into an exit code.
fn serve<F>(make: impl FnOnce(Shutdown) -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), zhian_gateway::RunError>>,
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
        Ok(()) => ExitCode::SUCCESS,
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
    serve(|shutdown| zhian_gateway::demo::run(data_dir, shutdown))
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
        .with_writer(move || zhian_gateway::logfmt::EscapingWriter {
            inner: std::io::stderr(),
            keep_ansi: terminal,
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
fn reload_on_sighup(path: PathBuf, explicit: bool) -> tokio::sync::mpsc::Receiver<config::Config> {
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
            tracing::info!(path = %path.display(), "SIGHUP: re-reading the config");
            let loaded = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || config::load(&path, explicit)).await
            };
            match loaded {
                Ok(Ok(cfg)) => {
                    if tx.send(cfg).await.is_err() {
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

//! The gateway binary: the daemon process, one-shot CLI runs, `/api/status`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::*;

/// The gateway binary under test: `ZHIAN_GATEWAY_BIN` when set (the test command points it at
/// the box build, `--no-default-features --features box`, which the `.deb` ships), else the one
/// cargo built for this test (default features).
pub fn gateway_bin() -> std::ffi::OsString {
    std::env::var_os("ZHIAN_GATEWAY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_zhian-gateway").into())
}

fn gateway_command() -> Command {
    let mut cmd = Command::new(gateway_bin());
    // Configuration must come from the file only: drop any ZHIAN_* overrides of the caller,
    // and any systemd notification socket of the test runner's own service.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ZHIAN_") {
            cmd.env_remove(key);
        }
    }
    for key in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        cmd.env_remove(key);
    }
    cmd.env("RUST_LOG", "info,zhian_gateway=debug")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// `zhian-gateway run --config <file>`, stdout and stderr appended to a log file.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// As [`Daemon::start`], with extra environment variables (LD_PRELOAD of libfaketime, say).
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let args = [
            OsStr::new("run"),
            OsStr::new("--config"),
            config.as_os_str(),
        ];
        Daemon::start_args(&args, log, env)
    }

    /// `zhian-gateway <args>` as a long-running process (`run`, `demo`), stdout and stderr
    /// appended to `log`, with `env` besides the harness's.
    pub fn start_args(args: &[&OsStr], log: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        writeln!(
            out,
            "===== harness: starting daemon at unix ms {} =====",
            now_ms()
        )
        .expect("write daemon log");
        let child = gateway_command()
            .envs(env.iter().copied())
            .args(args)
            .stdout(out.try_clone().expect("clone file handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn zhian-gateway {args:?}: {e}"));
        Daemon { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has already exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on daemon")
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed daemon")
    }

    /// SIGTERM and wait (up to 10 s, then SIGKILL): the exit status and how long the exit took.
    pub fn term(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        sigterm(self.pid());
        match wait_child(&mut self.child, Duration::from_secs(10)) {
            Some(status) => (status, started.elapsed()),
            None => {
                let status = self.kill9();
                (status, started.elapsed())
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill9();
        }
    }
}

/// Output of one CLI invocation.
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `zhian-gateway <args>` to completion (killed after `timeout`, which fails the test).
pub fn run_cli<S: AsRef<OsStr>>(args: &[S], scratch: &Path, timeout: Duration) -> CliOutput {
    run_cli_with(args, scratch, timeout, &[])
}

/// As [`run_cli`] (15 s at most), with extra environment variables.
pub fn run_cli_env<S: AsRef<OsStr>>(args: &[S], scratch: &Path, env: &[(&str, &str)]) -> CliOutput {
    run_cli_with(args, scratch, Duration::from_secs(15), env)
}

fn run_cli_with<S: AsRef<OsStr>>(
    args: &[S],
    scratch: &Path,
    timeout: Duration,
    env: &[(&str, &str)],
) -> CliOutput {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("cli-{n}.stdout"));
    let err_path = scratch.join(format!("cli-{n}.stderr"));
    let mut child = gateway_command()
        .envs(env.iter().copied())
        .args(args)
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn zhian-gateway");
    let status = match wait_child(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "zhian-gateway {:?} still running after {timeout:?}; stderr:\n{}",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>(),
                tail(&err_path, 50)
            );
        }
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    CliOutput {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// `zhian-gateway check-config --config <config>` (15 s at most).
pub fn check_config(config: &Path, scratch: &Path) -> CliOutput {
    let args = [
        OsStr::new("check-config"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    run_cli(&args, scratch, Duration::from_secs(15))
}

/// GET `/api/status` as JSON (None on a transport error or a non-200 answer).
pub fn api_status(port: u16) -> Option<Value> {
    let r = http(port, "GET", "/api/status", None).ok()?;
    (r.status == 200).then(|| r.json())
}

/// `zhian-gateway ARGS` with `input` on stdin (`hash-password`, `care-pseudonym`).
pub fn run_with_stdin<S: AsRef<OsStr>>(args: &[S], input: &str) -> std::process::Output {
    let mut child = gateway_command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zhian-gateway");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for zhian-gateway")
}

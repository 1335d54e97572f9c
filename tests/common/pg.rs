//! A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a cluster made with
//! `initdb` in a temp dir, started on a loopback port as an unprivileged user (`nobody` when the
//! tests run as root, as CI does: postgres refuses to run as root), trust auth for the `zhian`
//! role on 127.0.0.1 only. Stopped (fast shutdown) on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The directory holding `initdb`, `postgres` and `psql` for the installed major version.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (apt-get install postgresql; scripts/test-deps.sh does)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL server in /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid never fails.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as `nobody` when we are root.
fn unprivileged(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// The field separator of [`Postgres::psql_table`]'s output (ASCII unit separator).
pub const FIELD_SEP: &str = "\u{1f}";

pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    /// The cluster's data directory (`dir/data` unless placed elsewhere, e.g. on a tmpfs).
    data: PathBuf,
    child: Option<Child>,
}

impl Postgres {
    /// initdb and start a server in `dir` on 127.0.0.1:`port`.
    pub fn start(dir: &Path, port: u16) -> Postgres {
        Self::start_with(dir, port, &dir.join("data"), &[])
    }

    /// As [`Postgres::start`], with the data directory at `data` (on a small tmpfs, say) and
    /// extra `initdb` arguments (`--wal-segsize=1`).
    pub fn start_with(dir: &Path, port: u16, data: &Path, initdb_extra: &[&str]) -> Postgres {
        let bin = bin_dir();
        std::fs::create_dir_all(dir).unwrap();
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "nobody:nogroup"]).arg(dir);
            if let Some(parent) = data.parent() {
                std::fs::create_dir_all(parent).unwrap();
                chown.arg(parent);
            }
            let ok = chown.status().unwrap().success();
            assert!(ok, "chown the cluster dir");
            // nobody must reach the dir through its parents (a temp dir is 0700 root).
            let mut p = dir.parent();
            while let Some(d) = p {
                if d == Path::new("/") || d == Path::new("/tmp") {
                    break;
                }
                let _ = Command::new("chmod").arg("o+x").arg(d).status();
                p = d.parent();
            }
        }
        let out = unprivileged(&bin.join("initdb"))
            .arg("-D")
            .arg(data)
            .args(["-U", "zhian", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(initdb_extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            port,
            dir: dir.to_path_buf(),
            data: data.to_path_buf(),
            child: None,
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let bin = bin_dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .unwrap();
        let child = unprivileged(&bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=50"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let up = super::wait_until(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.psql("SELECT 1").is_some()
        });
        assert!(
            up,
            "postgres did not start:\n{}",
            super::tail(&self.dir.join("postgres.log"), 20)
        );
    }

    /// Fast shutdown (SIGINT: what `pg_ctl stop -m fast` sends), waiting for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with a pid we spawned.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            if super::wait_child(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Start a stopped server again (or one that exited by itself); no-op while it runs.
    pub fn start_again(&mut self) {
        if !self.is_running() {
            self.child = None;
            self.spawn();
        }
    }

    /// `pg_ctl restart -m fast`, done by hand so the harness keeps the server process: a fast
    /// shutdown (open transactions aborted, clients disconnected), then a start.
    pub fn restart_fast(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The server's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// `postgres://zhian@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://zhian@127.0.0.1:{}/postgres", self.port)
    }

    /// Run `sql` with psql; the rows, `|`-separated, or `None` on an error.
    pub fn psql(&self, sql: &str) -> Option<String> {
        self.psql_with(sql, "")
    }

    /// As [`Postgres::psql`], with session settings in `pgoptions` (`PGOPTIONS`, e.g.
    /// `-c default_transaction_read_only=off` to undo a read-only default).
    pub fn psql_with(&self, sql: &str, pgoptions: &str) -> Option<String> {
        let out = self
            .psql_command(pgoptions)
            .args(["-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run `sql` (one statement) with psql: a header line of column names, then the rows, each
    /// field followed by [`FIELD_SEP`] but the last; or the server's error message.
    pub fn psql_table(&self, sql: &str, pgoptions: &str) -> Result<String, String> {
        let out = self
            .psql_command(pgoptions)
            .args([
                "-A",
                "-F",
                FIELD_SEP,
                "-P",
                "footer=off",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-c", sql])
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Run the SQL file at `path` in one transaction (`psql -1 -f`, stopping at the first
    /// error), e.g. a migration; the error otherwise.
    pub fn psql_file(&self, path: &Path) -> Result<(), String> {
        let out = self
            .psql_command("")
            .args(["-q", "-1", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(path)
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// psql connected as `zhian` to the `postgres` database, with `PGOPTIONS`.
    fn psql_command(&self, pgoptions: &str) -> Command {
        let mut c = Command::new(bin_dir().join("psql"));
        c.env("PGOPTIONS", pgoptions)
            .env("PGCONNECT_TIMEOUT", "5")
            .args(["-X", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "zhian", "-d", "postgres"]);
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown.
            // SAFETY: kill(2) with a pid we spawned.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let _ = super::wait_child(&mut c, Duration::from_secs(10));
            let _ = c.kill();
        }
    }
}

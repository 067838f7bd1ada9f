//! A real PostgreSQL for tests, from `initdb` in a temporary directory:
//! one shared by a test binary ([`shared`]), each test in a database of its
//! own ([`Postgres::database`]), or one of a test's own ([`Postgres::start`])
//! when the test stops or freezes it.
//!
//! It listens on 127.0.0.1, on a port the OS picked (taken by someone else
//! before PostgreSQL binds it, the start is tried again on another), and on
//! a unix socket in its directory; `fsync` is off. TLS is on, with a
//! certificate for 127.0.0.1 and localhost signed by a CA of its own
//! ([`Postgres::ca`]). Every login is trusted but the role `secured`'s over
//! TCP, which needs its password ([`SECURED_PASSWORD`]).
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then initdb and
//! the server run as `nobody`, the directory given to it. The binaries are
//! found on PATH or under /usr/lib/postgresql/*/bin (Debian's place). When
//! PostgreSQL is not installed the tests say so and pass as skipped, unless
//! QRGATE_REQUIRE_POSTGRES=1 makes that a failure (CI sets it).
//!
//! A server dies with the test process even when nothing drops it (the
//! shared one is a static): the kernel sends it SIGINT, a fast shutdown,
//! when the thread that started it ends (`PR_SET_PDEATHSIG`), and shared
//! servers are started from a thread that lives as long as the process.
//! Directories left by a killed test binary are removed by the next one.

#![allow(dead_code)] // each test binary uses its own part of it

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The role whose TCP logins need a password.
pub const SECURED_ROLE: &str = "secured";
pub const SECURED_PASSWORD: &str = "secured-pw-7f3a";

const DIR_PREFIX: &str = "qrgate-pg-";

/// A running PostgreSQL.
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// Whom it runs as, when the tests run as root.
    user: Option<(u32, u32)>,
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// The test binary's PostgreSQL, started on first use; `None` (said on
/// stderr) when PostgreSQL is not installed, unless QRGATE_REQUIRE_POSTGRES=1.
pub fn shared() -> Option<&'static Postgres> {
    SHARED
        .get_or_init(|| {
            let bin = binaries()?;
            // Started from a thread that never ends, so that the server's
            // death signal fires only when the process ends.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("postgres-owner".into())
                .spawn(move || {
                    let _ = tx.send(Postgres::start_in(bin));
                    loop {
                        std::thread::park();
                    }
                })
                .unwrap();
            Some(rx.recv().unwrap())
        })
        .as_ref()
}

/// Where PostgreSQL's server binaries are, or `None` after saying so.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("postgres"))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.parent().map(Path::to_owned))
    });
    let debian = || {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("postgres").is_file())
            .collect();
        // The newest major version.
        dirs.sort_by_key(|d| {
            d.parent()
                .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                .unwrap_or(0)
        });
        dirs.pop()
    };
    let found = on_path
        .filter(|d| d.join("initdb").is_file())
        .or_else(debian);
    if found.is_none() {
        if std::env::var("QRGATE_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!(
                "PostgreSQL is required (QRGATE_REQUIRE_POSTGRES=1) but not installed \
                 (no postgres and initdb on PATH or under /usr/lib/postgresql/*/bin)"
            );
        }
        eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
    }
    found
}

/// `nobody`'s ids when running as root: PostgreSQL refuses root.
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: geteuid reads the process's credentials; getpwnam returns a
    // pointer into static storage, read at once, on this thread only.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null(), "running as root and there is no user nobody");
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// Directories of test processes that are gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Postgres {
    /// A server of the caller's own, stopped when dropped (`None` as
    /// [`shared`] says). The server dies with the calling thread, so a
    /// test keeps it on its own thread.
    pub fn start() -> Option<Postgres> {
        binaries().map(Postgres::start_in)
    }

    fn start_in(bin: PathBuf) -> Postgres {
        remove_stale_dirs();
        let user = unprivileged();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap()
            .keep();
        let mut pg = Postgres {
            port: 0,
            bin,
            dir,
            child: None,
            user,
        };
        pg.give(&pg.dir.clone());
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                "qrgate",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        );
        std::fs::write(
            pg.data().join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all {SECURED_ROLE} 127.0.0.1/32 scram-sha-256\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();
        // In the configuration file rather than on the command line, so
        // that a measurement can turn fsync back on (ALTER SYSTEM).
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data().join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, b"\nfsync = off\nfull_page_writes = off\n").unwrap();
        pg.certificates();
        for attempt in 1..=5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if pg.serve(port) {
                break;
            }
            assert!(attempt < 5, "PostgreSQL did not start on 5 ports");
        }
        pg.psql(
            "postgres",
            &format!("CREATE ROLE {SECURED_ROLE} LOGIN CREATEDB PASSWORD '{SECURED_PASSWORD}'"),
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The CA that signed its certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Makes `path` the server user's.
    fn give(&self, path: &Path) {
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }

    /// A command of PostgreSQL's, as the server's user, dying with the
    /// thread that started it.
    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        let user = self.user;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After the change of user, which would clear it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A server certificate for 127.0.0.1 and localhost, from a CA of its own.
    fn certificates(&self) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(self.ca(), ca.pem()).unwrap();
        let (crt, pem) = (
            self.data().join("server.crt"),
            self.data().join("server.key"),
        );
        std::fs::write(&crt, cert.pem()).unwrap();
        std::fs::write(&pem, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.give(&crt);
        self.give(&pem);
    }

    /// Starts the server on `port`; `false` when it stopped first (the port
    /// was taken).
    fn serve(&mut self, port: u16) -> bool {
        let mut child = self
            .command("postgres")
            .args(["-D", self.data().to_str().unwrap()])
            .args(["-p", &port.to_string()])
            .args(["-k", self.dir.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "ssl=on"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ready = crate::wait::wait_for_blocking(format!("PostgreSQL on port {port}"), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let up = self
                .command("pg_isready")
                .args(["-q", "-h", self.dir.to_str().unwrap()])
                .args(["-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            up.then_some(Ok(()))
        });
        match ready {
            Ok(()) => {
                // Its log is read so that it never blocks on a full pipe.
                let err = child.stderr.take().unwrap();
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut sink = [0u8; 4096];
                    let mut err = err;
                    while err.read(&mut sink).is_ok_and(|n| n > 0) {}
                });
                self.port = port;
                self.child = Some(child);
                true
            }
            Err(status) => {
                let mut why = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut why);
                assert!(
                    why.contains("could not bind") || why.contains("in use"),
                    "PostgreSQL stopped ({status}): {why}"
                );
                false
            }
        }
    }

    /// Runs SQL through psql on database `db`, as the superuser `qrgate`.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", self.dir.to_str().unwrap()])
            .args(["-p", &self.port.to_string()])
            .args(["-U", "qrgate", "-d", db, "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new, empty database: its name.
    pub fn database(&self) -> String {
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.psql(
            "postgres",
            &format!("GRANT ALL ON DATABASE {name} TO {SECURED_ROLE}; ALTER DATABASE {name} OWNER TO {SECURED_ROLE}"),
        );
        name
    }

    /// The URL of database `db` over TCP, as the superuser, without TLS.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://qrgate@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A new database's URL ([`Postgres::database`], [`Postgres::url`]).
    pub fn fresh_url(&self) -> String {
        self.url(&self.database())
    }

    /// The process's id, to stop or freeze it.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends the server and every process it started (each session's
    /// backend is one, in a process group of its own) a signal: SIGSTOP
    /// freezes it all, SIGCONT thaws it.
    pub fn signal(&self, signal: i32) {
        let server = self.pid();
        let children = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                // The parent's pid is the second field after the command name.
                let ppid: u32 = stat[stat.rfind(')')? + 2..]
                    .split(' ')
                    .nth(1)?
                    .parse()
                    .ok()?;
                (ppid == server).then_some(pid)
            });
        for pid in std::iter::once(server).chain(children.collect::<Vec<_>>()) {
            // SAFETY: kill sends a signal to our own child or its children.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Stops the server and starts it again on the same port, as a restart
    /// of the service does: every session ends.
    pub fn restart(&mut self) {
        let port = self.port;
        self.stop();
        assert!(
            self.serve(port),
            "port {port} was taken while PostgreSQL restarted"
        );
    }

    /// Stops the server (a fast shutdown) and waits for it to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill sends a signal to our own child; a frozen one is
            // thawed to hear it.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

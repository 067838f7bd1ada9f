//! One `qrgate serve` per database. Two processes on one SQLite file would
//! each rebuild their own order book from it and then disagree about every
//! POS (two `pending` sales, two answers to one poll), while SQLite itself
//! would happily take both writers' commits.
//!
//! The guard is an exclusive `flock` on `<db>.lock`, taken before the store
//! opens and held for the life of the process: the kernel releases it when
//! the process ends, crash included, so a stale file never blocks a start.
//! The file holds who holds it (pid, host, start time, HTTP listen address)
//! as one JSON object, so the refused start can name the running one.
//! `qrgate backup`, `qrgate pos register` and an operator's `sqlite3` do
//! not take it: they are meant to run beside the service.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Held while qrgate serves the database; dropping it releases the lock.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
    path: PathBuf,
}

/// Who holds a database, as its lock file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Its public HTTP listener.
    pub http_listen: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the store {db} is in use by another qrgate (pid {pid} on {host}, started {started}, HTTP on {http}); \
         stop it first, or give this one its own [store] path",
        pid = .holder.pid, host = .holder.host, started = .holder.started_at, http = .holder.http_listen
    )]
    Held { db: String, holder: Holder },
    #[error("the store {db} is in use by another qrgate (its lock file {lock} says nothing readable: {reason})")]
    HeldUnknown {
        db: String,
        lock: String,
        reason: String,
    },
    #[error("cannot lock the store {db} through {lock}: {reason}")]
    Io {
        db: String,
        lock: String,
        reason: String,
    },
}

/// The lock file of a database: `<db>.lock`, beside it.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl DbLock {
    /// Takes the database's lock for this process, or names who has it.
    pub fn take(db: &Path, http_listen: SocketAddr) -> Result<DbLock, LockError> {
        let path = lock_path(db);
        let io = |e: std::io::Error| LockError::Io {
            db: db.display().to_string(),
            lock: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(e));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(match serde_json::from_str::<Holder>(&text) {
                Ok(holder) => LockError::Held {
                    db: db.display().to_string(),
                    holder,
                },
                Err(e) => LockError::HeldUnknown {
                    db: db.display().to_string(),
                    lock: path.display().to_string(),
                    reason: e.to_string(),
                },
            });
        }
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            http_listen: http_listen.to_string(),
        };
        let text = serde_json::to_string(&holder).map_err(|e| io(std::io::Error::other(e)))?;
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.flush().map_err(io)?;
        Ok(DbLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(super) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes
    // at most that many bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_database_is_refused_naming_the_first_and_freed_when_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let first = DbLock::take(&db, "127.0.0.1:8080".parse().unwrap()).unwrap();
        let e = DbLock::take(&db, "127.0.0.1:8081".parse().unwrap()).unwrap_err();
        match &e {
            LockError::Held { holder, .. } => {
                assert_eq!(holder.pid, std::process::id());
                assert_eq!(holder.http_listen, "127.0.0.1:8080");
                assert!(!holder.host.is_empty());
            }
            other => panic!("{other}"),
        }
        let text = e.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("HTTP on 127.0.0.1:8080"), "{text}");
        drop(first);
        let again = DbLock::take(&db, "127.0.0.1:8082".parse().unwrap()).unwrap();
        let said: Holder =
            serde_json::from_str(&std::fs::read_to_string(again.path()).unwrap()).unwrap();
        assert_eq!(said.http_listen, "127.0.0.1:8082");
    }
}

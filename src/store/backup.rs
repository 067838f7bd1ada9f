//! `qrgate backup PATH`: a consistent copy of the live database, taken
//! beside a running qrgate. Copying the file is not one: in WAL mode the
//! latest commits live in `-wal` until a checkpoint moves them, and a copy
//! of the pair taken while qrgate writes can hold half a transaction.
//!
//! SQLite's online backup copies the database page by page. Between steps
//! it pauses, so qrgate's writer is never held up; and the source holds one
//! read transaction for the whole copy, so every step reads the same
//! snapshot (without it, a commit by qrgate between two steps would make the
//! backup start over, forever under load). In WAL mode a reader blocks no
//! writer: qrgate goes on committing, only its checkpoints stop short of the
//! snapshot until the copy ends (they wait, see `sqlite::checkpoints`).
//!
//! The copy goes to a temporary file beside `PATH`, is checked
//! (`quick_check`), synced, and only then takes `PATH`'s name, so `PATH` is
//! either absent or a whole backup. The single-process lock is not taken.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Pages copied per step: 4 MiB with SQLite's 4 KiB pages.
const PAGES_PER_STEP: i32 = 1024;
/// The pause between steps, in which qrgate's writer has the disk to itself.
const PAUSE: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(String),
    #[error("{0} is the live database itself; back up to another path")]
    SameFile(String),
    #[error("no database at {0} (key `store.path`)")]
    NoDatabase(String),
    #[error("cannot back up {from} to {to}: {reason}")]
    Failed {
        from: String,
        to: String,
        reason: String,
    },
}

/// What a finished backup copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub pages: i32,
    pub bytes: u64,
}

/// Copies the database at `db` to `to`; an existing `to` is replaced only
/// with `force`.
pub fn backup(db: &Path, to: &Path, force: bool) -> Result<Copied, BackupError> {
    let failed = |reason: String| BackupError::Failed {
        from: db.display().to_string(),
        to: to.display().to_string(),
        reason,
    };
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db.display().to_string()));
    }
    if let (Ok(a), Ok(b)) = (db.canonicalize(), to.canonicalize()) {
        if a == b {
            return Err(BackupError::SameFile(to.display().to_string()));
        }
    }
    if to.exists() && !force {
        return Err(BackupError::Exists(to.display().to_string()));
    }
    let tmp = temporary_beside(to);
    let copied = copy(db, &tmp).map_err(|e| {
        remove_copy(&tmp);
        failed(e)
    })?;
    let placed = if force {
        std::fs::rename(&tmp, to)
    } else {
        // A link fails if `to` appeared meanwhile: never replaced by surprise.
        std::fs::hard_link(&tmp, to).and_then(|()| std::fs::remove_file(&tmp))
    };
    if let Err(e) = placed {
        remove_copy(&tmp);
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            BackupError::Exists(to.display().to_string())
        } else {
            failed(e.to_string())
        });
    }
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The new name is durable only once its directory is.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed(format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(copied)
}

fn temporary_beside(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(name)
}

fn remove_copy(tmp: &Path) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut name = tmp.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

fn copy(db: &Path, tmp: &Path) -> Result<Copied, String> {
    let sql = |e: rusqlite::Error| e.to_string();
    // Read-write without create: a WAL database is read through its shared
    // memory file, which a read-only connection may not be able to set up.
    let source = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    source.busy_timeout(Duration::from_secs(10)).map_err(sql)?;
    // One snapshot for the whole copy (see the module's comment).
    source.execute_batch("BEGIN").map_err(sql)?;
    source
        .query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(sql)?;
    let _ = std::fs::remove_file(tmp);
    let mut target = Connection::open(tmp).map_err(sql)?;
    let pages = {
        let backup = rusqlite::backup::Backup::new(&source, &mut target).map_err(sql)?;
        backup
            .run_to_completion(PAGES_PER_STEP, PAUSE, None)
            .map_err(sql)?;
        backup.progress().pagecount
    };
    source.execute_batch("COMMIT").map_err(sql)?;
    drop(source);
    let check: String = target
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(sql)?;
    if check != "ok" {
        return Err(format!("the copy fails SQLite's quick_check: {check}"));
    }
    // The copy is a WAL database like its source: leave it as one file.
    target
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(sql)?;
    drop(target);
    let file = File::open(tmp).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    let bytes = file.metadata().map_err(|e| e.to_string())?.len();
    Ok(Copied { pages, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(path: &Path, rows: i64) {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        for n in 0..rows {
            c.execute("INSERT INTO t VALUES (?1, 'x')", [n]).unwrap();
        }
    }

    fn rows(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_backup_refuses_to_replace_a_file_unless_forced_and_never_the_database_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        database(&db, 10);
        let to = dir.path().join("copy.db");
        backup(&db, &to, false).unwrap();
        assert_eq!(rows(&to), 10);
        let e = backup(&db, &to, false).unwrap_err();
        assert!(matches!(e, BackupError::Exists(_)), "{e}");
        Connection::open(&db)
            .unwrap()
            .execute("INSERT INTO t VALUES (99, 'y')", [])
            .unwrap();
        backup(&db, &to, true).unwrap();
        assert_eq!(rows(&to), 11);
        let e = backup(&db, &db, true).unwrap_err();
        assert!(matches!(e, BackupError::SameFile(_)), "{e}");
        let e = backup(&dir.path().join("none.db"), &to, true).unwrap_err();
        assert!(matches!(e, BackupError::NoDatabase(_)), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }
}

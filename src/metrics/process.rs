//! The process's own series, as Prometheus' client libraries name them,
//! read from `/proc/self` at each scrape: CPU time, resident memory and open
//! file descriptors (a descriptor leak or a memory climb shows here before
//! the station's server runs out).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntGauge};

pub struct Process {
    cpu: Counter,
    resident: IntGauge,
    open_fds: IntGauge,
}

impl Process {
    pub fn new() -> Process {
        Process {
            cpu: Counter::new(
                "process_cpu_seconds_total",
                "User and system CPU time spent, in seconds.",
            )
            .expect("valid metric"),
            resident: IntGauge::new(
                "process_resident_memory_bytes",
                "Resident memory, in bytes.",
            )
            .expect("valid metric"),
            open_fds: IntGauge::new("process_open_fds", "Open file descriptors.")
                .expect("valid metric"),
        }
    }
}

/// `(cpu seconds, resident bytes)` from `/proc/self/stat`.
fn stat() -> Option<(f64, i64)> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: fields count from
    // after its closing parenthesis (field 3, the state, is index 0).
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let rss_pages: i64 = fields.get(21)?.parse().ok()?;
    // SAFETY: sysconf reads a configuration value; no pointer is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    Some((
        (utime + stime) / ticks as f64,
        rss_pages.saturating_mul(page as i64),
    ))
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        [&self.cpu as &dyn Collector, &self.resident, &self.open_fds]
            .into_iter()
            .flat_map(|c| c.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some((cpu, resident)) = stat() {
            // A counter only goes up: add what was spent since the last scrape.
            let spent = cpu - self.cpu.get();
            if spent > 0.0 {
                self.cpu.inc_by(spent);
            }
            self.resident.set(resident);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is in the count: take it out.
            let open = dir.count().saturating_sub(1);
            self.open_fds.set(i64::try_from(open).unwrap_or(i64::MAX));
        }
        let mut out = self.cpu.collect();
        out.extend(self.resident.collect());
        out.extend(self.open_fds.collect());
        out
    }
}

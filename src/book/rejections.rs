//! How many of a POS's refused device messages are kept one by one.
//!
//! Every refusal is counted (metrics), but a device that keeps sending what
//! qrgate refuses (over its rate, or broken messages within it) must not turn
//! each message into a log line and a store row: 10,000 refusals in 10 s were
//! 10,000 rows in `device_rejections`, with no limit. So, per POS and per
//! minute of the clock, the first `per_minute` refusals are kept as before
//! (one log line, one row, one console event each), and the rest are only
//! summed; a minute that summed something becomes one summary (one log line,
//! one row) once it is over.
//!
//! Pure bookkeeping behind one lock, the clock passed in: the book decides
//! with it and does the writing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::orders::PosId;

/// The store row of a summary: `code`, and a message that starts with the
/// number of refusals it sums.
pub const SUMMARY_CODE: &str = "refusals_summed";

const MINUTE_MS: i64 = 60_000;

/// One POS's refusals in one minute.
#[derive(Debug, Default)]
struct Window {
    minute: i64,
    kept: u32,
    summed: u64,
    /// Summed refusals by reason; reasons are a short fixed set.
    reasons: Vec<(String, u64)>,
}

/// What a POS's device had refused beyond the kept ones in a minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub pos: PosId,
    /// Unix milliseconds at the start of the minute.
    pub minute_ms: i64,
    pub summed: u64,
    /// By reason, the largest first.
    pub reasons: Vec<(String, u64)>,
}

impl Summary {
    /// The operator's text (and the summary row's message): the count first.
    pub fn message(&self) -> String {
        let minute = chrono::DateTime::from_timestamp_millis(self.minute_ms)
            .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
            .unwrap_or_default();
        let reasons: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        format!(
            "{} more refusals in the minute from {minute}, counted but not stored one by one: {}",
            self.summed,
            reasons.join(", ")
        )
    }
}

#[derive(Debug, Default)]
struct Windows {
    open: HashMap<PosId, Window>,
    /// Minutes that ended while their POS kept refusing, not yet taken.
    ended: Vec<Summary>,
}

/// Per POS and minute: which refusals are kept one by one.
#[derive(Debug)]
pub struct Tally {
    per_minute: AtomicU32,
    windows: Mutex<Windows>,
}

fn summary(pos: PosId, w: Window) -> Option<Summary> {
    (w.summed > 0).then(|| {
        let mut reasons = w.reasons;
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Summary {
            pos,
            minute_ms: w.minute * MINUTE_MS,
            summed: w.summed,
            reasons,
        }
    })
}

impl Tally {
    pub fn new(per_minute: u32) -> Tally {
        Tally {
            per_minute: AtomicU32::new(per_minute),
            windows: Mutex::new(Windows::default()),
        }
    }

    /// `[mqtt] stored_rejections_per_minute`, set once the MQTT side starts.
    pub fn set_per_minute(&self, n: u32) {
        self.per_minute.store(n, Ordering::Relaxed);
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        // Plain counters: a panic elsewhere leaves nothing half-done here.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one refusal of `pos` at `now_ms`: `true` when it is kept one by
    /// one (logged and stored), `false` when it is only summed.
    pub fn admit(&self, pos: &PosId, code: &str, now_ms: i64) -> bool {
        let minute = now_ms.div_euclid(MINUTE_MS);
        let per_minute = self.per_minute();
        let mut w = self.lock();
        let Windows { open, ended } = &mut *w;
        let window = match open.get_mut(pos) {
            Some(window) => window,
            None => open.entry(pos.clone()).or_insert_with(|| Window {
                minute,
                ..Window::default()
            }),
        };
        if window.minute != minute {
            let old = std::mem::replace(
                window,
                Window {
                    minute,
                    ..Window::default()
                },
            );
            ended.extend(summary(pos.clone(), old));
        }
        if window.kept < per_minute {
            window.kept += 1;
            return true;
        }
        window.summed += 1;
        match window.reasons.iter_mut().find(|(r, _)| r == code) {
            Some((_, n)) => *n += 1,
            None => window.reasons.push((code.to_owned(), 1)),
        }
        false
    }

    /// Takes the summaries of minutes over at `now_ms` (of every minute,
    /// the current one too, when `all`: at shutdown), and forgets those
    /// minutes, so memory follows the POS refusing now.
    pub fn take_ended(&self, now_ms: i64, all: bool) -> Vec<Summary> {
        let minute = now_ms.div_euclid(MINUTE_MS);
        let mut w = self.lock();
        let Windows { open, ended } = &mut *w;
        let mut out = std::mem::take(ended);
        let done: Vec<PosId> = open
            .iter()
            .filter(|(_, w)| all || w.minute < minute)
            .map(|(p, _)| p.clone())
            .collect();
        for pos in done {
            if let Some(window) = open.remove(&pos) {
                out.extend(summary(pos, window));
            }
        }
        out.sort_by(|a, b| (a.minute_ms, &a.pos).cmp(&(b.minute_ms, &b.pos)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(id: &str) -> PosId {
        PosId::parse(id).unwrap()
    }

    const T0: i64 = 1_700_000_040_000; // 22:14:00 UTC, the start of a minute

    #[test]
    fn the_first_refusals_of_a_minute_are_kept_and_the_rest_summed_per_pos() {
        let l = Tally::new(3);
        let a = pos("pump-1");
        let b = pos("pump-2");
        let kept: Vec<bool> = (0..10)
            .map(|i| l.admit(&a, "rate_limited", T0 + i))
            .collect();
        assert_eq!(
            kept,
            [true, true, true, false, false, false, false, false, false, false]
        );
        // Another POS has its own allowance.
        assert!(l.admit(&b, "bad_json", T0 + 20));
        // Nothing is over yet.
        assert!(l.take_ended(T0 + 59_999, false).is_empty());
        let s = l.take_ended(T0 + 60_000, false);
        assert_eq!(
            s,
            [Summary {
                pos: a.clone(),
                minute_ms: T0,
                summed: 7,
                reasons: vec![("rate_limited".into(), 7)],
            }]
        );
        assert!(s[0]
            .message()
            .starts_with("7 more refusals in the minute from 2023-11-14T22:14Z"));
        // Taken once; the windows are gone, and the next minute keeps again.
        assert!(l.take_ended(T0 + 120_000, false).is_empty());
        assert!(l.admit(&a, "rate_limited", T0 + 120_001));
    }

    #[test]
    fn a_minute_ending_under_a_refusal_is_kept_for_the_next_take() {
        let l = Tally::new(1);
        let a = pos("pump-1");
        for i in 0..5 {
            l.admit(&a, if i % 2 == 0 { "busy" } else { "bad_json" }, T0 + i);
        }
        // The next minute's first refusal closes the previous one.
        assert!(l.admit(&a, "busy", T0 + 60_000));
        assert!(!l.admit(&a, "busy", T0 + 60_001));
        let s = l.take_ended(T0 + 60_002, true);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].summed, 4);
        assert_eq!(
            s[0].reasons,
            [("bad_json".to_owned(), 2), ("busy".to_owned(), 2)]
        );
        assert_eq!((s[1].minute_ms, s[1].summed), (T0 + 60_000, 1));
    }

    #[test]
    fn zero_keeps_nothing_one_by_one() {
        let l = Tally::new(0);
        assert!(!l.admit(&pos("p"), "busy", T0));
        assert_eq!(l.take_ended(T0, true)[0].summed, 1);
    }
}

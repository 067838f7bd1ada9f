//! Logs for operators: one line per event, with the fields they search by
//! (`pos`, `sale_id`, `external_reference`, `merchant_order`, `payment`),
//! text or JSON (`auto`: JSON unless stdout is a terminal, so a service's
//! journal or collector gets JSON and a person at a terminal reads text).
//! `RUST_LOG` overrides the configured filter. The embedded
//! broker's own logs are off by default (it reports every device disconnect as
//! an error); `RUST_LOG=info,rumqttd=warn` shows them.
//!
//! Much of what is logged comes from strangers: POS ids from URLs, user
//! agents, notification ids, topics, excerpts of device payloads. Every line
//! goes through one formatter, here, whatever its call site (ours, a
//! dependency's, a `log` record): each field's value is cut at
//! [`FIELD_MAX`] characters (the message and the prose fields at
//! [`TEXT_MAX`]),
//! saying how much was cut, and control characters (and the invisible ones
//! that reorder or break lines) are written as escapes, in both formats. So
//! no value can forge a line, move the cursor of a terminal showing the log,
//! or make one line large. Call sites need no care of their own. What this
//! does not bound is how many lines a stranger causes: see
//! `http::ratelimit::WarnLimiter`.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Characters a field's value may take in a line.
pub const FIELD_MAX: usize = 128;
/// Characters of the message and of the prose fields `error`, `detail` and
/// `reason` (our own text, with context that may quote what a stranger sent).
pub const TEXT_MAX: usize = 512;

/// actix-http logs every request it cannot parse at ERROR ("stream error",
/// without the source): the HTTP edge reports those itself, at WARN,
/// rate-limited, with the source (`http::edge`).
const QUIET: &str = "rumqttd=off,actix_server=warn,actix_http::h1::dispatcher=off";

/// Installs the global subscriber; a second call (tests) does nothing.
pub fn init(cfg: &LogConfig) {
    let filter = match std::env::var("RUST_LOG") {
        // Whoever names actix_http in RUST_LOG wants to see it.
        Ok(v) if v.contains("actix_http") => EnvFilter::try_new(v),
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(format!("{v},actix_http::h1::dispatcher=off"))
        }
        _ => EnvFilter::try_new(format!("{},{QUIET}", cfg.filter)),
    }
    .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")));
    let terminal = std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // Colours are escape sequences: only for a terminal, never in a file.
        .with_ansi(terminal)
        .fmt_fields(SafeFields);
    let _ = match resolve(cfg.format, terminal) {
        LogFormat::Json => builder.event_format(SafeJson).try_init(),
        _ => builder.try_init(),
    };
}

/// The format `auto` stands for: text for a person at a terminal, JSON for
/// anything else.
fn resolve(format: LogFormat, terminal: bool) -> LogFormat {
    match format {
        LogFormat::Auto if terminal => LogFormat::Text,
        LogFormat::Auto => LogFormat::Json,
        chosen => chosen,
    }
}

/// Prose fields (our own sentences, which may quote an excerpt they have
/// bounded already, like a device message's 200 characters) get
/// [`TEXT_MAX`]; ids, headers, topics and everything else [`FIELD_MAX`].
fn limit_of(name: &str) -> usize {
    match name {
        "message" | "error" | "detail" | "reason" => TEXT_MAX,
        _ => FIELD_MAX,
    }
}

/// Characters that would break a line, rewrite a terminal or reorder text.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Writes text escaped, up to a number of characters, and counts the
/// bytes it had to leave out.
struct Clean<'a> {
    out: &'a mut dyn fmt::Write,
    left: usize,
    /// Bytes of the value not written.
    cut: usize,
    /// Inside quotes, `"` and `\` are escaped too.
    quoted: bool,
}

impl<'a> Clean<'a> {
    fn new(out: &'a mut dyn fmt::Write, limit: usize, quoted: bool) -> Clean<'a> {
        Clean {
            out,
            left: limit,
            cut: 0,
            quoted,
        }
    }

    /// Says how much was cut, if anything.
    fn finish(self, more: usize) -> fmt::Result {
        match self.cut + more {
            0 => Ok(()),
            n => write!(self.out, "…(+{n} bytes)"),
        }
    }
}

impl fmt::Write for Clean<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.cut > 0 {
                self.cut += c.len_utf8();
                continue;
            }
            let short = match c {
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                '"' if self.quoted => Some("\\\""),
                '\\' if self.quoted => Some("\\\\"),
                _ => None,
            };
            let hex = short.is_none() && invisible(c);
            let width = match (short, hex) {
                (Some(s), _) => s.len(),
                // `\u{` + hex digits + `}`
                (None, true) => 4 + (32 - (c as u32 | 1).leading_zeros() as usize).div_ceil(4),
                (None, false) => 1,
            };
            if width > self.left {
                self.cut = c.len_utf8();
                continue;
            }
            self.left -= width;
            match (short, hex) {
                (Some(s), _) => self.out.write_str(s)?,
                (None, true) => write!(self.out, "\\u{{{:x}}}", c as u32)?,
                (None, false) => self.out.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The text of a `Debug` (or `%` `Display`) value, kept up to `limit`
/// characters; the rest is only counted, never held.
struct Capture {
    text: String,
    chars_left: usize,
    extra: usize,
}

impl Capture {
    fn of(value: &dyn fmt::Debug, limit: usize) -> Capture {
        let mut c = Capture {
            text: String::new(),
            chars_left: limit,
            extra: 0,
        };
        // A `Debug` impl that fails leaves what it wrote.
        let _ = write!(c, "{value:?}");
        c
    }
}

impl fmt::Write for Capture {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            if self.chars_left == 0 {
                self.extra += ch.len_utf8();
            } else {
                self.chars_left -= 1;
                self.text.push(ch);
            }
        }
        Ok(())
    }
}

/// `value` escaped and capped, as one string (the JSON format's values).
fn clean_string(value: &str, limit: usize, more: usize) -> String {
    let mut out = String::new();
    let mut c = Clean::new(&mut out, limit, false);
    let _ = c.write_str(value);
    let _ = c.finish(more);
    out
}

/// The pretty format's field formatter: `message name=value ...`. A plain
/// string value is always quoted; another value is quoted when it is empty
/// or holds a space, `=` or `"`, so a value cannot pass for more fields.
pub struct SafeFields;

impl<'a> MakeVisitor<Writer<'a>> for SafeFields {
    type Visitor = PrettyVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> PrettyVisitor<'a> {
        PrettyVisitor {
            writer: target,
            first: true,
            result: Ok(()),
        }
    }
}

pub struct PrettyVisitor<'a> {
    writer: Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl PrettyVisitor<'_> {
    fn write(&mut self, field: &Field, text: &str, more: usize, always_quote: bool) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let limit = limit_of(name);
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.writer.write_char(' ')?;
            }
            if name == "message" {
                let mut c = Clean::new(&mut self.writer, limit, false);
                c.write_str(text)?;
                return c.finish(more);
            }
            write!(self.writer, "{name}=")?;
            let quoted = always_quote
                || text.is_empty()
                || text.contains(|c: char| c == '"' || c == '=' || c.is_whitespace());
            if quoted {
                self.writer.write_char('"')?;
            }
            let mut c = Clean::new(&mut self.writer, limit, quoted);
            c.write_str(text)?;
            if quoted {
                // The note of what was cut goes after the closing quote.
                let cut = c.cut + more;
                self.writer.write_char('"')?;
                if cut > 0 {
                    write!(self.writer, "…(+{cut} bytes)")?;
                }
                Ok(())
            } else {
                c.finish(more)
            }
        })();
    }
}

impl Visit for PrettyVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value, 0, true);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let c = Capture::of(&format_args!("{value}"), limit_of(field.name()));
        self.write(field, &c.text, c.extra, false);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let c = Capture::of(value, limit_of(field.name()));
        self.write(field, &c.text, c.extra, false);
    }
}

impl VisitOutput<fmt::Result> for PrettyVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PrettyVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// The JSON format: `{"timestamp","level","message",fields...,"spans"}`,
/// one object a line, like tracing-subscriber's flattened JSON, with every
/// string value escaped and capped as in the pretty format (so `jq -r`
/// prints no control character either).
pub struct SafeJson;

#[derive(Default)]
struct JsonVisitor {
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl JsonVisitor {
    fn text(&mut self, field: &Field, text: &str, more: usize) {
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let value = clean_string(text, limit_of(name), more);
        self.fields.push((name, serde_json::Value::String(value)));
    }

    fn value(&mut self, field: &Field, value: serde_json::Value) {
        let name = field.name();
        self.fields
            .push((name.strip_prefix("r#").unwrap_or(name), value));
    }
}

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value, 0);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let c = Capture::of(&format_args!("{value}"), limit_of(field.name()));
        self.text(field, &c.text, c.extra);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let c = Capture::of(value, limit_of(field.name()));
        self.text(field, &c.text, c.extra);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        match serde_json::Number::from_f64(value) {
            Some(n) => self.value(field, serde_json::Value::Number(n)),
            None => self.text(field, &value.to_string(), 0),
        }
    }
}

fn json_entry(
    w: &mut Writer<'_>,
    first: bool,
    key: &str,
    value: &serde_json::Value,
) -> fmt::Result {
    let key = serde_json::to_string(key).map_err(|_| fmt::Error)?;
    let value = serde_json::to_string(value).map_err(|_| fmt::Error)?;
    write!(w, "{}{key}:{value}", if first { "" } else { "," })
}

impl<S, N> FormatEvent<S, N> for SafeJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut visitor = JsonVisitor::default();
        event.record(&mut visitor);
        writer.write_char('{')?;
        json_entry(&mut writer, true, "timestamp", &timestamp.into())?;
        json_entry(
            &mut writer,
            false,
            "level",
            &event.metadata().level().as_str().into(),
        )?;
        for (name, value) in &visitor.fields {
            json_entry(&mut writer, false, name, value)?;
        }
        if let Some(scope) = ctx.event_scope() {
            // Span fields were formatted (and cleaned) by `SafeFields`.
            let spans: Vec<serde_json::Value> = scope
                .from_root()
                .map(|span| {
                    let ext = span.extensions();
                    let fields = ext
                        .get::<FormattedFields<N>>()
                        .map(|f| f.fields.as_str())
                        .unwrap_or_default();
                    serde_json::json!({ "name": span.name(), "fields": fields })
                })
                .collect();
            json_entry(&mut writer, false, "spans", &spans.into())?;
        }
        writer.write_str("}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pretty(build: impl FnOnce()) -> String {
        log_with(LogFormat::Text, build)
    }

    fn json(build: impl FnOnce()) -> String {
        log_with(LogFormat::Json, build)
    }

    /// The lines `build` logs through the real formatter.
    fn log_with(format: LogFormat, build: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_target(false)
            .with_ansi(false)
            .fmt_fields(SafeFields);
        match format {
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.event_format(SafeJson).finish(), build)
            }
            _ => tracing::subscriber::with_default(builder.finish(), build),
        }
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn auto_is_text_at_a_terminal_and_json_elsewhere_and_a_chosen_format_stays() {
        assert_eq!(resolve(LogFormat::Auto, true), LogFormat::Text);
        assert_eq!(resolve(LogFormat::Auto, false), LogFormat::Json);
        for terminal in [true, false] {
            assert_eq!(resolve(LogFormat::Json, terminal), LogFormat::Json);
            assert_eq!(resolve(LogFormat::Text, terminal), LogFormat::Text);
        }
    }

    const NASTY: &str =
        "pump-1\n2026-01-01T00:00:00.000000Z  INFO sale paid pos=pump-9\u{1b}[2J\u{7}\u{202e}";

    #[test]
    fn no_value_forges_a_line_or_writes_a_control_character_in_either_format() {
        for (name, log) in [
            (
                "pretty",
                pretty(|| tracing::warn!(pos = %NASTY, agent = NASTY, "poll {}", NASTY)),
            ),
            (
                "json",
                json(|| tracing::warn!(pos = %NASTY, agent = NASTY, "poll {}", NASTY)),
            ),
        ] {
            assert_eq!(log.lines().count(), 1, "{name}: {log}");
            assert!(
                !log.trim_end_matches('\n').contains(|c: char| invisible(c)),
                "{name}: {log:?}"
            );
        }
        let log = pretty(|| tracing::warn!(pos = %NASTY, "poll"));
        assert!(log.contains(r"pump-1\n2026"), "{log}");
        assert!(log.contains(r"\u{1b}[2J\u{7}\u{202e}"), "{log}");
        // JSON escapes by itself; the value still reads as the pretty one.
        let log = json(|| tracing::warn!(pos = %NASTY, "poll"));
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        let pos = v["pos"].as_str().unwrap();
        assert!(pos.contains(r"pump-1\n2026"), "{pos}");
        assert!(pos.contains(r"\u{1b}[2J\u{7}\u{202e}"), "{pos}");
    }

    #[test]
    fn values_are_cut_and_say_how_much_was_cut() {
        let agent = "a".repeat(100 * 1024);
        let log = pretty(|| tracing::warn!(user_agent = agent.as_str(), pos = %agent, "x"));
        assert!(log.len() < 2 * FIELD_MAX + 200, "{}", log.len());
        assert!(
            log.contains(&format!("…(+{} bytes)", 100 * 1024 - FIELD_MAX)),
            "{log}"
        );
        let log = json(|| tracing::warn!(user_agent = agent.as_str(), error = %agent, "x"));
        assert!(log.len() < FIELD_MAX + TEXT_MAX + 300, "{}", log.len());
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        assert_eq!(v["message"], "x");
        assert_eq!(v["level"], "WARN");
        assert!(v["user_agent"]
            .as_str()
            .unwrap()
            .starts_with(&"a".repeat(FIELD_MAX)));
        assert!(v["error"]
            .as_str()
            .unwrap()
            .starts_with(&"a".repeat(TEXT_MAX)));
    }

    #[test]
    fn values_that_could_pass_for_fields_are_quoted_and_numbers_stay_numbers() {
        let log = pretty(|| tracing::warn!(reason = %"a b=\"c\"", id = 7, ok = true, "m"));
        assert!(
            log.contains(r#"m reason="a b=\"c\"" id=7 ok=true"#),
            "{log}"
        );
        let log = json(|| tracing::info!(id = 7_u64, amount = 1.5, ok = true, "m"));
        let v: serde_json::Value = serde_json::from_str(&log).unwrap();
        assert_eq!(
            (v["id"].as_u64(), v["amount"].as_f64(), v["ok"].as_bool()),
            (Some(7), Some(1.5), Some(true))
        );
    }
}

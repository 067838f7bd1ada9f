//! The benchmark's shortest mode (`qrgate-bench smoke`) runs to the end and
//! reports. Its timings are not checked: timing belongs to `benches/run`,
//! never to `cargo test`. It drives the `qrgate` binary built beside it,
//! which `cargo test --workspace` builds; run alone (`-p qrgate-bench`), the
//! test is skipped with a note when that binary is missing.

use std::path::Path;
use std::process::Command;

#[test]
fn the_bench_in_smoke_mode_completes_and_reports() {
    let bench = Path::new(env!("CARGO_BIN_EXE_qrgate-bench"));
    let qrgate = bench.with_file_name(format!("qrgate{}", std::env::consts::EXE_SUFFIX));
    if !qrgate.exists() {
        eprintln!(
            "skipped: {} is missing (cargo test --workspace builds it)",
            qrgate.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.json");
    let run = Command::new(bench)
        .args(["smoke", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("| sale → servable, embedded broker"),
        "{stdout}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(r["mode"], "smoke");
    for part in ["servable_embedded", "notify_to_device"] {
        assert_eq!(r[part]["sales"], 30, "{part}: {r}");
        assert!(r[part]["p99_us"].as_f64().unwrap() > 0.0, "{part}: {r}");
    }
    let mix = &r["mix"];
    assert!(mix["cycles_paid"].as_u64().unwrap() > 0, "{mix}");
    assert_eq!(mix["errors"], 0, "{mix}");
    assert_eq!(mix["lost_sales"], 0, "{mix}");
}

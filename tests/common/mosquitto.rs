//! Whether the tests that need Mosquitto can run: each test binary that
//! starts one asks here first.

use std::process::{Command, Stdio};

/// Whether every one of `tools` (`mosquitto`, `mosquitto_passwd`…) is
/// installed. When one is not, the caller's test is skipped, said on
/// stderr, unless QRGATE_REQUIRE_MOSQUITTO=1 (CI) makes that a failure.
pub fn installed(tools: &[&str]) -> bool {
    let found = tools.iter().all(|tool| {
        Command::new(tool)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    if !found {
        if std::env::var("QRGATE_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
            panic!("mosquitto is required (QRGATE_REQUIRE_MOSQUITTO=1) but not installed");
        }
        eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
    }
    found
}

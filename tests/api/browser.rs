//! The console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against the real app, broker, device and Mercado Pago
//! simulator. Every wait is for a condition (`wait_for`).

use std::process::{Child, Command, Stdio};

use fantoccini::{Client, ClientBuilder, Locator};
use mpsim::{NotifyMode, PaymentOutcome};
use qrgate::config::Secret;
use serde_json::{json, Value};

use crate::admin::{chromium, paid_sale};
use crate::helpers::*;

/// The full path of a program on `PATH`.
fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver, or `None` (and a note) when it is not installed, unless
/// QRGATE_REQUIRE_CHROMIUM=1 makes that a failure.
fn chromedriver() -> Option<std::path::PathBuf> {
    if let Some(p) = which("chromedriver") {
        return Some(p);
    }
    if std::env::var("QRGATE_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
        panic!("chromedriver is required (QRGATE_REQUIRE_CHROMIUM=1) but not installed");
    }
    eprintln!("SKIPPED: chromedriver is not installed");
    None
}

/// A chromedriver process, its browser session, and the browser's profile.
/// Dropping it kills chromedriver and what it started (its process group).
struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The process group chromedriver leads: Chromium with it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Headless Chromium under chromedriver, or `None` when either is
    /// missing (and not required).
    async fn start() -> Option<Browser> {
        let chromium = which(chromium()?)?;
        let driver = chromedriver()?;
        let port = free_port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("chromedriver starts")
        };
        let mut browser = Browser {
            client: None,
            driver: child,
            profile: tempfile::tempdir().unwrap(),
        };
        let url = format!("http://127.0.0.1:{port}");
        wait_for(format!("chromedriver answering on {url}"), || async {
            reqwest::get(format!("{url}/status"))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--hide-scrollbars",
                    "--window-size=1100,750",
                    format!("--user-data-dir={}", browser.profile.path().display()),
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        // The app installs the same provider; whichever comes first wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session");
        browser.client = Some(client);
        Some(browser)
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Ends the session (Chromium quits); the guard then stops chromedriver.
    async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    /// Waits until `read` (the page as the test sees it) says `want`.
    async fn wait_for(&self, what: &str, want: &str, read: impl AsyncRead) {
        let seen = try_wait_for(|| async {
            match read.read(self.c()).await {
                Some(v) if v == want => Ok(()),
                Some(v) => Err(format!("{v:?}")),
                None => Err("nothing".to_owned()),
            }
        })
        .await;
        if let Err(last) = seen {
            // An open dialog hides the page from reads and screenshots.
            let dialog = self.c().get_alert_text().await.ok();
            let shot = self.c().screenshot().await.unwrap_or_default();
            let png = target_dir().join("console-failure.png");
            let _ = std::fs::write(&png, shot);
            panic!(
                "{what}: wanted {want:?}, last seen {} (page: {}; a dialog open: {dialog:?})",
                last.unwrap_or_else(|| "nothing".to_owned()),
                png.display()
            );
        }
    }

    /// Waits until the page shows the login form.
    async fn login_form_shown(&self) {
        wait_for("the login form", || async {
            self.c().find(Locator::Id("token")).await.is_ok()
        })
        .await;
    }

    /// The `data-state` of a POS row's sale cell.
    async fn row_state_is(&self, pos: &str, want: &str) {
        self.wait_for(
            &format!("the row of {pos}"),
            want,
            Attr(format!("#pos-{pos} td.state"), "data-state"),
        )
        .await;
    }

    async fn text_is(&self, css: &str, want: &str) {
        self.wait_for(css, want, Text(css.to_owned())).await;
    }

    /// A marker on the page's `window`: gone if the page was reloaded.
    async fn mark(&self) {
        self.c()
            .execute("window.qrgateMark = 'same page'; return null;", vec![])
            .await
            .unwrap();
    }

    async fn still_marked(&self) -> bool {
        self.c()
            .execute("return window.qrgateMark || null;", vec![])
            .await
            .unwrap()
            == json!("same page")
    }

    /// Clicks `css` and accepts the `confirm()` it opens; its text.
    async fn click_and_confirm(&self, css: &str) -> Result<String, fantoccini::error::CmdError> {
        self.c().find(Locator::Css(css)).await?.click().await?;
        let text = self.c().get_alert_text().await?;
        self.c().accept_alert().await?;
        Ok(text)
    }
}

/// Something read off the page; `None` while it is not there.
trait AsyncRead {
    async fn read(&self, c: &Client) -> Option<String>;
}

struct Attr(String, &'static str);
impl AsyncRead for Attr {
    async fn read(&self, c: &Client) -> Option<String> {
        let e = c.find(Locator::Css(&self.0)).await.ok()?;
        e.attr(self.1).await.ok()?
    }
}

struct Text(String);
impl AsyncRead for Text {
    async fn read(&self, c: &Client) -> Option<String> {
        let e = c.find(Locator::Css(&self.0)).await.ok()?;
        e.text().await.ok()
    }
}

fn target_dir() -> std::path::PathBuf {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    target
}

async fn log_in(b: &Browser, token: &str) {
    let c = b.c();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_refuses_a_wrong_token_and_the_right_one_opens_the_console() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let app = TestApp::spawn_with(|c| c.admin.token = Some(Secret::new("op-s3cret"))).await;
    let base = app.admin.clone().unwrap();
    b.c().goto(&format!("{base}/")).await.unwrap();
    // No session: the login form, not the console.
    b.login_form_shown().await;
    assert!(b.c().find(Locator::Id("pos")).await.is_err());

    log_in(&b, "not-the-token").await;
    b.text_is("#login-error", "Wrong token.").await;
    assert!(b.c().find(Locator::Id("pos")).await.is_err());

    log_in(&b, "op-s3cret").await;
    // The console, its rows filled through the API and its event stream
    // open, both with the session cookie.
    b.row_state_is("pump-1", "idle").await;
    b.row_state_is("vending-1", "idle").await;
    b.text_is("#live", "live").await;
    assert!(b.c().find(Locator::Id("login-error")).await.is_err());
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_log_out_button_ends_the_session_and_shows_the_login_form() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let app = TestApp::spawn_with(|c| c.admin.token = Some(Secret::new(OPERATOR_TOKEN))).await;
    let base = app.admin.clone().unwrap();
    b.c().goto(&format!("{base}/")).await.unwrap();
    log_in(&b, OPERATOR_TOKEN).await;
    b.row_state_is("pump-1", "idle").await;
    b.c()
        .find(Locator::Id("logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The login form, and it stays: the session is over, not just hidden.
    b.login_form_shown().await;
    b.c().goto(&format!("{base}/")).await.unwrap();
    b.login_form_shown().await;
    assert!(b.c().find(Locator::Id("pos")).await.is_err());
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_rows_follow_a_sale_live_from_pending_to_paid() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    b.c()
        .goto(&format!("{}/", app.admin.clone().unwrap()))
        .await
        .unwrap();
    b.row_state_is("pump-1", "idle").await;
    // No device has said it is there yet.
    b.text_is("#pos-vending-1 td[data-device]", "never seen")
        .await;
    // Subscribed to the stream before the sale, so its events reach the page.
    b.text_is("#live", "live").await;
    b.mark().await;

    pump.publish_sale("11", &fuel("3", "150.00"), None)
        .await
        .unwrap();
    state_of(&pump, "11", "pending").await;
    b.row_state_is("pump-1", "pending").await;
    b.text_is("#count-pending", "1").await;

    let order = app.scan("pump-1").await;
    app.mp.set_notify_mode(NotifyMode::Ipn);
    app.mp
        .pay(order.merchant_order_id, PaymentOutcome::Approved)
        .await
        .unwrap();
    state_of(&pump, "11", "paid").await;
    // Paid, the device has not said it delivered yet.
    b.row_state_is("pump-1", "paid_undelivered").await;
    pump.delivered("11", true, None).await.unwrap();
    b.row_state_is("pump-1", "paid").await;
    b.text_is("#count-pending", "0").await;
    assert!(b.still_marked().await, "the page was not reloaded");

    // A second POS with a pending sale, then the screenshot for reviewers.
    let vending = app.device("vending-1").await;
    vending
        .publish_sale("5", &snack("1500.00"), None)
        .await
        .unwrap();
    state_of(&vending, "5", "pending").await;
    b.row_state_is("vending-1", "pending").await;
    assert!(b.still_marked().await, "the page was not reloaded");
    // The feed shows the events, newest first.
    let feed = b.c().find(Locator::Id("feed")).await.unwrap();
    let text = feed.text().await.unwrap();
    assert!(text.contains("vending-1"), "the event feed names the POS");
    // Times as the server writes them: `2026-12-03 14:05:09`.
    let first = text.lines().next().unwrap_or_default();
    let stamp: Vec<char> = first.chars().take(19).collect();
    assert!(
        stamp.len() == 19
            && stamp.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == '-',
                10 => *c == ' ',
                13 | 16 => *c == ':',
                _ => c.is_ascii_digit(),
            }),
        "{first}"
    );
    let png = b.c().screenshot().await.unwrap();
    assert!(png.len() > 1000);
    std::fs::write(target_dir().join("console.png"), png).unwrap();
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_cancel_button_cancels_a_pending_sale_end_to_end() {
    let Some(b) = Browser::start().await else {
        return;
    };
    // With a token: the page acts with its session cookie and CSRF token.
    let app = TestApp::spawn_with(|c| c.admin.token = Some(Secret::new("op-s3cret"))).await;
    let pump = app.device("pump-1").await;
    pump.publish_sale("21", &fuel("2", "100.00"), None)
        .await
        .unwrap();
    let reference = state_of(&pump, "21", "pending")
        .await
        .external_reference
        .unwrap();
    b.c()
        .goto(&format!("{}/", app.admin.clone().unwrap()))
        .await
        .unwrap();
    log_in(&b, "op-s3cret").await;
    b.row_state_is("pump-1", "pending").await;

    // The row's state links to the sale's page.
    b.c()
        .find(Locator::Css("#pos-pump-1 td.state a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.text_is("#sale-state", "pending").await;
    let asked = b.click_and_confirm("#cancel").await.unwrap();
    assert!(asked.contains(&reference), "{asked}");
    // Nobody scanned it: no customer can be paying.
    assert!(!asked.contains("may be paying"), "{asked}");

    state_of(&pump, "21", "cancelled").await;
    // The page reloads on the sale's event: cancelled, no more button.
    b.text_is("#sale-state", "cancelled").await;
    assert!(b.c().find(Locator::Id("cancel")).await.is_err());
    assert_eq!(app.poll_kind("pump-1").await, "unavailable");
    assert!(app
        .timeline(&reference)
        .await
        .contains(&"cancelled_by_operator".to_owned()));

    // A sale Mercado Pago has shown to a phone: the operator is warned.
    pump.publish_sale("22", &fuel("2", "100.00"), None)
        .await
        .unwrap();
    let served = state_of(&pump, "22", "pending")
        .await
        .external_reference
        .unwrap();
    app.scan("pump-1").await;
    pump.wait_state(WAIT, |m| m.state == "pending" && m.served)
        .await
        .unwrap();
    b.c()
        .goto(&format!("{}/sales/{served}", app.admin.clone().unwrap()))
        .await
        .unwrap();
    b.text_is("#sale-state", "pending").await;
    let asked = b.click_and_confirm("#cancel").await.unwrap();
    assert!(asked.contains("may be paying"), "{asked}");
    state_of(&pump, "22", "cancelled").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refund_button_refunds_once_however_often_it_is_pressed() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let app = TestApp::spawn().await;
    let pump = app.device("pump-1").await;
    let reference = paid_sale(&app, &pump, "31", "100.00").await;
    pump.delivered("31", true, None).await.unwrap();
    b.c()
        .goto(&format!("{}/sales/{reference}", app.admin.clone().unwrap()))
        .await
        .unwrap();
    b.text_is("#sale-state", "paid").await;
    // Record every answer to the page's refund requests where a reload
    // keeps it (the page reloads after a successful action).
    b.c()
        .execute(
            "const f = window.fetch;
         window.fetch = async (...a) => {
           const r = await f(...a);
           if (String(a[0]).endsWith('/refund')) {
             const seen = JSON.parse(sessionStorage.getItem('refunds') || '[]');
             seen.push(r.status);
             sessionStorage.setItem('refunds', JSON.stringify(seen));
           }
           return r;
         };
         return null;",
            vec![],
        )
        .await
        .unwrap();

    // Pressed twice in a row (each confirmed), before the page reloads.
    let asked = b.click_and_confirm("#refund").await.unwrap();
    assert!(asked.contains("all that is left"), "{asked}");
    let again = b.click_and_confirm("#refund").await.is_ok();
    // The second press may have landed as the page reloaded, its confirm
    // still open: accepted, or it would hide the page from every read.
    if !again && b.c().get_alert_text().await.is_ok() {
        let _ = b.c().accept_alert().await;
    }

    pump.wait_state(WAIT, |m| {
        m.state == "refunded" && m.sale_id.as_deref() == Some("31")
    })
    .await
    .unwrap();
    b.text_is("#sale-state", "refunded").await;
    b.text_is("#refunded-total", "100.00").await;
    // Nothing left: no button to press again.
    assert!(b.c().find(Locator::Id("refund")).await.is_err());

    let refunds = app.mp.refunds();
    assert_eq!(refunds.len(), 1, "one refund sent: {refunds:?}");
    assert_eq!(refunds[0].amount, None, "all of it, an empty body");
    let answers = b
        .c()
        .execute("return sessionStorage.getItem('refunds');", vec![])
        .await
        .unwrap();
    let answers: Vec<u16> = answers
        .as_str()
        .map(|s| serde_json::from_str(s).unwrap())
        .unwrap_or_default();
    assert_eq!(
        answers.iter().filter(|s| **s == 200).count(),
        1,
        "second press sent: {again}; answers {answers:?}"
    );
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 409),
        "{answers:?}"
    );
    let events = app.timeline(&reference).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "refunded_by_operator")
            .count(),
        1,
        "{events:?}"
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_refunds_what_a_sale_owes_and_its_attention_clears() {
    let Some(b) = Browser::start().await else {
        return;
    };
    // qrgate leaves what is owed to the operator.
    let app = TestApp::spawn_with(|c| c.orders.auto_refund = false).await;
    let pump = app.device("pump-1").await;
    let reference = paid_sale(&app, &pump, "41", "100.00").await;
    pump.delivered("41", false, Some("nozzle jammed"))
        .await
        .unwrap();
    app.wait_event(&reference, "delivered").await;
    let base = app.admin.clone().unwrap();
    b.c().goto(&format!("{base}/")).await.unwrap();
    // The index lists what is owed, whatever the POS does next.
    b.text_is("#count-refund_due", "1").await;
    b.text_is(
        &format!("#owing tr[data-reference='{reference}'] td:nth-child(4)"),
        "100.00 ARS",
    )
    .await;
    b.c()
        .goto(&format!("{base}/sales/{reference}"))
        .await
        .unwrap();
    b.text_is("#owed", "100.00").await;
    let asked = b.click_and_confirm("#refund-owed").await.unwrap();
    assert!(asked.contains("100.00"), "{asked}");
    // The page reloads on the refund's event: nothing owed, no button.
    app.wait_event(&reference, "refunded").await;
    wait_for("the owed button gone", || async {
        b.c().find(Locator::Id("refund-owed")).await.is_err()
    })
    .await;
    let refunds = app.mp.refunds();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0].amount, None, "the whole payment");
    b.c().goto(&format!("{base}/")).await.unwrap();
    b.text_is("#count-refund_due", "0").await;
    b.close().await;
}

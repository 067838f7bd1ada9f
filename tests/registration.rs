//! `qrgate pos register` and `qrgate pos list` as an operator runs them: the
//! real binary, a config file, and the Mercado Pago simulator standing in for
//! MP's stores and POS API (ports from the OS, a temp SQLite file).

use std::path::PathBuf;

use mpsim::{ApiCall, Simulator, SimulatorConfig};
use qrgate::store::{SqliteStore, Store};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_qrgate");
const TOKEN: &str = "TEST-sim-token";
const POLL_KEY: &str = "pk-Gl0bal-s3cret";
const PUMP2_KEY: &str = "pk-pump2-own";

/// Two pumps (one with its own poll key) and an attended vending till in
/// store st01.
const STATION: &str = r#"
[[pos]]
id = "pump-1"
kind = "fuel"
store = "st01"

[[pos]]
id = "pump-2"
kind = "fuel"
store = "st01"
name = "Surtidor 2"
poll_key = "pk-pump2-own"

[[pos]]
id = "shop-1"
kind = "vending"
mode = "attended"
store = "st01"
category = 621102
"#;

const STORE: &str = r#"
[[stores]]
id = "st01"
name = "Estación Ruta 8"
[stores.location]
street_name = "Av. Siempre Viva"
street_number = "742"
city_name = "Pilar"
state_name = "Buenos Aires"
latitude = -34.45
longitude = -58.91
"#;

struct Station {
    sim: Simulator,
    dir: tempfile::TempDir,
    config: PathBuf,
}

#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
    /// The calls Mercado Pago received during the run.
    calls: Vec<ApiCall>,
}

impl Run {
    fn writes(&self) -> Vec<&ApiCall> {
        self.calls
            .iter()
            .filter(|c| c.method == "POST" || c.method == "PUT")
            .collect()
    }
}

impl Station {
    async fn new(pos_and_stores: &str) -> Station {
        let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("qrgate.toml");
        let station = Station { sim, dir, config };
        station.write_config(pos_and_stores);
        station
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("q.db")
    }

    fn write_config(&self, pos_and_stores: &str) {
        let text = format!(
            r#"
[http]
public_url = "https://station.example.com"
poll_key = "{POLL_KEY}"
[mercadopago]
api_base = "{}"
site = "MLA"
timeout_ms = 2000
[mqtt]
allow_anonymous = true
[store]
path = "{}"
{pos_and_stores}
"#,
            self.sim.base_url(),
            self.db().display()
        );
        std::fs::write(&self.config, text).unwrap();
    }

    async fn run(&self, args: &[&str]) -> Run {
        let before = self.sim.api_calls().len();
        let out = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("QRGATE_CONFIG")
            .env_remove("RUST_LOG")
            .env_remove("QRGATE_ADMIN_TOKEN")
            .env("QRGATE_MP_ACCESS_TOKEN", TOKEN)
            .output()
            .await
            .unwrap();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&out.stdout).into_owned(),
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
            calls: self.sim.api_calls().split_off(before),
        };
        for secret in [TOKEN, POLL_KEY, PUMP2_KEY] {
            assert!(
                !run.out.contains(secret) && !run.err.contains(secret),
                "a secret is printed: {run:#?}"
            );
        }
        run
    }

    fn pos(&self, external_id: &str) -> serde_json::Value {
        self.sim
            .pos_by_external_id(external_id)
            .unwrap_or_else(|| panic!("no POS {external_id} at MP: {:#?}", self.sim.pos_list()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_from_empty_creates_the_store_and_every_pos_and_keeps_their_qr_links() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");

    let stores = st.sim.stores();
    assert_eq!(stores.len(), 1, "{stores:#?}");
    assert_eq!(stores[0]["external_id"], "st01");
    assert_eq!(stores[0]["name"], "Estación Ruta 8");
    assert_eq!(stores[0]["location"]["city_name"], "Pilar");

    let pump1 = st.pos("pump1");
    assert_eq!(
        pump1["url"],
        format!("https://station.example.com/mp/pos/pump-1?key={POLL_KEY}")
    );
    assert_eq!(pump1["fixed_amount"], true);
    assert_eq!(pump1["category"], 473000, "Argentina's gas-station MCC");
    assert_eq!(pump1["external_store_id"], "st01");
    assert_eq!(pump1["name"], "pump-1", "the name defaults to the POS id");
    let pump2 = st.pos("pump2");
    assert_eq!(
        pump2["url"],
        format!("https://station.example.com/mp/pos/pump-2?key={PUMP2_KEY}")
    );
    assert_eq!(pump2["name"], "Surtidor 2");
    let shop = st.pos("shop1");
    assert!(shop.get("url").is_none(), "attended: no url: {shop}");
    assert_eq!(shop["category"], 621102);
    assert_eq!(shop["fixed_amount"], true);

    // The table: what was done, the masked url, MP's ids and QR links.
    assert!(run.out.contains("created"), "{}", run.out);
    assert!(
        run.out
            .contains("https://station.example.com/mp/pos/pump-1?key=***"),
        "{}",
        run.out
    );
    let qr = pump1["qr"]["template_document"].as_str().unwrap();
    assert!(run.out.contains(qr), "{}", run.out);
    assert!(run.out.contains(&pump1["id"].to_string()), "{}", run.out);

    // Kept for the console, with the key masked.
    let store = SqliteStore::open(&st.db(), true).unwrap();
    let kept = store.registrations().await.unwrap();
    assert_eq!(kept.len(), 3, "{kept:#?}");
    let p1 = kept.iter().find(|r| r.pos == "pump-1").unwrap();
    assert_eq!(p1.mp_pos_id, pump1["id"].as_u64().unwrap());
    assert_eq!(p1.qr_image.as_deref(), pump1["qr"]["image"].as_str());
    assert_eq!(p1.qr_template_document.as_deref(), Some(qr));
    assert_eq!(
        p1.url.as_deref(),
        Some("https://station.example.com/mp/pos/pump-1?key=***")
    );
    assert_eq!(p1.action, "created");
    assert_eq!(p1.store, "st01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_changes_nothing_and_pos_list_then_says_everything_matches() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    let first = st.run(&["pos", "register"]).await;
    assert_eq!(first.code, 0, "{first:#?}");
    assert_eq!(first.writes().len(), 4, "one store, three POS: {first:#?}");

    let second = st.run(&["pos", "register"]).await;
    assert_eq!(second.code, 0, "{second:#?}");
    assert!(second.writes().is_empty(), "{:#?}", second.calls);
    assert!(!second.out.contains("created"), "{}", second.out);
    assert!(second.out.contains("unchanged"), "{}", second.out);
    assert_eq!(st.sim.pos_list().len(), 3);

    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 0, "{list:#?}");
    assert!(list.writes().is_empty());
    assert!(!list.out.contains("DIFFERS"), "{}", list.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_at_mercado_pago_is_listed_then_put_back() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    assert_eq!(st.run(&["pos", "register"]).await.code, 0);
    // Someone edits the POS and the store in MP's panel.
    st.sim
        .set_pos_field("pump1", "url", json!("https://old.example.com/pay?posid=1"))
        .unwrap();
    st.sim
        .set_pos_field("shop1", "name", json!("Caja vieja"))
        .unwrap();
    st.sim
        .set_store_field("st01", "name", json!("Otro nombre"))
        .unwrap();
    st.sim
        .set_pos_field("pump2", "fixed_amount", json!(false))
        .unwrap();

    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 1, "{list:#?}");
    assert!(list.writes().is_empty());
    assert!(
        list.out
            .contains("POS pump-1 url: Mercado Pago has \"https://old.example.com/pay?posid=1\""),
        "{}",
        list.out
    );
    assert!(list.out.contains("POS shop-1 name"), "{}", list.out);
    assert!(
        list.out
            .contains("POS pump-2 fixed_amount: Mercado Pago has false"),
        "{}",
        list.out
    );
    assert!(list.out.contains("store st01 name"), "{}", list.out);

    let dry = st.run(&["pos", "register", "--dry-run"]).await;
    assert_eq!(dry.code, 0, "{dry:#?}");
    assert!(dry.writes().is_empty(), "{:#?}", dry.calls);
    assert!(dry.out.contains("would update (url)"), "{}", dry.out);

    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let puts: Vec<&str> = run.writes().iter().map(|c| c.method.as_str()).collect();
    assert_eq!(puts, ["PUT", "PUT", "PUT", "PUT"], "{:#?}", run.calls);
    assert_eq!(st.pos("pump2")["fixed_amount"], true);
    assert_eq!(
        st.pos("pump1")["url"],
        format!("https://station.example.com/mp/pos/pump-1?key={POLL_KEY}")
    );
    assert_eq!(st.pos("shop1")["name"], "shop-1");
    assert_eq!(
        st.sim.store_by_external_id("st01").unwrap()["name"],
        "Estación Ruta 8"
    );
    assert!(run.out.contains("updated (url)"), "{}", run.out);
    assert_eq!(st.run(&["pos", "list"]).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_409_or_external_id_already_used_is_looked_up_and_updated() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    assert_eq!(st.run(&["pos", "register"]).await.code, 0);
    st.sim
        .set_pos_field("pump1", "url", json!("https://old.example.com/p1"))
        .unwrap();
    st.sim
        .set_store_field("st01", "name", json!("Otro nombre"))
        .unwrap();
    // MP's searches lag behind its writes: the next search for pump1 and for
    // st01 finds nothing (an injected empty 200), so qrgate creates them,
    // and MP answers that they exist.
    st.sim.fail_next("/pos?external_id=pump1", 200, 1);
    st.sim
        .fail_next("/users/178106235/stores/search?external_id=st01", 200, 1);

    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let seen: Vec<(String, u16)> = run
        .writes()
        .iter()
        .map(|c| {
            (
                format!("{} {}", c.method, c.path.split('?').next().unwrap()),
                c.status,
            )
        })
        .collect();
    assert!(
        seen.contains(&("POST /users/178106235/stores".into(), 400)),
        "{seen:?}"
    );
    assert!(seen.contains(&("POST /pos".into(), 409)), "{seen:?}");
    assert!(run.out.contains("it existed (409)"), "{}", run.out);
    assert!(
        run.out.contains("it existed (External_id-already-used)"),
        "{}",
        run.out
    );
    assert_eq!(st.sim.pos_list().len(), 3, "no second POS");
    assert_eq!(st.sim.stores().len(), 1, "no second store");
    assert_eq!(
        st.pos("pump1")["url"],
        format!("https://station.example.com/mp/pos/pump-1?key={POLL_KEY}")
    );
    assert_eq!(
        st.sim.store_by_external_id("st01").unwrap()["name"],
        "Estación Ruta 8"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_mp_has_not_enabled_fails_those_pos_only_and_says_whom_to_ask() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    st.sim
        .set_allowed_url_hosts(Some(vec!["other.example.com".into()]));
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.out
            .contains("POS pump-1: Mercado Pago refused the POS url (403)"),
        "{}",
        run.out
    );
    assert!(run.out.contains("station.example.com"), "{}", run.out);
    assert!(run.out.contains("technical advisor"), "{}", run.out);
    assert!(run.out.contains("2 failed"), "{}", run.out);
    assert!(run.out.contains("2 created"), "{}", run.out);
    // The attended POS has no url: it is registered all the same.
    assert!(st.sim.pos_by_external_id("shop1").is_some());
    assert!(st.sim.pos_by_external_id("pump1").is_none());

    // Once MP enables the host, a re-run finishes the job.
    st.sim.set_allowed_url_hosts(None);
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(st.sim.pos_list().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_changes_nothing_and_keeps_nothing() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    let run = st.run(&["pos", "register", "--dry-run"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.writes().is_empty(), "{:#?}", run.calls);
    assert!(!run.calls.is_empty(), "it looks");
    assert!(run.out.contains("Dry run"), "{}", run.out);
    assert_eq!(run.out.matches("would create").count(), 4, "{}", run.out);
    assert!(run.out.contains("4 to create"), "{}", run.out);
    assert!(st.sim.stores().is_empty() && st.sim.pos_list().is_empty());
    assert!(!st.db().exists(), "the store file is not even created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_list_exits_1_when_something_is_missing_and_2_on_an_error() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 1, "{list:#?}");
    assert!(list.out.contains("MISSING at Mercado Pago"), "{}", list.out);

    // A vending POS without a category cannot be compared: an error.
    st.write_config(&format!(
        "{STATION}{STORE}\n[[pos]]\nid = \"vend-9\"\nkind = \"vending\"\nstore = \"st01\"\n"
    ));
    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 2, "{list:#?}");
    assert!(
        list.out.contains("POS vend-9") && list.out.contains("category"),
        "{}",
        list.out
    );

    // MP down: an error, not a difference.
    st.write_config(&format!("{STATION}{STORE}"));
    st.sim.fail_next("/users", 500, 100);
    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 2, "{list:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_that_cannot_be_registered_are_named_and_the_others_still_are() {
    // vend-1 has no category, pump-9 no store, pump-8's store is nowhere,
    // vend-2's category is unknown to MP.
    let st = Station::new(&format!(
        r#"{STATION}{STORE}
[[pos]]
id = "vend-1"
kind = "vending"
store = "st01"
[[pos]]
id = "pump-9"
kind = "fuel"
[[pos]]
id = "pump-8"
kind = "fuel"
store = "st77"
[[pos]]
id = "vend-2"
kind = "vending"
store = "st01"
category = 999
"#
    ))
    .await;
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 1, "{run:#?}");
    let out = &run.out;
    assert!(
        out.contains("  POS vend-1 is a vending POS and has no category"),
        "{out}"
    );
    assert!(out.contains("  POS pump-9 has no store"), "{out}");
    assert!(
        out.contains("store \"st77\" (of POS pump-8) is neither in [[stores]] nor at Mercado Pago"),
        "{out}"
    );
    assert!(
        out.contains("POS vend-2: Mercado Pago does not know category 999"),
        "{out}"
    );
    assert!(
        out.contains("POS pump-8: not registered: its store \"st77\" failed"),
        "{out}"
    );
    assert!(
        out.contains("2 store(s), 7 POS: 4 created, 5 failed"),
        "{out}"
    );
    assert_eq!(
        st.sim.pos_list().len(),
        3,
        "the station's three POS are registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_only_at_mercado_pago_is_used_as_it_is() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    assert_eq!(st.run(&["pos", "register"]).await.code, 0);
    // The same POS, with [[stores]] gone: st01 is found at MP and used.
    st.write_config(STATION);
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.writes().is_empty(), "{:#?}", run.calls);
    assert!(run.out.contains("found (not in [[stores]]"), "{}", run.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pos_with_the_same_mp_external_id_stop_the_command_naming_both() {
    let st = Station::new(&format!(
        "{STORE}\n[[pos]]\nid = \"pump-1\"\nkind = \"fuel\"\nstore = \"st01\"\n\
         [[pos]]\nid = \"pump_1\"\nkind = \"fuel\"\nstore = \"st01\"\n"
    ))
    .await;
    for args in [
        &["pos", "register"][..],
        &["pos", "list"][..],
        &["serve"][..],
    ] {
        let run = st.run(args).await;
        assert_ne!(run.code, 0, "{run:#?}");
        assert!(
            run.err.contains("pump-1")
                && run.err.contains("pump_1")
                && run.err.contains("\"pump1\""),
            "{run:#?}"
        );
        assert!(run.calls.is_empty(), "nothing reaches Mercado Pago");
    }
    // A configuration error, whatever the subcommand (EX_CONFIG).
    assert_eq!(st.run(&["pos", "list"]).await.code, 78);
}

/// A station's real file: the console off loopback (it needs the operator's
/// token to serve) and devices with passwords. Registering needs neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_register_and_list_need_neither_the_consoles_token_nor_device_passwords() {
    let st = Station::new(&format!(
        "{STATION}{STORE}\n[admin]\nlisten = \"0.0.0.0:0\"\n"
    ))
    .await;
    let text = std::fs::read_to_string(&st.config)
        .unwrap()
        .replace("allow_anonymous = true", "allow_anonymous = false")
        .replace(
            "id = \"pump-1\"\n",
            "id = \"pump-1\"\ndevice_password_env = \"QRGATE_TEST_PUMP1_PW\"\n",
        );
    std::fs::write(&st.config, text).unwrap();
    // `serve` with this file stops on both missing secrets...
    let serve = st.run(&["check-config"]).await;
    assert_eq!(serve.code, 78, "{serve:#?}");
    assert!(
        serve.err.contains("QRGATE_ADMIN_TOKEN") && serve.err.contains("QRGATE_TEST_PUMP1_PW"),
        "{serve:#?}"
    );
    // ...registration needs only Mercado Pago's token.
    let run = st.run(&["pos", "register"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let list = st.run(&["pos", "list"]).await;
    assert_eq!(list.code, 0, "{list:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_access_token_the_command_says_which_variable_to_set() {
    let st = Station::new(&format!("{STATION}{STORE}")).await;
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&st.config)
        .args(["pos", "register"])
        .env_remove("QRGATE_MP_ACCESS_TOKEN")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QRGATE_MP_ACCESS_TOKEN"), "{err}");
    assert!(st.sim.api_calls().is_empty());
}

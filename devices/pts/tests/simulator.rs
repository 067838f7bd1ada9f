//! The PTS-2 simulator as the bridge's controller client sees it: HTTPS with
//! the pinned certificate, basic and digest logins, permissions, the pumps'
//! cycle with its transaction numbers, the error table, and remote mode's
//! WebSocket with its uploads sent again until confirmed.

#[path = "../../../tests/common/wait.rs"]
mod wait;

use futures_util::{SinkExt, StreamExt};
use qrgate_pts::auth::{Login, Scheme};
use qrgate_pts::controller::{Controller, Http, LinkError, Remote};
use qrgate_pts::jsonpts::{code, Message, PumpStatus, Request, TransactionInformation, Upload};
use qrgate_pts::sim::{Permissions, SimConfig, Simulator};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as Frame;
use wait::{wait_for, wait_for_event};

fn login() -> Login {
    Login {
        user: "qrgate".into(),
        password: "secret".into(),
    }
}

fn http(sim: &Simulator, login: Login, scheme: Scheme) -> Controller {
    let pin = sim.fingerprint();
    Controller::Http(Http::new(&sim.url(), login, scheme, pin.as_deref()).unwrap())
}

async fn status(c: &Controller, pump: u16) -> PumpStatus {
    let p = c.one(Request::PumpGetStatus { pump }).await.unwrap();
    PumpStatus::from_packet(&p).unwrap().unwrap()
}

async fn error_of(c: &Controller, r: Request) -> u32 {
    let p = c.one(r).await.unwrap();
    p.error().map(|e| e.code).unwrap_or(0)
}

#[tokio::test]
async fn over_https_with_the_certificate_pinned_and_digest_the_controller_answers() {
    let sim = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::new()
    })
    .await
    .unwrap();
    assert!(sim.url().starts_with("https://"));
    let c = http(&sim, login(), Scheme::Digest);
    assert!(matches!(status(&c, 1).await, PumpStatus::Idle(s) if s.pump == 1));
    // The challenge is kept: the next calls answer it without a 401 first.
    assert!(matches!(status(&c, 2).await, PumpStatus::Idle(_)));

    // Another certificate is refused, naming what it saw.
    let other = "00".repeat(32);
    let c = Controller::Http(Http::new(&sim.url(), login(), Scheme::Digest, Some(&other)).unwrap());
    let e = c.one(Request::PumpGetStatus { pump: 1 }).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, LinkError::Unreachable(_)), "{text}");
    assert!(text.contains(&sim.fingerprint().unwrap()), "{text}");
    // And https without a pin is a configuration error.
    assert!(Http::new(&sim.url(), login(), Scheme::Digest, None).is_err());
}

#[tokio::test]
async fn logins_and_permissions_are_checked_as_the_controller_does() {
    let sim = Simulator::start(SimConfig {
        scheme: Scheme::Basic,
        users: vec![
            (login(), Permissions::all()),
            (
                Login {
                    user: "watch".into(),
                    password: "w".into(),
                },
                Permissions {
                    monitoring: true,
                    ..Default::default()
                },
            ),
        ],
        ..SimConfig::new()
    })
    .await
    .unwrap();
    assert!(matches!(
        status(&http(&sim, login(), Scheme::Basic), 1).await,
        PumpStatus::Idle(_)
    ));
    let wrong = Login {
        password: "nope".into(),
        ..login()
    };
    let e = http(&sim, wrong, Scheme::Basic)
        .one(Request::PumpGetStatus { pump: 1 })
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Unauthorized(_)), "{e}");
    // Digest against a basic controller gets no challenge to answer.
    let e = http(&sim, login(), Scheme::Digest)
        .one(Request::PumpGetStatus { pump: 1 })
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Unauthorized(_)), "{e}");

    let watcher = http(
        &sim,
        Login {
            user: "watch".into(),
            password: "w".into(),
        },
        Scheme::Basic,
    );
    assert!(matches!(status(&watcher, 1).await, PumpStatus::Idle(_)));
    let e = watcher
        .one(Request::PumpCloseTransaction {
            pump: 1,
            transaction: 1,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, LinkError::Forbidden(_)), "{e}");
    assert!(e.to_string().contains("Control"), "{e}");
}

#[tokio::test]
async fn a_pump_fills_ends_and_is_closed_with_its_number_which_wraps_after_65535() {
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    let c = http(&sim, login(), Scheme::Digest);
    sim.set_next_transaction(1, 65535).unwrap();

    sim.lift_nozzle(1, 1).unwrap();
    assert!(matches!(status(&c, 1).await, PumpStatus::Idle(s) if s.nozzle_up() == 1));
    let n = sim.fill(1, "10.5").unwrap();
    assert_eq!(n, 65535);
    sim.fill(1, "2.25").unwrap();
    let PumpStatus::Filling(f) = status(&c, 1).await else {
        panic!("not filling")
    };
    assert_eq!(
        (f.transaction, f.volume.unwrap().to_string()),
        (65535, "12.75".into())
    );
    assert!(f.date_time_start.is_some());
    sim.hang_up(1).unwrap();
    let PumpStatus::EndOfTransaction(e) = status(&c, 1).await else {
        panic!("not ended")
    };
    assert_eq!(e.amount.unwrap().to_string(), "10174.50");
    assert_eq!(e.fuel_grade_name.as_deref(), Some("Super 95"));

    let close = |transaction| Request::PumpCloseTransaction {
        pump: 1,
        transaction,
    };
    assert_eq!(
        error_of(&c, close(7)).await,
        code::TRANSACTION_NUMBER_NOT_MATCH
    );
    assert!(c.one(close(65535)).await.unwrap().is_ok());
    assert_eq!(
        error_of(&c, close(65535)).await,
        code::PUMP_STATUS_NOT_END_OF_TRANSACTION
    );
    let PumpStatus::Idle(i) = status(&c, 1).await else {
        panic!("not idle")
    };
    assert_eq!(i.last_transaction, Some(65535));
    assert_eq!(sim.seen("PumpCloseTransaction"), 3);

    sim.lift_nozzle(1, 1).unwrap();
    assert_eq!(sim.fill(1, "1").unwrap(), 1, "the number wrapped");
}

#[tokio::test]
async fn the_error_table_answers_what_the_controller_cannot_do() {
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    let c = http(&sim, login(), Scheme::Digest);
    assert_eq!(
        error_of(&c, Request::PumpGetStatus { pump: 99 }).await,
        code::PUMP_NUMBER_OUT_OF_RANGE
    );
    sim.lift_nozzle(2, 1).unwrap();
    sim.fill(2, "1.000").unwrap();
    sim.hang_up(2).unwrap();

    // The shop's system locks it: closing it is another user's business.
    sim.forecourt()
        .answer(
            qrgate_pts::sim::SHOP_USER,
            Permissions::all(),
            r#"{"Protocol":"jsonPTS","Packets":[{"Id":1,"Type":"PumpLock","Data":{"Pump":2}}]}"#,
        )
        .unwrap();
    let p = c
        .one(Request::PumpCloseTransaction {
            pump: 2,
            transaction: 1,
        })
        .await
        .unwrap();
    let e = p.error().unwrap();
    assert_eq!(e.code, code::PUMP_BUSY_OTHER_USER);
    assert!(e.to_string().contains("shop"), "{e}");
    assert_eq!(
        error_of(&c, Request::PumpLock { pump: 2 }).await,
        code::PUMP_BUSY_OTHER_USER
    );
    assert_eq!(
        error_of(&c, Request::PumpUnlock { pump: 2 }).await,
        code::PUMP_IS_NOT_LOCKED_BY_USER
    );

    // Paid in the shop, left open: paying it again is error 102, and the
    // transaction says IsPaid.
    sim.mark_paid_in_shop(2).unwrap();
    let info: TransactionInformation = c
        .one(Request::PumpGetTransactionInformation {
            pump: 2,
            transaction: 1,
        })
        .await
        .unwrap()
        .data()
        .unwrap();
    assert_eq!(
        (info.state.as_str(), info.is_paid),
        ("EndOfTransaction", Some(true))
    );
    let payment = Request::PaymentCreateTransaction(qrgate_pts::jsonpts::PaymentForTransaction {
        pump: 2,
        transaction: 1,
        date_time: info.date_time.unwrap(),
        payments: vec![qrgate_pts::jsonpts::PaymentPart {
            amount: "798.00".parse().unwrap(),
            payment_form_id: 4,
        }],
    });
    assert_eq!(
        error_of(&c, payment).await,
        code::PUMP_TRANSACTION_ALREADY_PAID
    );

    // A message the controller cannot read, and a request it does not know.
    let raw = c.one(Request::GetUniqueIdentifier).await.unwrap();
    assert!(raw.error().is_none());
    let answer = sim
        .forecourt()
        .answer("qrgate", Permissions::all(), "{not json")
        .unwrap();
    assert_eq!(
        Message::parse(&answer).unwrap().error().unwrap().code,
        code::INVALID_JSON_REQUEST
    );
    let answer = sim
        .forecourt()
        .answer(
            "qrgate",
            Permissions::all(),
            r#"{"Protocol":"jsonPTS","Packets":[{"Id":3,"Type":"MakeNonExistingRequest"}]}"#,
        )
        .unwrap();
    assert_eq!(
        Message::parse(&answer).unwrap().packets[0]
            .error()
            .unwrap()
            .code,
        code::NOT_FOUND
    );
    let long = format!(
        "{{\"Protocol\":\"jsonPTS\",\"Packets\":[],\"x\":\"{}\"}}",
        "x".repeat(17000)
    );
    let answer = sim
        .forecourt()
        .answer("qrgate", Permissions::all(), &long)
        .unwrap();
    assert_eq!(
        Message::parse(&answer).unwrap().error().unwrap().code,
        code::JSON_REQUEST_IS_TOO_LONG
    );
}

#[tokio::test]
async fn in_remote_mode_requests_go_over_the_controllers_websocket_and_uploads_come_back() {
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ptsWebSocket", listener.local_addr().unwrap());
    let (uploads_tx, mut uploads) = tokio::sync::mpsc::channel(8);
    let (remote, _task) = Remote::listen(listener, Some(login()), uploads_tx);
    let c = Controller::Remote(remote.clone());
    sim.connect_remote(&url);
    wait_for("the controller's WebSocket", || async {
        remote.pts_id().is_some()
    })
    .await;
    assert_eq!(remote.pts_id(), Some(sim.id()));
    assert!(matches!(status(&c, 1).await, PumpStatus::Idle(_)));

    sim.lift_nozzle(1, 2).unwrap();
    sim.fill(1, "3").unwrap();
    sim.hang_up(1).unwrap();
    sim.pay_in_shop(1).unwrap();
    let up = wait_for_event("the transaction's upload", uploads.recv())
        .await
        .unwrap();
    assert_eq!(up.pts_id, Some(sim.id()));
    let Upload::PumpTransaction(t) = up.upload else {
        panic!("{:?}", up.upload)
    };
    assert_eq!((t.pump, t.transaction, t.is_paid), (1, 1, Some(true)));
    assert_eq!(t.amount.unwrap().to_string(), "2394.00");
    wait_for("the upload confirmed", || async {
        sim.forecourt().uploads.is_empty()
    })
    .await;
}

#[tokio::test]
async fn the_controller_sends_an_upload_again_until_the_server_confirms_it() {
    let sim = Simulator::start(SimConfig::new()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim.connect_remote(&format!(
        "ws://{}/ptsWebSocket",
        listener.local_addr().unwrap()
    ));
    let (tcp, _) = wait_for_event("the controller's connection", listener.accept())
        .await
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    sim.lift_nozzle(2, 1).unwrap();
    sim.fill(2, "1").unwrap();
    sim.hang_up(2).unwrap();
    sim.pay_in_shop(2).unwrap();

    // A server that answers with an error twice, then confirms.
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let frame = wait_for_event("an upload", ws.next())
            .await
            .unwrap()
            .unwrap();
        let Frame::Text(text) = frame else { continue };
        let m = Message::parse(&text).unwrap();
        let p = &m.packets[0];
        assert_eq!(p.kind, "UploadPumpTransaction");
        ids.push(p.id.0);
        let answer = if ids.len() < 3 {
            format!(
                r#"{{"Protocol":"jsonPTS","Packets":[{{"Id":{},"Type":"UploadPumpTransaction","Error":true,"Code":96,"Message":"JSONPTS_ERROR_OPERATION_ERROR"}}]}}"#,
                p.id.0
            )
        } else {
            format!(
                r#"{{"Protocol":"jsonPTS","Packets":[{{"Id":{},"Type":"UploadPumpTransaction","Message":"OK"}}]}}"#,
                p.id.0
            )
        };
        ws.send(Frame::Text(answer)).await.unwrap();
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "the same record: {ids:?}"
    );
    wait_for("the upload confirmed", || async {
        sim.forecourt().uploads.is_empty()
    })
    .await;
}

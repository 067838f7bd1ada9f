//! The bridge at work: one MQTT device per pump (`qrgate_devices::Device`,
//! so the contract is spoken exactly as the simulators speak it), one
//! `PumpGetStatus` message for all pumps about every second, and the
//! actions `decide` returns carried out in order: publishes on the pump's
//! POS, and locks and closes on the controller.
//!
//! One task does all of it, so a pump's actions never overlap: a close is
//! finished (and its `delivered` published) before the next status is read.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qrgate_devices::{Device, DeviceConfig, DeviceError, Item, StateMessage};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{BridgeConfig, Link};
use crate::controller::{Controller, Http, LinkError, Remote, Uploaded};
use crate::decide::{Action, CloseOutcome, PumpConfig, PumpMachine};
use crate::jsonpts::{
    code, PaymentConfirmation, PaymentForTransaction, PumpStatus, Request, TransactionInformation,
    UniqueIdentifier, Upload,
};

/// `PumpGetStatus` requests in one message (10 JSON tokens each; the
/// controller reads up to 600).
const PUMPS_PER_MESSAGE: usize = 40;

/// Failed polls in a row after which the pumps are told offline: one lost
/// answer is not an outage.
const OFFLINE_AFTER: u32 = 3;

/// A running bridge. Dropping it (or [`Bridge::stop`]) stops it; its POS
/// go offline through their last will.
pub struct Bridge {
    task: JoinHandle<()>,
    listener_task: Option<JoinHandle<()>>,
    remote_addr: Option<SocketAddr>,
}

impl Bridge {
    /// Connects every pump's POS to the broker (each announces itself
    /// online), binds the remote listener in remote mode, and starts
    /// polling.
    pub async fn start(cfg: BridgeConfig) -> anyhow::Result<Bridge> {
        let (uploads_tx, uploads_rx) = mpsc::channel(64);
        let (controller, remote_addr, listener_task) = match &cfg.link {
            Link::Http {
                url,
                login,
                scheme,
                certificate_sha256,
            } => {
                let http = Http::new(url, login.clone(), *scheme, certificate_sha256.as_deref())
                    .map_err(anyhow::Error::msg)?;
                info!(url = %url, user = %login.user, "controller over HTTP");
                (Controller::Http(http), None, None)
            }
            Link::Remote { listen, login } => {
                let listener = TcpListener::bind(listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("remote.listen {listen}: {e}"))?;
                let addr = listener.local_addr()?;
                let (remote, task) = Remote::listen(listener, login.clone(), uploads_tx);
                info!(listen = %addr, "waiting for the controller's WebSocket (remote mode)");
                (Controller::Remote(remote), Some(addr), Some(task))
            }
        };

        let mut devices = Vec::new();
        for p in &cfg.pumps {
            let mut dc = DeviceConfig::new(&cfg.mqtt.host, cfg.mqtt.port, &p.pos_id)
                .topic_prefix(&cfg.mqtt.topic_prefix)
                .client_id(&p.pos_id);
            if let Some(pw) = &p.mqtt_password {
                dc = dc.credentials(&p.pos_id, pw);
            }
            let device = Device::connect(dc)
                .await
                .map_err(|e| anyhow::anyhow!("pump {} (POS {}): {e}", p.pump, p.pos_id))?;
            info!(pos = %p.pos_id, pump = p.pump, "POS connected to the broker");
            devices.push(Arc::new(device));
        }
        let task = tokio::spawn(run(cfg, controller, devices, uploads_rx));
        Ok(Bridge {
            task,
            listener_task,
            remote_addr,
        })
    }

    /// Where the bridge listens for the controller (remote mode).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// Stops at once, as a crash would.
    pub fn stop(self) {}
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(t) = &self.listener_task {
            t.abort();
        }
    }
}

struct Run {
    controller: Controller,
    devices: Vec<Arc<Device>>,
    machines: Vec<PumpMachine>,
    failures: u32,
    /// Uploads seen, so a repeat is not logged again.
    uploads_seen: HashSet<(u16, u32, Option<String>)>,
    /// Where closes are recorded until their `delivered` is sent.
    closes: Option<CloseRecord>,
}

async fn run(
    cfg: BridgeConfig,
    controller: Controller,
    devices: Vec<Arc<Device>>,
    mut uploads: mpsc::Receiver<Uploaded>,
) {
    // Every device's state messages, tagged with the pump's index. They queue
    // in the device until read, so none is lost while the controller id is
    // asked.
    let (states_tx, mut states) = mpsc::channel::<(usize, StateMessage)>(256);
    let mut forwarders = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let d = Arc::clone(d);
        let tx = states_tx.clone();
        forwarders.push(tokio::spawn(async move {
            loop {
                match d.next_state(Duration::from_secs(3600)).await {
                    Ok(m) => {
                        if tx.send((i, m)).await.is_err() {
                            return;
                        }
                    }
                    Err(DeviceError::Timeout(_)) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    struct Abort(Vec<JoinHandle<()>>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.iter().for_each(JoinHandle::abort);
        }
    }
    let _forwarders = Abort(forwarders);

    let controller_id = controller_id(&cfg, &controller).await;
    info!(controller = %controller_id, pumps = cfg.pumps.len(), "bridge running");
    let closes = cfg.state_dir.as_ref().map(|d| CloseRecord {
        dir: d.join("closed"),
    });
    let mut machines: Vec<PumpMachine> = cfg
        .pumps
        .iter()
        .map(|p| {
            PumpMachine::new(PumpConfig {
                pump: p.pump,
                pos_id: p.pos_id.clone(),
                controller_id: controller_id.clone(),
                currency: cfg.currency.clone(),
                payment_form: cfg.payment_form,
                nozzle_titles: p.nozzles.clone(),
            })
        })
        .collect();
    if let Some(record) = &closes {
        for sale_id in record.read() {
            let machine = machines.iter_mut().find(|m| {
                let c = m.config();
                sale_id.starts_with(&format!("{}-{}-", c.controller_id, c.pump))
            });
            match machine {
                Some(m) => {
                    info!(%sale_id, "closed before the restart, delivered not yet said: said now if qrgate still shows it paid");
                    m.remember_closed(sale_id);
                }
                None => record.forget(&sale_id),
            }
        }
    }
    let mut run = Run {
        controller,
        devices,
        machines,
        failures: 0,
        uploads_seen: HashSet::new(),
        closes,
    };
    let mut tick = tokio::time::interval(cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => run.poll().await,
            Some((i, msg)) = states.recv() => {
                let actions = run.machines[i].heard(&msg);
                run.execute(i, actions).await;
            }
            Some(up) = uploads.recv() => run.uploaded(up).await,
        }
    }
}

/// The configured id, else the controller's answer to `GetUniqueIdentifier`,
/// asked until it comes.
async fn controller_id(cfg: &BridgeConfig, controller: &Controller) -> String {
    if let Some(id) = &cfg.controller_id {
        return id.clone();
    }
    let mut said = false;
    loop {
        let answer = controller.one(Request::GetUniqueIdentifier).await;
        match answer.map(|p| p.data::<UniqueIdentifier>()) {
            Ok(Ok(u)) if !u.id.is_empty() => {
                return u
                    .id
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(24)
                    .collect()
            }
            Ok(Ok(_)) | Ok(Err(_)) if !said => {
                error!("the controller's GetUniqueIdentifier answer has no id: set controller.id");
                said = true;
            }
            Err(e) if !said => {
                warn!("cannot ask the controller its id yet, retrying: {e}");
                said = true;
            }
            _ => {}
        }
        tokio::time::sleep(cfg.poll_interval).await;
    }
}

impl Run {
    async fn poll(&mut self) {
        let requests: Vec<Request> = self
            .machines
            .iter()
            .map(|m| Request::PumpGetStatus {
                pump: m.config().pump,
            })
            .collect();
        let now = chrono::Local::now().format("%Y%m%d%H%M%S").to_string();
        // The controller reads messages of up to 600 JSON tokens: about 50
        // of these requests.
        let mut answers = Vec::with_capacity(requests.len());
        let mut failed = None;
        for chunk in requests.chunks(PUMPS_PER_MESSAGE) {
            match self.controller.call(chunk).await {
                Ok(packets) => answers.extend(packets),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed.map_or(Ok(answers), Err) {
            Ok(packets) => {
                if self.failures >= OFFLINE_AFTER {
                    info!("the controller answers again");
                }
                self.failures = 0;
                for (i, packet) in packets.iter().enumerate() {
                    let actions = match PumpStatus::from_packet(packet) {
                        Ok(Ok(status)) => self.machines[i].observe(&status, &now),
                        Ok(Err(e)) => {
                            let m = &self.machines[i];
                            warn!(pos = %m.config().pos_id, pump = m.config().pump, "PumpGetStatus: {e}");
                            self.machines[i].unreachable()
                        }
                        Err(e) => {
                            warn!(pos = %self.machines[i].config().pos_id, "unreadable status: {e}");
                            Vec::new()
                        }
                    };
                    self.execute(i, actions).await;
                }
            }
            Err(e) => {
                self.failures += 1;
                if self.failures == OFFLINE_AFTER {
                    error!("the controller does not answer, its pumps are offline: {e}");
                    for i in 0..self.machines.len() {
                        let actions = self.machines[i].unreachable();
                        self.execute(i, actions).await;
                    }
                } else if self.failures < OFFLINE_AFTER {
                    warn!("PumpGetStatus failed: {e}");
                }
            }
        }
    }

    async fn uploaded(&mut self, up: Uploaded) {
        let Upload::PumpTransaction(t) = up.upload else {
            return;
        };
        let key = (t.pump, t.transaction, t.date_time_start.clone());
        if self.uploads_seen.len() > 10_000 {
            self.uploads_seen.clear();
        }
        if self.uploads_seen.insert(key) {
            info!(pump = t.pump, transaction = t.transaction, paid = ?t.is_paid, "the controller uploaded a finished transaction");
        }
        if let Some(i) = self.machines.iter().position(|m| m.config().pump == t.pump) {
            let actions = self.machines[i].uploaded(t.transaction);
            self.execute(i, actions).await;
        }
    }

    async fn execute(&mut self, i: usize, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let pos = self.machines[i].config().pos_id.clone();
            let pump = self.machines[i].config().pump;
            let device = Arc::clone(&self.devices[i]);
            let sent = match &action {
                Action::Presence(online) => {
                    info!(%pos, pump, online, "pump {}", if *online { "online" } else { "offline" });
                    device.set_status(*online).await
                }
                Action::Progress { sale_id } => {
                    info!(%pos, pump, %sale_id, "filling: progress");
                    device.progress(sale_id).await
                }
                Action::Sale(s) => {
                    info!(%pos, pump, sale_id = %s.sale_id, amount = %s.amount, quantity = %s.quantity, title = %s.title, "end of transaction: sale");
                    let mut item = Item::new(&s.title, &s.quantity, &s.unit_price)
                        .unit_measure(&s.unit_measure);
                    if let Some(d) = &s.description {
                        item = item.description(d);
                    }
                    device
                        .publish_sale(&s.sale_id, &[item], Some(&s.amount))
                        .await
                }
                Action::Cancel { sale_id } => {
                    info!(%pos, pump, %sale_id, "transaction closed at the station unpaid: cancel");
                    device.cancel(sale_id).await
                }
                Action::Delivered {
                    sale_id,
                    ok,
                    reason,
                } => {
                    if *ok {
                        info!(%pos, pump, %sale_id, "transaction closed: delivered");
                    } else {
                        warn!(%pos, pump, %sale_id, reason = reason.as_deref().unwrap_or(""), "paid but not closed by the bridge: delivered not ok, the payment is owed back");
                    }
                    let said = device.delivered(sale_id, *ok, reason.as_deref()).await;
                    if said.is_ok() {
                        if let Some(record) = &self.closes {
                            record.forget(sale_id);
                        }
                    }
                    said
                }
                Action::Lock {
                    sale_id,
                    transaction,
                } => {
                    let ok = self.lock(pump, true).await;
                    match &ok {
                        Ok(()) => {
                            info!(%pos, pump, %sale_id, transaction, "served: transaction locked against cash")
                        }
                        Err(e) => {
                            warn!(%pos, pump, %sale_id, transaction, "served, but the transaction could not be locked against cash: {e}")
                        }
                    }
                    self.machines[i].locked(ok.is_ok());
                    Ok(())
                }
                Action::Unlock { sale_id } => {
                    if let Err(e) = self.lock(pump, false).await {
                        warn!(%pos, pump, %sale_id, "pump not unlocked: {e}");
                    }
                    Ok(())
                }
                Action::Close {
                    sale_id,
                    transaction,
                    payment,
                } => {
                    let outcome = self.close(pump, *transaction, payment.clone()).await;
                    match &outcome {
                        CloseOutcome::Closed => {
                            info!(%pos, pump, %sale_id, transaction, "paid: transaction closed");
                            if let Some(record) = &self.closes {
                                if let Err(e) = record.write(sale_id) {
                                    error!(%pos, pump, %sale_id, "cannot record the close: a restart before `delivered` is sent would deliver it not ok: {e}");
                                }
                            }
                        }
                        CloseOutcome::Retry(why) => {
                            warn!(%pos, pump, %sale_id, transaction, "paid, close to be tried again: {why}")
                        }
                        other => {
                            warn!(%pos, pump, %sale_id, transaction, "paid, not closed by the bridge: {other:?}")
                        }
                    }
                    queue.extend(self.machines[i].closed(outcome));
                    Ok(())
                }
            };
            if let Err(e) = sent {
                error!(%pos, pump, "not published, said again when it still matters: {e}");
                self.machines[i].unsent(&action);
            }
        }
    }

    async fn lock(&self, pump: u16, lock: bool) -> Result<(), String> {
        let request = if lock {
            Request::PumpLock { pump }
        } else {
            Request::PumpUnlock { pump }
        };
        match self.controller.one(request).await {
            // Not locked (any more): the close released it, which is the point.
            Ok(p)
                if !lock
                    && p.error()
                        .is_some_and(|e| e.code == code::PUMP_IS_NOT_LOCKED_BY_USER) =>
            {
                Ok(())
            }
            Ok(p) => p.error().map_or(Ok(()), |e| Err(e.to_string())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Closes a paid transaction: checks it is still open and unpaid on the
    /// controller, records the payment where a payment form is set, closes.
    async fn close(
        &self,
        pump: u16,
        transaction: u32,
        payment: Option<PaymentForTransaction>,
    ) -> CloseOutcome {
        let retry = |e: LinkError| CloseOutcome::Retry(e.to_string());
        // What the controller knows of it; a firmware that cannot say
        // (no SD card, an older release) does not stop the close.
        let info = self
            .controller
            .one(Request::PumpGetTransactionInformation { pump, transaction })
            .await;
        match info.map(|p| p.data::<TransactionInformation>().ok().filter(|_| p.error().is_none())) {
            Err(e) => return retry(e),
            Ok(Some(t)) if t.is_paid == Some(true) => {
                return CloseOutcome::PaidElsewhere(format!(
                    "the controller says transaction {transaction} is already paid (IsPaid): paid at the station"
                ))
            }
            Ok(Some(t)) if t.state == "Finished" => {
                return CloseOutcome::ClosedElsewhere(format!(
                    "transaction {transaction} was already closed on the controller"
                ))
            }
            Ok(_) => {}
        }
        if let Some(p) = payment {
            match self
                .controller
                .one(Request::PaymentCreateTransaction(p))
                .await
            {
                Err(e) => return retry(e),
                Ok(answer) => match answer.error() {
                    Some(e) if e.code == code::PUMP_TRANSACTION_ALREADY_PAID => {
                        return CloseOutcome::PaidElsewhere(format!("{e}: paid at the station"))
                    }
                    Some(e) => warn!(
                        pump,
                        transaction,
                        "payment not recorded on the controller, closing all the same: {e}"
                    ),
                    None => {
                        if let Ok(c) = answer.data::<PaymentConfirmation>() {
                            info!(
                                pump,
                                transaction,
                                payment_transaction = c.payment_transaction,
                                "payment recorded on the controller"
                            );
                        }
                    }
                },
            }
        }
        match self
            .controller
            .one(Request::PumpCloseTransaction { pump, transaction })
            .await
        {
            Err(e) => retry(e),
            Ok(answer) => match answer.error() {
                None => CloseOutcome::Closed,
                Some(e) => match e.code {
                    code::PUMP_TRANSACTION_ALREADY_PAID => {
                        CloseOutcome::PaidElsewhere(format!("{e}: paid at the station"))
                    }
                    code::PUMP_STATUS_NOT_END_OF_TRANSACTION
                    | code::PUMP_TRANSACTION_NOT_FOUND
                    | code::TRANSACTION_NUMBER_NOT_MATCH => {
                        CloseOutcome::ClosedElsewhere(format!("{e}: closed at the station"))
                    }
                    code::PUMP_BUSY_OTHER_REQUEST_EXECUTED | code::DATA_IS_NOT_READY => {
                        CloseOutcome::Retry(e.to_string())
                    }
                    _ => CloseOutcome::Refused(e.to_string()),
                },
            },
        }
    }
}

/// The transactions the bridge closed and has not yet said `delivered`
/// for: one empty file per sale id, written (and synced) once the
/// controller confirmed the close, removed once `delivered` was sent. After
/// a restart, a paid sale found closed with a record here was closed by
/// the bridge; without one, the bridge cannot tell it from a sale settled at
/// the station, and delivers it `ok: false`.
struct CloseRecord {
    dir: std::path::PathBuf,
}

impl CloseRecord {
    fn path(&self, sale_id: &str) -> Option<std::path::PathBuf> {
        // Our own sale ids; anything else is not ours to name a file after.
        let safe = !sale_id.is_empty()
            && sale_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+'));
        (safe && !sale_id.starts_with('.')).then(|| self.dir.join(sale_id))
    }

    fn write(&self, sale_id: &str) -> std::io::Result<()> {
        let path = self.path(sale_id).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a sale id of ours")
        })?;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::File::create(&path)?.sync_all()?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    fn forget(&self, sale_id: &str) {
        if let Some(path) = self.path(sale_id) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn read(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_recorded_until_forgotten_and_only_under_a_sale_id_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let record = CloseRecord {
            dir: dir.path().join("closed"),
        };
        assert!(record.read().is_empty(), "nothing before the first close");
        let id = "003A003A3435510938393730-3-41-2025-11-04T10:00:00";
        record.write(id).unwrap();
        assert_eq!(record.read(), [id]);
        // What a restart reads back, until `delivered` was sent.
        record.forget(id);
        assert!(record.read().is_empty());
        for bad in ["", "../escape", ".hidden", "a/b"] {
            assert!(record.write(bad).is_err(), "{bad:?}");
        }
        assert!(record.read().is_empty());
    }
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::info;

use crate::{Device, DeviceConfig, DeviceError, Item, StateMessage};

/// A fuel pump controller: the amount is only known once the nozzle is hung
/// up, so a sale starts with `progress` and becomes a priced `sale` later.
#[derive(Debug)]
pub struct Pump {
    device: Device,
}

impl Pump {
    /// Connects a pump playing `cfg.pos_id`.
    pub async fn connect(cfg: DeviceConfig) -> Result<Pump, DeviceError> {
        let device = Device::connect(cfg).await?;
        info!("pump {}: online", device.pos_id());
        Ok(Pump { device })
    }

    /// The underlying connection, for anything the simulator does not cover.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Nozzle lifted: tells qrgate a sale started (publishes `progress`).
    pub async fn start_fuelling(&self, sale_id: &str) -> Result<(), DeviceError> {
        info!(
            "pump {}: nozzle lifted, fuelling (sale {sale_id})",
            self.device.pos_id()
        );
        self.device.progress(sale_id).await
    }

    /// Nozzle hung up: publishes the sale with one line of `litres` of
    /// `product` at `price_per_litre`, leaving the total to qrgate.
    pub async fn finish_fuelling(
        &self,
        sale_id: &str,
        product: &str,
        litres: &str,
        price_per_litre: &str,
    ) -> Result<(), DeviceError> {
        info!(
            "pump {}: nozzle hung up, {litres} L of {product} at {price_per_litre}/L (sale {sale_id})",
            self.device.pos_id()
        );
        let item = Item::new(product, litres, price_per_litre).unit_measure("litre");
        self.device
            .publish_sale(sale_id, std::slice::from_ref(&item), None)
            .await
    }

    /// Waits until `sale_id` is paid, releases the pump and confirms with
    /// `delivered` (`ok: true`). Returns the `paid` message.
    pub async fn wait_paid_and_release(
        &self,
        sale_id: &str,
        timeout: Duration,
    ) -> Result<StateMessage, DeviceError> {
        let paid = self.device.wait_for(sale_id, "paid", timeout).await?;
        info!(
            "pump {}: sale {sale_id} paid (payment {}), pump released",
            self.device.pos_id(),
            paid.payment_id
                .map_or_else(|| "?".to_string(), |id| id.to_string())
        );
        self.device.delivered(sale_id, true, None).await?;
        Ok(paid)
    }
}

/// A vending machine controller: the customer picks products, the machine
/// asks for payment up front and dispenses once paid.
#[derive(Debug)]
pub struct VendingMachine {
    device: Device,
    jammed: AtomicBool,
}

/// What a jammed machine reports in `delivered`.
const JAM_REASON: &str = "dispenser jammed";

impl VendingMachine {
    /// Connects a vending machine playing `cfg.pos_id`.
    pub async fn connect(cfg: DeviceConfig) -> Result<VendingMachine, DeviceError> {
        let device = Device::connect(cfg).await?;
        info!("vending machine {}: online", device.pos_id());
        Ok(VendingMachine {
            device,
            jammed: AtomicBool::new(false),
        })
    }

    /// The underlying connection, for anything the simulator does not cover.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The customer picked `items`: publishes the sale without an amount, so
    /// qrgate computes it.
    pub async fn select(&self, sale_id: &str, items: &[Item]) -> Result<(), DeviceError> {
        info!(
            "vending machine {}: selected {} (sale {sale_id})",
            self.device.pos_id(),
            describe(items)
        );
        self.device.publish_sale(sale_id, items, None).await
    }

    /// Like [`select`](VendingMachine::select) but also sends `amount`, which
    /// qrgate checks against the lines.
    pub async fn select_with_amount(
        &self,
        sale_id: &str,
        items: &[Item],
        amount: &str,
    ) -> Result<(), DeviceError> {
        info!(
            "vending machine {}: selected {} for {amount} (sale {sale_id})",
            self.device.pos_id(),
            describe(items)
        );
        self.device.publish_sale(sale_id, items, Some(amount)).await
    }

    /// Waits until `sale_id` is paid, dispenses and confirms with `delivered`:
    /// `ok: true`, or `ok: false` with a reason while jammed. Returns the
    /// `paid` message either way.
    pub async fn wait_paid_and_dispense(
        &self,
        sale_id: &str,
        timeout: Duration,
    ) -> Result<StateMessage, DeviceError> {
        let paid = self.device.wait_for(sale_id, "paid", timeout).await?;
        let pos = self.device.pos_id();
        if self.jammed.load(Ordering::SeqCst) {
            info!("vending machine {pos}: sale {sale_id} paid but the dispenser is jammed");
            self.device
                .delivered(sale_id, false, Some(JAM_REASON))
                .await?;
        } else {
            info!("vending machine {pos}: sale {sale_id} paid, dispensing");
            self.device.delivered(sale_id, true, None).await?;
        }
        Ok(paid)
    }

    /// Makes later dispenses fail (`delivered` with `ok: false`), or work again.
    pub fn set_jam(&self, jammed: bool) {
        info!(
            "vending machine {}: dispenser {}",
            self.device.pos_id(),
            if jammed { "jammed" } else { "fixed" }
        );
        self.jammed.store(jammed, Ordering::SeqCst);
    }
}

fn describe(items: &[Item]) -> String {
    items
        .iter()
        .map(|i| format!("{} x {} at {}", i.quantity, i.title, i.unit_price))
        .collect::<Vec<_>>()
        .join(", ")
}

//! Refunds qrgate makes itself (`[orders] auto_refund`): late payments and
//! failed deliveries, each refunded in full once, with an idempotency key
//! derived from the payment so a retry or a restart never refunds twice.
//! Refunds that came due with `auto_refund` off stay for the operator.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::mercadopago::client::{MpClient, MpError};
use crate::orders::sale::RefundDue;
use crate::orders::MpId;

/// The key Mercado Pago deduplicates a refund by.
pub fn idempotency_key(payment_id: &MpId) -> String {
    format!("qrgate-refund-{payment_id}")
}

/// A full refund: of the payment (classic API), or of the order that the
/// Orders API's text payment id belongs to.
async fn refund(client: &MpClient, r: &RefundDue) -> Result<MpId, MpError> {
    let key = idempotency_key(&r.payment_id);
    // An Orders API order (text id) is refunded through the order,
    // whatever its payment id looks like.
    match (&r.merchant_order, &r.payment_id) {
        (MpId::Text(order), _) => client.refund_order(order, &key).await,
        (MpId::Num(_), MpId::Num(payment)) => client.refund(*payment, &key).await.map(MpId::Num),
        (MpId::Num(mo), MpId::Text(p)) => Err(MpError::Decode(format!(
            "payment {p} of merchant order {mo} is not a refundable id"
        ))),
    }
}

pub async fn run(client: MpClient, gateway: Arc<Gateway>, shutdown: CancellationToken) {
    let wake = gateway.refunds_due();
    // Payments MP refused to refund (a final 4xx): left to the operator,
    // not retried every round.
    let mut refused: HashSet<MpId> = HashSet::new();
    loop {
        // Pending refunds are also looked at now and then, so one whose call
        // failed (or was cut by a crash) is retried.
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = shutdown.cancelled() => return,
        }
        let sales = match gateway.store().pending_auto_refunds().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read refunds due from the store");
                continue;
            }
        };
        for sale in sales {
            let owed: Vec<_> = sale
                .refunds
                .iter()
                .filter(|r| r.auto && r.refunded.is_none() && !refused.contains(&r.payment_id))
                .collect();
            for r in owed {
                let made = refund(&client, r).await;
                let result = if made.is_ok() { "ok" } else { "error" };
                gateway
                    .metrics()
                    .refunds
                    .with_label_values(&["auto", result])
                    .inc();
                match made {
                    Ok(refund_id) => {
                        if let Err(e) = gateway
                            .record_refund(
                                &sale.external_reference,
                                &r.payment_id,
                                refund_id.clone(),
                            )
                            .await
                        {
                            tracing::error!(external_reference = %sale.external_reference, payment = %r.payment_id,
                                refund = %refund_id, error = %e, "refund made but not recorded; retried (idempotent)");
                        }
                    }
                    Err(e) if e.is_transient() => {
                        tracing::warn!(external_reference = %sale.external_reference, payment = %r.payment_id,
                            error = %e, "refund failed; retried later");
                    }
                    Err(e) => {
                        tracing::error!(pos = %sale.pos, sale_id = %sale.sale_id, external_reference = %sale.external_reference,
                            payment = %r.payment_id, error = %e, "Mercado Pago refused the refund: refund it by hand");
                        refused.insert(r.payment_id.clone());
                    }
                }
            }
        }
    }
}

//! `x-signature` of panel-configured webhooks (docs/mercadopago.md, "Signatures"):
//! `ts=…,v1=<hex HMAC-SHA256>` over `id:{data.id};request-id:{x-request-id};ts:{ts};`,
//! a part left out when its value is missing. MP's docs lowercase an
//! alphanumeric `data.id` before signing while some SDKs kept its case: both
//! are accepted. `ts` may be seconds or milliseconds. An optional defence:
//! the merchant order is fetched and checked whatever the signature says.

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("x-signature is malformed")]
    Malformed,
    #[error("x-signature timestamp is outside the tolerance window")]
    Stale,
    #[error("x-signature does not match")]
    Mismatch,
}

fn manifest(data_id: Option<&str>, request_id: Option<&str>, ts: &str) -> String {
    let mut m = String::new();
    if let Some(id) = data_id {
        m.push_str(&format!("id:{id};"));
    }
    if let Some(r) = request_id {
        m.push_str(&format!("request-id:{r};"));
    }
    m.push_str(&format!("ts:{ts};"));
    m
}

fn matches(secret: &[u8], text: &str, expected: &[u8]) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(text.as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(expected).is_ok()
}

/// Verifies `header` (the value of `x-signature`) at `now_secs`.
pub fn verify(
    header: &str,
    data_id: Option<&str>,
    request_id: Option<&str>,
    secret: &str,
    now_secs: i64,
    tolerance_secs: u64,
) -> Result<(), SignatureError> {
    let mut ts = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("ts", v)) => ts = Some(v.trim()),
            Some(("v1", v)) => v1 = Some(v.trim()),
            _ => {}
        }
    }
    let (Some(ts), Some(v1)) = (ts, v1) else {
        return Err(SignatureError::Malformed);
    };
    let ts_num: i64 = ts.parse().map_err(|_| SignatureError::Malformed)?;
    let expected = hex::decode(v1).map_err(|_| SignatureError::Malformed)?;
    let secs = if ts_num > 1_000_000_000_000 {
        ts_num / 1000
    } else {
        ts_num
    };
    if now_secs.abs_diff(secs) > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    let lower = data_id.map(str::to_ascii_lowercase);
    let candidates = [data_id, lower.as_deref()];
    if candidates
        .iter()
        .any(|id| matches(secret.as_bytes(), &manifest(*id, request_id, ts), &expected))
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
pub fn sign(data_id: Option<&str>, request_id: Option<&str>, ts: &str, secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(manifest(data_id, request_id, ts).as_bytes());
    format!("ts={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_704_908_010;

    #[test]
    fn a_good_signature_verifies_in_seconds_or_milliseconds() {
        let h = sign(Some("123"), Some("req-1"), "1704908010", "s3cret");
        assert_eq!(
            verify(&h, Some("123"), Some("req-1"), "s3cret", NOW, 300),
            Ok(())
        );
        let h = sign(Some("123"), Some("req-1"), "1704908010123", "s3cret");
        assert_eq!(
            verify(&h, Some("123"), Some("req-1"), "s3cret", NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn the_case_of_an_alphanumeric_id_may_be_kept_or_lowered() {
        let kept = sign(Some("ABC123"), None, "1704908010", "k");
        let lowered = sign(Some("abc123"), None, "1704908010", "k");
        assert_eq!(verify(&kept, Some("ABC123"), None, "k", NOW, 300), Ok(()));
        assert_eq!(
            verify(&lowered, Some("ABC123"), None, "k", NOW, 300),
            Ok(())
        );
    }

    #[test]
    fn wrong_secret_other_id_stale_or_malformed_fail() {
        let h = sign(Some("1"), Some("r"), "1704908010", "right");
        assert_eq!(
            verify(&h, Some("1"), Some("r"), "wrong", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, Some("2"), Some("r"), "right", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, Some("1"), None, "right", NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&h, Some("1"), Some("r"), "right", NOW + 301, 300),
            Err(SignatureError::Stale)
        );
        for bad in ["", "ts=1", "v1=ab", "ts=x,v1=ab", "ts=1704908010,v1=zz"] {
            assert_eq!(
                verify(bad, Some("1"), None, "right", NOW, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }
}

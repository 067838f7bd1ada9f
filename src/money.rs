//! Currencies and exact amounts. No floats anywhere: every amount is a
//! [`Decimal`] checked against its currency's decimals (docs/mercadopago.md,
//! "Currencies") and rendered with exactly that many decimals.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::value::RawValue;

/// The currencies of the Mercado Pago sites that sell QR payments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Currency {
    Ars,
    Brl,
    Clp,
    Cop,
    Mxn,
    Pen,
    Uyu,
}

impl Currency {
    pub const ALL: [Currency; 7] = [
        Currency::Ars,
        Currency::Brl,
        Currency::Clp,
        Currency::Cop,
        Currency::Mxn,
        Currency::Pen,
        Currency::Uyu,
    ];

    /// ISO 4217 code, as Mercado Pago's `currency_id`.
    pub fn code(self) -> &'static str {
        match self {
            Currency::Ars => "ARS",
            Currency::Brl => "BRL",
            Currency::Clp => "CLP",
            Currency::Cop => "COP",
            Currency::Mxn => "MXN",
            Currency::Pen => "PEN",
            Currency::Uyu => "UYU",
        }
    }

    /// Decimals of an amount: CLP and COP are whole.
    pub fn decimals(self) -> u32 {
        match self {
            Currency::Clp | Currency::Cop => 0,
            _ => 2,
        }
    }

    /// Decimals a unit price may carry: at most 2 everywhere, none where the
    /// currency is whole (docs/decisions.md, "Money").
    pub fn unit_price_decimals(self) -> u32 {
        self.decimals().min(2)
    }
}

/// A Mercado Pago site (country): one account, one site, one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    Mla,
    Mlb,
    Mlc,
    Mco,
    Mlm,
    Mpe,
    Mlu,
}

impl Site {
    pub const ALL: [Site; 7] = [
        Site::Mla,
        Site::Mlb,
        Site::Mlc,
        Site::Mco,
        Site::Mlm,
        Site::Mpe,
        Site::Mlu,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Site::Mla => "MLA",
            Site::Mlb => "MLB",
            Site::Mlc => "MLC",
            Site::Mco => "MCO",
            Site::Mlm => "MLM",
            Site::Mpe => "MPE",
            Site::Mlu => "MLU",
        }
    }

    pub fn currency(self) -> Currency {
        match self {
            Site::Mla => Currency::Ars,
            Site::Mlb => Currency::Brl,
            Site::Mlc => Currency::Clp,
            Site::Mco => Currency::Cop,
            Site::Mlm => Currency::Mxn,
            Site::Mpe => Currency::Pen,
            Site::Mlu => Currency::Uyu,
        }
    }

    pub fn of(currency: Currency) -> Site {
        Site::ALL
            .into_iter()
            .find(|s| s.currency() == currency)
            .unwrap_or(Site::Mla)
    }

    /// The merchant category code of a gas station at this site (the
    /// `category` of a fuel POS).
    pub fn gas_station_mcc(self) -> u32 {
        match self {
            Site::Mla => 473000,
            Site::Mlb => 4731300,
            Site::Mlc => 473001,
            Site::Mco => 4731,
            Site::Mlm => 468419,
            Site::Mpe => 5050,
            Site::Mlu => 47300,
        }
    }
}

impl FromStr for Site {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Site::ALL
            .into_iter()
            .find(|c| c.code().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("{s:?} is not a site: one of MLA MLB MLC MCO MLM MPE MLU"))
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::ALL
            .into_iter()
            .find(|c| c.code() == s)
            .ok_or_else(|| MoneyError::UnknownCurrency(s.chars().take(16).collect()))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency {0:?}")]
    UnknownCurrency(String),
    #[error("not a decimal number: {0:?}")]
    NotANumber(String),
    #[error("{0:?} is not a plain decimal: write digits, optionally a '.' and more digits (\"1000\", \"10.50\")")]
    NotPlainDecimal(String),
    #[error("{what} must be greater than zero, got {value}")]
    NotPositive { what: &'static str, value: Decimal },
    #[error("{what} {value} has more than {max} decimals")]
    TooManyDecimals {
        what: &'static str,
        value: Decimal,
        max: u32,
    },
    #[error("{what} {value} is larger than {max}")]
    TooLarge {
        what: &'static str,
        value: Decimal,
        max: Decimal,
    },
}

/// Most decimals a quantity may carry (litres to the millilitre).
pub const QUANTITY_DECIMALS: u32 = 3;

/// Parses the text of a JSON number or a decimal string from Mercado Pago (and
/// qrgate's own config). Lenient on purpose: scientific notation is valid JSON
/// and Mercado Pago's numbers are not ours to police. Device and operator input
/// goes through [`parse_plain_decimal`] instead.
pub fn parse_decimal(text: &str) -> Result<Decimal, MoneyError> {
    let t = text.trim();
    let bad = || MoneyError::NotANumber(t.chars().take(32).collect());
    if t.is_empty() || t.len() > MAX_NUMBER_TEXT {
        return Err(bad());
    }
    let parsed = if t.contains(['e', 'E']) {
        Decimal::from_scientific(t)
    } else {
        Decimal::from_str_exact(t)
    };
    parsed.map_err(|_| bad())
}

/// Longest number text either parser reads: far beyond any amount we accept
/// (28 significant digits is all a `Decimal` holds), short enough that a
/// refusal never echoes much.
const MAX_NUMBER_TEXT: usize = 40;

/// Parses a number as a device or an operator writes it: exactly
/// `-?[0-9]+(\.[0-9]+)?`, nothing around it. The device contract promises
/// plain decimals only, and `Decimal`'s own parsers read more than that
/// (`"1_000"` as 1000, `"1."`, `"+1"`, exponents), so a typo or a foreign
/// number format would become a different amount instead of a refusal.
/// Mercado Pago's JSON is read by [`parse_decimal`], not this.
pub fn parse_plain_decimal(text: &str) -> Result<Decimal, MoneyError> {
    let bad = || MoneyError::NotPlainDecimal(text.chars().take(24).collect());
    if text.len() > MAX_NUMBER_TEXT || !is_plain_decimal(text) {
        return Err(bad());
    }
    // Only precision can fail here (more than 28 significant digits).
    Decimal::from_str_exact(text).map_err(|_| bad())
}

/// `-?[0-9]+(\.[0-9]+)?`, ASCII digits only.
fn is_plain_decimal(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    match unsigned.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(unsigned),
    }
}

/// Decimals actually carried by a value: `10.50` carries 1, `10.00` none.
fn significant_decimals(value: Decimal) -> u32 {
    value.normalize().scale()
}

fn check(
    what: &'static str,
    value: Decimal,
    max_decimals: u32,
    max: Decimal,
) -> Result<Decimal, MoneyError> {
    if value <= Decimal::ZERO {
        return Err(MoneyError::NotPositive { what, value });
    }
    if significant_decimals(value) > max_decimals {
        return Err(MoneyError::TooManyDecimals {
            what,
            value,
            max: max_decimals,
        });
    }
    if value > max {
        return Err(MoneyError::TooLarge { what, value, max });
    }
    Ok(value.normalize())
}

/// Upper bound of any single number we accept from a device; keeps every
/// product and sum far from `Decimal`'s overflow.
pub const MAX_NUMBER: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

/// A positive quantity with at most [`QUANTITY_DECIMALS`] decimals.
pub fn quantity(value: Decimal) -> Result<Decimal, MoneyError> {
    check("quantity", value, QUANTITY_DECIMALS, MAX_NUMBER)
}

/// A positive unit price with the decimals the currency allows for prices.
pub fn unit_price(value: Decimal, currency: Currency) -> Result<Decimal, MoneyError> {
    check(
        "unit_price",
        value,
        currency.unit_price_decimals(),
        MAX_NUMBER,
    )
}

/// A positive amount with at most the currency's decimals.
pub fn amount(value: Decimal, currency: Currency) -> Result<Amount, MoneyError> {
    check("amount", value, currency.decimals(), MAX_NUMBER).map(|v| Amount::new(v, currency))
}

/// A line's total: `quantity × unit_price`, rounded half-up to the currency's
/// decimals, per line; the sale is the sum of the rounded lines
/// (docs/decisions.md, "Money").
pub fn line_total(quantity: Decimal, unit_price: Decimal, currency: Currency) -> Amount {
    let exact = quantity * unit_price;
    Amount::new(
        exact.round_dp_with_strategy(currency.decimals(), RoundingStrategy::MidpointAwayFromZero),
        currency,
    )
}

/// An exact amount of money in one currency, always held at the currency's
/// scale so that equal amounts render equally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    value: Decimal,
    currency: Currency,
}

impl Amount {
    /// `value` is rescaled to the currency's decimals; callers have checked it
    /// carries no more than those.
    pub fn new(value: Decimal, currency: Currency) -> Amount {
        let mut value = value
            .round_dp_with_strategy(currency.decimals(), RoundingStrategy::MidpointAwayFromZero);
        value.rescale(currency.decimals());
        Amount { value, currency }
    }

    pub fn zero(currency: Currency) -> Amount {
        Amount::new(Decimal::ZERO, currency)
    }

    pub fn value(&self) -> Decimal {
        self.value
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// Sum of amounts of the same currency; `None` when currencies differ.
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        (self.currency == other.currency)
            .then(|| Amount::new(self.value + other.value, self.currency))
    }

    /// The amount as a JSON number with its exact decimal text (Mercado Pago
    /// reads amounts as numbers; going through `f64` could change them).
    pub fn json_number(&self) -> Box<RawValue> {
        decimal_json_number(self.value)
    }
}

/// A decimal as a JSON number, keeping its exact text.
pub fn decimal_json_number(value: Decimal) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).unwrap_or_else(|_| {
        // A Decimal always prints as a valid JSON number; this is unreachable
        // but must not panic on a hot path.
        RawValue::from_string("0".to_owned()).expect("\"0\" is valid JSON")
    })
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn line_totals_round_half_up_per_line() {
        // 32.10 L at 798.00 is exact.
        assert_eq!(
            line_total(d("32.10"), d("798.00"), Currency::Ars).to_string(),
            "25615.80"
        );
        // 1.005 × 1.00 = 1.005 → 1.01 (half-up, not banker's 1.00).
        assert_eq!(
            line_total(d("1.005"), d("1"), Currency::Ars).to_string(),
            "1.01"
        );
        // 2.5 × 1 CLP = 2.5 → 3 pesos.
        assert_eq!(line_total(d("2.5"), d("1"), Currency::Clp).to_string(), "3");
    }

    #[test]
    fn amounts_render_at_the_currency_scale() {
        assert_eq!(Amount::new(d("10.5"), Currency::Ars).to_string(), "10.50");
        assert_eq!(Amount::new(d("1500"), Currency::Clp).to_string(), "1500");
        assert_eq!(
            Amount::new(d("25615.8"), Currency::Ars).json_number().get(),
            "25615.80"
        );
    }

    #[test]
    fn amounts_refuse_more_decimals_than_the_currency_has() {
        assert!(matches!(
            amount(d("10.001"), Currency::Ars),
            Err(MoneyError::TooManyDecimals { .. })
        ));
        assert!(matches!(
            amount(d("10.5"), Currency::Cop),
            Err(MoneyError::TooManyDecimals { .. })
        ));
        // Trailing zeros carry no precision.
        assert!(amount(d("10.000"), Currency::Ars).is_ok());
        assert!(amount(d("1500.0"), Currency::Clp).is_ok());
    }

    #[test]
    fn zero_and_negative_numbers_are_refused() {
        assert!(matches!(
            amount(d("0"), Currency::Ars),
            Err(MoneyError::NotPositive { .. })
        ));
        assert!(matches!(
            quantity(d("-1")),
            Err(MoneyError::NotPositive { .. })
        ));
        assert!(matches!(
            unit_price(d("0.00"), Currency::Ars),
            Err(MoneyError::NotPositive { .. })
        ));
    }

    #[test]
    fn quantities_and_prices_have_their_own_decimals() {
        assert!(quantity(d("32.105")).is_ok());
        assert!(quantity(d("32.1055")).is_err());
        assert!(unit_price(d("798.99"), Currency::Ars).is_ok());
        assert!(unit_price(d("798.999"), Currency::Ars).is_err());
        assert!(unit_price(d("798.5"), Currency::Clp).is_err());
        assert!(matches!(
            unit_price(d("2000000000"), Currency::Ars),
            Err(MoneyError::TooLarge { .. })
        ));
    }

    #[test]
    fn plain_decimals_are_digits_with_an_optional_fraction() {
        for ok in ["0", "1", "007", "-1", "10.50", "1.005", "25615.80", "-0.5"] {
            assert_eq!(parse_plain_decimal(ok), Ok(d(ok)), "{ok}");
        }
        for loose in [
            "1_000",
            "1.0_5",
            "_1",
            "1_",
            "1.",
            ".5",
            "+1",
            "-",
            "--1",
            "-.5",
            "1e3",
            "1E3",
            "1.5e2",
            "1e-2",
            " 1",
            "1 ",
            "\t1",
            "1\n",
            "",
            ".",
            "1.2.3",
            "1,5",
            "1,000.00",
            "0x10",
            "NaN",
            "inf",
            "-inf",
            "Infinity",
            "\u{0661}",
            "\u{ff11}",
            "1\u{0}",
            "١٠",
            "99999999999999999999999999999.9", // more digits than a Decimal holds
        ] {
            assert!(
                matches!(
                    parse_plain_decimal(loose),
                    Err(MoneyError::NotPlainDecimal(_))
                ),
                "{loose:?} must be refused"
            );
        }
        let long = "1".repeat(41);
        assert!(parse_plain_decimal(&long).is_err());
        // The refusal echoes at most a short prefix of what was sent.
        let e = parse_plain_decimal(&"9_".repeat(20))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 120, "{e}");
    }

    #[test]
    fn mercado_pago_numbers_stay_lenient() {
        // Valid JSON that a device may not send; Mercado Pago may.
        assert_eq!(parse_decimal("1.5e2"), Ok(d("150")));
        assert_eq!(parse_decimal(" 10.5 "), Ok(d("10.5")));
        assert!(parse_decimal("abc").is_err());
    }

    #[test]
    fn currencies_parse_from_their_codes_only() {
        assert_eq!("ARS".parse::<Currency>().unwrap(), Currency::Ars);
        assert_eq!(Currency::Cop.decimals(), 0);
        assert!("ars".parse::<Currency>().is_err());
        assert!("USD".parse::<Currency>().is_err());
    }
}

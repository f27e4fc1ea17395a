//! Exact money: an integer number of cents. JSON shows a plain number (`999.99`), as the
//! seed API does, but no arithmetic ever happens in floating point.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Largest accepted amount: well inside the range where every cent is exact in an f64.
pub const MAX_CENTS: i64 = 100_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_cents(cents: i64) -> Self {
        Self(cents)
    }

    pub const fn cents(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0
            .checked_add(other.0)
            .filter(|c| c.abs() <= MAX_CENTS)
            .map(Money)
    }

    pub fn checked_mul(self, quantity: i64) -> Option<Money> {
        self.0
            .checked_mul(quantity)
            .filter(|c| c.abs() <= MAX_CENTS)
            .map(Money)
    }

    /// Parses the string form of an amount: digits, optionally a point and one or two
    /// more (the published pattern `^[0-9]+(\.[0-9]{1,2})?$`); nothing else, not even
    /// spaces or a sign.
    pub fn parse_decimal(text: &str) -> Result<Money, String> {
        let (whole, frac) = match text.split_once('.') {
            Some((whole, frac)) => (whole, Some(frac)),
            None => (text, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || frac.is_some_and(|f| !digits(f)) {
            return Err(format!("{text:?} is not a decimal amount like 24.99"));
        }
        let frac = frac.unwrap_or("");
        if frac.len() > 2 {
            return Err("at most two decimal places".to_owned());
        }
        let whole: i64 = whole.parse().map_err(|_| "amount too large".to_owned())?;
        let frac_cents: i64 = format!("{frac:0<2}").parse().expect("two digits");
        let cents = whole
            .checked_mul(100)
            .and_then(|c| c.checked_add(frac_cents))
            .filter(|c| *c <= MAX_CENTS)
            .ok_or_else(|| "amount too large".to_owned())?;
        Ok(Money(cents))
    }

    fn from_f64(value: f64) -> Result<Money, String> {
        if !value.is_finite() {
            return Err("amount must be a finite number".to_owned());
        }
        let cents = (value * 100.0).round();
        if cents.abs() > MAX_CENTS as f64 {
            return Err("amount too large".to_owned());
        }
        // Division of integers is correctly rounded, so this is the same double a JSON
        // literal with those two decimals parses to; anything else had more decimals.
        if cents / 100.0 != value {
            return Err("at most two decimal places".to_owned());
        }
        Ok(Money(cents as i64))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Exact for |cents| <= MAX_CENTS; serde_json prints the shortest round-trip form.
        serializer.serialize_f64(self.0 as f64 / 100.0)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MoneyVisitor;
        impl Visitor<'_> for MoneyVisitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an amount with at most two decimal places, e.g. 24.99")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                v.checked_mul(100)
                    .filter(|c| c.abs() <= MAX_CENTS)
                    .map(Money)
                    .ok_or_else(|| E::custom("amount too large"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom("amount too large"))
                    .and_then(|v| self.visit_i64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                Money::from_f64(v).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse_decimal(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(MoneyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Money, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn round_trips_seed_prices_exactly() {
        assert_eq!(parse("999.99").unwrap().cents(), 99_999);
        assert_eq!(parse("24.99").unwrap().cents(), 2_499);
        assert_eq!(parse("\"0.10\"").unwrap().cents(), 10);
        assert_eq!(parse("5").unwrap().cents(), 500);
        let total = Money::from_cents(99_999)
            .checked_add(Money::from_cents(2_499))
            .unwrap();
        assert_eq!(serde_json::to_string(&total).unwrap(), "1024.98");
        assert_eq!(
            serde_json::to_string(&Money::from_cents(1)).unwrap(),
            "0.01"
        );
        assert_eq!(total.to_string(), "1024.98");
    }

    #[test]
    fn sums_that_break_floats_stay_exact() {
        let ten_cents = parse("0.1").unwrap();
        let mut sum = Money::ZERO;
        for _ in 0..3 {
            sum = sum.checked_add(ten_cents).unwrap();
        }
        assert_eq!(sum, parse("0.3").unwrap());
        assert_eq!(serde_json::to_string(&sum).unwrap(), "0.3");
    }

    #[test]
    fn rejects_fractions_of_cents_and_nonsense() {
        assert!(parse("1.005").is_err());
        assert!(parse("\"1.005\"").is_err());
        assert!(parse("\"abc\"").is_err());
        for loose in [" 5", "5.", ".5", "-1", "+1", "1e2", "", "0x10"] {
            assert!(Money::parse_decimal(loose).is_err(), "{loose:?}");
        }
        assert!(parse("1e300").is_err());
        // Just over the largest amount: a correctly rounded parse keeps the excess.
        assert!(parse("1000000000000.0001").is_err());
        assert_eq!(parse("1000000000000").unwrap().cents(), MAX_CENTS);
        assert!(parse("true").is_err());
        assert_eq!(parse("-1.5").unwrap().cents(), -150);
    }

    #[test]
    fn overflow_is_detected() {
        assert!(Money::from_cents(MAX_CENTS).checked_mul(2).is_none());
        assert!(
            Money::from_cents(MAX_CENTS)
                .checked_add(Money::from_cents(1))
                .is_none()
        );
    }
}

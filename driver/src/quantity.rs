//! Kubernetes resource quantities (`16Gi`, `25`, `1.5G`, `2e9`, `500m`) as whole numbers.
//!
//! The API serialises consumed capacity as quantity strings; the plugin needs bytes and a core
//! percentage. Values round up to a whole number, as `Quantity.Value()` does, so a fractional
//! request never grants less than asked.

/// A quantity string that is not a non-negative quantity, or does not fit 64 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a non-negative Kubernetes quantity that fits 64 bits")]
pub struct QuantityError(pub String);

/// `bytes` as the shortest exact quantity: `24Gi`, `1536Mi`, or plain bytes.
pub fn format(bytes: u64) -> String {
    const MI: u64 = 1 << 20;
    const GI: u64 = 1 << 30;
    if bytes >= GI && bytes.is_multiple_of(GI) {
        format!("{}Gi", bytes / GI)
    } else if bytes >= MI && bytes.is_multiple_of(MI) {
        format!("{}Mi", bytes / MI)
    } else {
        bytes.to_string()
    }
}

/// Parses `text` and rounds it up to an integer.
pub fn parse(text: &str) -> Result<u64, QuantityError> {
    let err = || QuantityError(text.to_string());
    let text_trim = text.trim();
    let body = text_trim.strip_prefix('+').unwrap_or(text_trim);
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') || fraction.len() > 30 {
        return Err(err());
    }
    // value = digits × 10^-scale × multiplier, kept exact in u128 until the final rounding.
    let digits: u128 = format!("{whole}{fraction}").parse().map_err(|_| err())?;
    let mut numerator = digits;
    let mut denominator: u128 = 10u128.pow(fraction.len() as u32);
    let (binary, decimal_exp): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E']).ok_or_else(err)?;
            let exponent: i32 = exponent.parse().map_err(|_| err())?;
            if !(-30..=30).contains(&exponent) {
                return Err(err());
            }
            (0, exponent)
        }
    };
    numerator = numerator
        .checked_shl(binary)
        .filter(|_| digits.leading_zeros() > binary)
        .ok_or_else(err)?;
    if decimal_exp >= 0 {
        numerator = numerator
            .checked_mul(10u128.pow(decimal_exp as u32))
            .ok_or_else(err)?;
    } else {
        denominator = denominator
            .checked_mul(10u128.pow((-decimal_exp) as u32))
            .ok_or_else(err)?;
    }
    u64::try_from(numerator.div_ceil(denominator)).map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_the_shortest_exact_quantity() {
        for (bytes, want) in [
            (24u64 << 30, "24Gi"),
            (1536 << 20, "1536Mi"),
            (1 << 20, "1Mi"),
            (1000, "1000"),
            ((1 << 30) + 1, "1073741825"),
        ] {
            assert_eq!(format(bytes), want);
            assert_eq!(parse(&format(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn parses_what_the_api_writes() {
        let cases = [
            ("0", 0),
            ("25", 25),
            ("16Gi", 16 << 30),
            ("1536Mi", 1536 << 20),
            ("1.5Gi", 3 << 29),
            ("2G", 2_000_000_000),
            ("2e9", 2_000_000_000),
            ("500m", 1),
            ("1500m", 2),
            ("100k", 100_000),
            ("0.5", 1),
            ("+7", 7),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for text in [
            "",
            "-1",
            "Gi",
            "1..0",
            "1.2.3",
            "12X",
            "1e99",
            "99999999999Ei",
            "1 Gi",
        ] {
            assert!(parse(text).is_err(), "{text:?} should be refused");
        }
    }
}

//! Parsing of Kubernetes resource quantities (`1Gi`, `500M`, `1e9`, `4096`) into an
//! exact byte count. Only quantities that name a whole number of bytes are accepted,
//! because a volume size that is not an integer has no meaning. And the reverse for
//! people: a byte count in binary units (`20Gi`, `12.5Gi`), for status and columns.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuantityError {
    #[error(
        "{0:?} is not a quantity (expected a number with an optional suffix such as Ki, Mi, Gi, Ti, k, M, G)"
    )]
    Syntax(String),
    #[error("{0:?} is not a whole number of bytes")]
    Fractional(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is larger than 2^63 bytes")]
    TooLarge(String),
}

/// Parses a quantity into bytes. Accepts binary suffixes (Ki..Ei), decimal suffixes
/// (k, M, G, T, P, E) and decimal exponents (`e9`), with an optional fraction as long as
/// the result is a whole number.
pub fn parse_quantity_bytes(input: &str) -> Result<u64, QuantityError> {
    let s = input.trim();
    let syntax = || QuantityError::Syntax(input.to_string());
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(syntax());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    // Value = mantissa / 10^frac_digits * multiplier, computed exactly in u128.
    let mantissa: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| QuantityError::TooLarge(input.to_string()))?;
    let frac_digits = u32::try_from(frac_part.len()).map_err(|_| syntax())?;
    let (mul, mut exp10): (u128, i64) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .ok_or_else(syntax)?
                .parse::<i64>()
                .map_err(|_| syntax())?;
            (1, exp)
        }
    };
    exp10 -= i64::from(frac_digits);
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(input.to_string()));
    }
    let too_large = || QuantityError::TooLarge(input.to_string());
    let mut value = mantissa.checked_mul(mul).ok_or_else(too_large)?;
    if exp10 >= 0 {
        for _ in 0..exp10 {
            value = value.checked_mul(10).ok_or_else(too_large)?;
            if value > i64::MAX as u128 {
                return Err(too_large());
            }
        }
    } else {
        for _ in 0..(-exp10) {
            if value % 10 != 0 {
                return Err(QuantityError::Fractional(input.to_string()));
            }
            value /= 10;
        }
    }
    if value > i64::MAX as u128 {
        return Err(too_large());
    }
    Ok(value as u64)
}

/// A byte count in binary units for people: the largest unit (Ki to Ei) it reaches, with
/// at most one decimal, rounded down so free space is never overstated (`20Gi`,
/// `12.5Gi`, `1023.9Mi`); counts below 1 KiB stay plain bytes (`512`).
pub fn format_bytes_binary(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let Some((power, unit)) = UNITS
        .iter()
        .enumerate()
        .rev()
        .map(|(i, u)| (10 * (i as u32 + 1), u))
        .find(|(power, _)| bytes >> power > 0)
    else {
        return bytes.to_string();
    };
    let tenths = (u128::from(bytes) * 10) >> power;
    match tenths % 10 {
        0 => format!("{}{unit}", tenths / 10),
        d => format!("{}.{d}{unit}", tenths / 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes_parse_exactly() {
        assert_eq!(parse_quantity_bytes("4096"), Ok(4096));
        assert_eq!(parse_quantity_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_quantity_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_quantity_bytes("2.5k"), Ok(2500));
    }

    #[test]
    fn fractional_negative_and_garbage_are_refused_with_the_input_named() {
        assert!(matches!(
            parse_quantity_bytes("0.5"),
            Err(QuantityError::Fractional(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("1Zi"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            parse_quantity_bytes(""),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("1..2"),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            parse_quantity_bytes("9Ei"),
            Err(QuantityError::TooLarge(_))
        ));
        let err = parse_quantity_bytes("abc").unwrap_err().to_string();
        assert!(err.contains("\"abc\""), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,24}") {
            let _ = parse_quantity_bytes(&s);
        }

        #[test]
        fn integers_round_trip(n in 0u64..(i64::MAX as u64)) {
            proptest::prop_assert_eq!(parse_quantity_bytes(&n.to_string()), Ok(n));
        }
    }

    #[test]
    fn byte_counts_format_in_binary_units_rounded_down() {
        for (bytes, want) in [
            (0, "0"),
            (512, "512"),
            (1023, "1023"),
            (1024, "1Ki"),
            (1536, "1.5Ki"),
            (20 << 30, "20Gi"),
            ((25 << 30) / 2, "12.5Gi"),
            ((1 << 30) - 1, "1023.9Mi"),
            ((12 << 30) + (1 << 30) / 20, "12Gi"),
            ((3 << 40) / 2, "1.5Ti"),
            (u64::MAX, "15.9Ei"),
        ] {
            assert_eq!(format_bytes_binary(bytes), want, "{bytes}");
        }
        // What it prints parses back, never above the count it came from.
        for bytes in [1536, 20 << 30, (25 << 30) / 2, (1 << 40) + 12345] {
            let text = format_bytes_binary(bytes);
            assert!(parse_quantity_bytes(&text).unwrap() <= bytes, "{text}");
        }
    }
}

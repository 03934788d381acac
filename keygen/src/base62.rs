//! Base62 (`0-9A-Za-z`) without padding: the shortest code for a number.

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Encodes `n`; 0 is `"0"`. At most 11 characters for a `u64`.
pub fn encode(mut n: u64) -> String {
    let mut buf = [0u8; 11];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = ALPHABET[(n % 62) as usize];
        n /= 62;
        if n == 0 {
            break;
        }
    }
    // The alphabet is ASCII, so this cannot fail.
    String::from_utf8(buf[i..].to_vec()).expect("base62 is ASCII")
}

/// Decodes a code made by [`encode`]; `None` for other characters, leading
/// zeros (which `encode` never makes) or overflow.
pub fn decode(code: &str) -> Option<u64> {
    let bytes = code.as_bytes();
    if bytes.is_empty() || (bytes.len() > 1 && bytes[0] == b'0') {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'A'..=b'Z' => b - b'A' + 10,
            b'a'..=b'z' => b - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(encode(0), "0");
        assert_eq!(encode(61), "z");
        assert_eq!(encode(62), "10");
        assert_eq!(encode(62u64.pow(8) - 1), "zzzzzzzz");
        assert_eq!(encode(u64::MAX).len(), 11);
    }

    #[test]
    fn rejects_what_encode_never_makes() {
        for bad in ["", "00", "01", "a-b", "zzzzzzzzzzzz", "é"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(n: u64) {
            prop_assert_eq!(decode(&encode(n)), Some(n));
        }
    }
}

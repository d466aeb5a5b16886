//! Limits on request bodies checked before any JSON parsing, so a hostile
//! body costs a linear scan and nothing more.

/// Whether `body` nests arrays/objects deeper than `max_depth`. Brackets
/// inside strings (escapes included) do not count. Malformed JSON is left to
/// the parser, which names the error.
pub fn nests_deeper_than(body: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in body {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_containers_outside_strings() {
        assert!(!nests_deeper_than(
            br#"[{"op":"add","value":{"a":[1]}}]"#,
            4
        ));
        assert!(nests_deeper_than(br#"[{"op":"add","value":{"a":[1]}}]"#, 3));
        assert!(!nests_deeper_than(br#"["[[[[[[", "\"[[[["]"#, 1));
        assert!(nests_deeper_than("[".repeat(10_000).as_bytes(), 64));
        assert!(!nests_deeper_than(b"", 0));
    }
}

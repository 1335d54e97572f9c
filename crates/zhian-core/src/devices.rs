//! The device table's rules (contract: "Vendor payloads", last paragraph): `health.max_devices`
//! bounds the devices tracked, never the events counted. At the bound the longest-silent device
//! is forgotten to make room, and an installer names devices to forget by glob pattern. Pure.

use super::event::Kind;

/// The table key of an MQTT device: "kind\0device" (neither can hold a NUL).
pub fn device_key(kind: Kind, device: &str) -> String {
    let mut k = String::with_capacity(kind.as_str().len() + 1 + device.len());
    k.push_str(kind.as_str());
    k.push('\0');
    k.push_str(device);
    k
}

/// Kind and device of a table key.
pub fn split_key(key: &str) -> Option<(Kind, &str)> {
    let (kind, device) = key.split_once('\0')?;
    Some((Kind::parse(kind)?, device))
}

/// Which devices to forget so that a table of `len` devices holds at most `max`: the
/// `len - max` longest silent among `candidates` (key, last seen ms), oldest first; ties go
/// by key, so the choice does not depend on the order the candidates come in.
pub fn longest_silent<'a>(
    candidates: impl IntoIterator<Item = (&'a str, i64)>,
    len: usize,
    max: usize,
) -> Vec<&'a str> {
    let n = len.saturating_sub(max);
    if n == 0 {
        return Vec::new();
    }
    let mut all: Vec<(i64, &str)> = candidates.into_iter().map(|(k, t)| (t, k)).collect();
    if n < all.len() {
        all.select_nth_unstable(n - 1);
        all.truncate(n);
    }
    all.sort_unstable();
    all.into_iter().map(|(_, k)| k).collect()
}

/// A glob: `*` any run of characters (also none), `?` one character, anything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point (the last `*`): linear in practice, never
    // exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether an installer's pattern names this device: `door-*` matches the device name,
/// `camera/plate-*` (with a `/`) matches `kind/name`.
pub fn pattern_names(pattern: &str, kind: Kind, device: &str) -> bool {
    match pattern.split_once('/') {
        Some((k, d)) => glob_match(k, kind.as_str()) && glob_match(d, device),
        None => glob_match(pattern, device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn globs() {
        assert!(glob_match("plate-*", "plate-浙A12345"));
        assert!(glob_match("*", ""));
        assert!(glob_match("door-?", "door-7"));
        assert!(!glob_match("door-?", "door-17"));
        assert!(glob_match("door-3", "door-3"));
        assert!(!glob_match("door-3", "door-33"));
        assert!(glob_match("*-3*", "gate-east-3b"));
        assert!(!glob_match("a*b*c", "aXbY"));
        assert!(pattern_names("camera/plate-*", Kind::Camera, "plate-1"));
        assert!(!pattern_names("vehicle/plate-*", Kind::Camera, "plate-1"));
        assert!(pattern_names("*/door-1", Kind::Access, "door-1"));
        assert_eq!(
            split_key(&device_key(Kind::Vehicle, "gate-1")),
            Some((Kind::Vehicle, "gate-1"))
        );
    }

    #[test]
    fn the_longest_silent_go_first() {
        let c = [("c", 30), ("a", 10), ("b", 10), ("d", 40)];
        assert_eq!(longest_silent(c, 4, 2), ["a", "b"]);
        assert_eq!(longest_silent(c, 4, 4), Vec::<&str>::new());
        assert_eq!(longest_silent(c, 5, 4), ["a"]);
        assert_eq!(longest_silent(c, 9, 1), ["a", "b", "c", "d"]);
    }

    /// A glob against a plain backtracking reference.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => {
                !t.is_empty() && (*c == '?' || *c == t[0]) && reference(rest, &t[1..])
            }
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_a_reference(p in "[ab*?]{0,7}", t in "[ab]{0,8}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(glob_match(&p, &t), reference(&pc, &tc));
        }

        /// Sightings applied batch by batch with eviction at the bound keep exactly the `max`
        /// most recently seen devices (a model: sort every device ever seen by its latest
        /// sighting), and every device of the latest batch is kept when the batch fits.
        #[test]
        fn eviction_keeps_the_most_recently_seen(
            max in 1usize..6,
            batches in proptest::collection::vec(proptest::collection::vec(0u8..12, 1..4), 1..30),
        ) {
            let mut table: BTreeMap<String, i64> = BTreeMap::new();
            let mut history: BTreeMap<String, i64> = BTreeMap::new();
            for (t, batch) in batches.iter().enumerate() {
                let now = t as i64 * 1000;
                for d in batch {
                    table.insert(format!("d{d:02}"), now);
                    history.insert(format!("d{d:02}"), now);
                }
                let victims: Vec<String> = longest_silent(
                    table.iter().map(|(k, v)| (k.as_str(), *v)),
                    table.len(),
                    max,
                )
                .into_iter()
                .map(str::to_string)
                .collect();
                for v in &victims {
                    table.remove(v);
                }
                prop_assert!(table.len() <= max);
                let mut model: Vec<(i64, &String)> = history.iter().map(|(k, v)| (*v, k)).collect();
                model.sort();
                let keep: Vec<&String> = model.iter().rev().take(max).map(|(_, k)| *k).collect();
                let mut got: Vec<&String> = table.keys().collect();
                let mut want = keep.clone();
                got.sort();
                want.sort();
                prop_assert_eq!(got, want);
                let distinct: std::collections::BTreeSet<_> = batch.iter().collect();
                if distinct.len() <= max {
                    for d in batch {
                        let key = format!("d{d:02}");
                        prop_assert!(table.contains_key(&key), "{} of the latest batch kept", key);
                    }
                }
            }
        }
    }
}

//! Modbus values: decoding registers, and turning counter readings into increments.

use serde::{Deserialize, Serialize};

/// The integer width of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Width {
    U16,
    U32,
    I32,
}

impl Width {
    /// How many distinct values the register holds (the wrap modulus).
    pub fn modulus(self) -> u64 {
        match self {
            Width::U16 => 1 << 16,
            Width::U32 | Width::I32 => 1 << 32,
        }
    }
}

/// What one counter reading means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The first reading ever: it only sets the baseline.
    Baseline,
    /// The counter rose by n (n may be 0).
    Increase(u64),
    /// The counter wrapped past its maximum and rose by n in total.
    Wrapped(u64),
    /// The counter went down (a reset): the new value is the increase.
    Reset(u64),
}

impl Step {
    /// Events this reading stands for.
    pub fn events(self) -> u64 {
        match self {
            Step::Baseline => 0,
            Step::Increase(n) | Step::Wrapped(n) | Step::Reset(n) => n,
        }
    }
}

/// Interpret `new` against the `last` committed value.
///
/// A decrease is a reset (the device restarted its count from zero: the new value is the
/// increase), unless `wrap` is set and the decrease reads as a wrap past the maximum of less
/// than half the range: `(new - last) mod 2^bits < 2^(bits-1)`. A larger "wrap" is implausible
/// between two polls and is treated as a reset.
pub fn step(last: Option<i64>, new: i64, width: Width, wrap: bool) -> Step {
    let Some(last) = last else {
        return Step::Baseline;
    };
    if new >= last {
        return Step::Increase((new - last) as u64);
    }
    let m = width.modulus();
    if wrap {
        let forward = (new - last).rem_euclid(m as i64) as u64;
        if forward < m / 2 {
            return Step::Wrapped(forward);
        }
    }
    Step::Reset(new.max(0) as u64)
}

/// The state a counter keeps between polls: the last value that counted, and the suspicious
/// readings held back since (at most [`MAX_HELD`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CounterState {
    /// The last reading that counted (`None` before the first reading ever).
    pub last: Option<i64>,
    /// Readings that decreased, or rose by more than `max_step`, in order, waiting for a
    /// reading that tells a misread from a real reset, wrap or jump.
    pub held: Vec<i64>,
}

/// How many suspicious readings in a row are held before they stand. Controllers misread for
/// a poll or two (a reboot reads 0 twice at a 1 s poll); a real reset or jump keeps its new
/// value, and is counted this many polls late.
pub const MAX_HELD: usize = 3;

/// What one reading did, under the glitch rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// Events the reading (and held readings it settled) stand for.
    pub step: Step,
    /// Held readings that turned out to be misreads and were dropped.
    pub glitches: Vec<i64>,
    /// The reading was held back: nothing counted yet.
    pub held: bool,
    pub state: CounterState,
}

/// The contract's glitch rule ("Modbus"): a reading that decreases, or rises by more than
/// `max_step` since the last counted value, is held. If a later reading continues from the
/// value before it (rises by at most `max_step` from the last counted value), every held
/// reading was a misread and is dropped; once [`MAX_HELD`] readings in a row disagree with the
/// last value, they stand and are counted by [`step`] (reset, wrap, increase), one after the
/// other. One bad read (or two) never becomes millions of vehicles, and a real reset, wrap or
/// jump is counted a few polls late.
pub fn judge(state: CounterState, new: i64, width: Width, wrap: bool, max_step: u64) -> Judged {
    let continues = |from: i64| new >= from && (new - from) as u64 <= max_step;
    let Some(last) = state.last else {
        return Judged {
            step: Step::Baseline,
            glitches: Vec::new(),
            held: false,
            state: CounterState {
                last: Some(new),
                held: Vec::new(),
            },
        };
    };
    if continues(last) {
        return Judged {
            step: Step::Increase((new - last) as u64),
            glitches: state.held,
            held: false,
            state: CounterState {
                last: Some(new),
                held: Vec::new(),
            },
        };
    }
    let mut held = state.held;
    held.push(new);
    if held.len() < MAX_HELD {
        return Judged {
            step: Step::Increase(0),
            glitches: Vec::new(),
            held: true,
            state: CounterState {
                last: Some(last),
                held,
            },
        };
    }
    // The first held reading stands (counted by the usual rules); the ones after it are judged
    // again from it, so a misread right after a real jump is still caught.
    let first = step(Some(last), held[0], width, wrap);
    let mut n = first.events();
    let mut glitches = Vec::new();
    let mut state = CounterState {
        last: Some(held[0]),
        held: Vec::new(),
    };
    let mut still_held = false;
    for &h in &held[1..] {
        let j = judge(state, h, width, wrap, max_step);
        n += j.step.events();
        glitches.extend(j.glitches);
        still_held = j.held;
        state = j.state;
    }
    Judged {
        step: match first {
            Step::Wrapped(_) => Step::Wrapped(n),
            Step::Reset(_) => Step::Reset(n),
            _ => Step::Increase(n),
        },
        glitches,
        held: still_held,
        state,
    }
}

/// A decoded point value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
}

impl Value {
    /// As JSON: a bool or a number.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Value::Bool(b) => serde_json::Value::Bool(b),
            Value::Int(i) => serde_json::Value::from(i),
            Value::Float(f) => serde_json::Number::from_f64(f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
        }
    }

    pub fn as_i64(self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(v),
            Value::Bool(b) => Some(i64::from(b)),
            Value::Float(_) => None,
        }
    }
}

/// The point types of the contract, as the decoder sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    U16,
    U32,
    I32,
    F32,
    Bool,
}

/// Decode one point from its registers (`words`, in address order). `big_word_order`: the
/// high word comes first (the Modbus convention); otherwise the low word does.
pub fn decode(kind: Kind, words: &[u16], big_word_order: bool) -> Option<Value> {
    let pair = || -> Option<u32> {
        let (a, b) = (*words.first()?, *words.get(1)?);
        let (hi, lo) = if big_word_order { (a, b) } else { (b, a) };
        Some((u32::from(hi) << 16) | u32::from(lo))
    };
    Some(match kind {
        Kind::U16 => Value::Int(i64::from(*words.first()?)),
        Kind::Bool => Value::Bool(*words.first()? != 0),
        Kind::U32 => Value::Int(i64::from(pair()?)),
        Kind::I32 => Value::Int(i64::from(pair()? as i32)),
        Kind::F32 => Value::Float(f64::from(f32::from_bits(pair()?))),
    })
}

#[cfg(test)]
mod glitch_tests {
    use super::*;

    /// Total events counted over a series of readings (the first is the baseline).
    fn run(readings: &[i64], width: Width, wrap: bool) -> (u64, u32) {
        let mut st = CounterState::default();
        let (mut total, mut glitches) = (0, 0);
        for &r in readings {
            let j = judge(st, r, width, wrap, 1000);
            total += j.step.events();
            glitches += j.glitches.len() as u32;
            st = j.state;
        }
        (total, glitches)
    }

    #[test]
    fn one_misread_never_counts() {
        // The cases: a u32 read as 0xFFFFFFFF once, a controller reading 0 once.
        assert_eq!(run(&[1000, 0xFFFF_FFFF, 1001], Width::U32, false), (1, 1));
        assert_eq!(run(&[12345, 0, 12346], Width::U32, false), (1, 1));
    }

    #[test]
    fn a_misread_right_after_a_real_jump_is_still_caught() {
        // 1001 -> 12345 is real (it stays), then 0 is read once, then counting goes on.
        assert_eq!(
            run(&[1001, 12345, 12345, 0, 12346, 12346], Width::U32, false),
            (11_345, 1)
        );
    }

    #[test]
    fn two_misreads_in_a_row_never_count_either() {
        assert_eq!(
            run(&[1000, 0xFFFF_FFFF, 0xFFFF_FFFF, 1001], Width::U32, false),
            (1, 2)
        );
        assert_eq!(run(&[12345, 0, 0, 12346], Width::U32, false), (1, 2));
    }

    #[test]
    fn real_resets_wraps_and_jumps_count_a_few_polls_late() {
        assert_eq!(run(&[12345, 0, 3, 3], Width::U32, false), (3, 0));
        assert_eq!(run(&[1000, 6000, 6001, 6001], Width::U32, false), (5001, 0));
        assert_eq!(run(&[65530, 4, 6, 6], Width::U16, true), (12, 0));
        // Held at the end: not counted yet, and not lost (the state keeps them).
        let mut st = CounterState::default();
        for r in [10, 5000] {
            st = judge(st, r, Width::U32, false, 1000).state;
        }
        assert_eq!(st.held, vec![5000]);
        let st = judge(st, 5000, Width::U32, false, 1000).state;
        assert_eq!(judge(st, 5000, Width::U32, false, 1000).step.events(), 4990);
    }

    proptest::proptest! {
        /// A counter that only rises by at most max_step per poll, with single misreads
        /// sprinkled in (never two in a row), counts exactly its true increase.
        #[test]
        fn single_misreads_never_change_the_total(
            steps in proptest::collection::vec(0i64..1000, 2..200),
            bad in proptest::collection::vec(proptest::prelude::any::<(bool, u32)>(), 200)) {
            let mut value = 50_000i64;
            let mut readings = vec![value];
            let mut last_bad = false;
            for (i, s) in steps.iter().enumerate() {
                let (is_bad, garbage) = bad[i];
                if is_bad && !last_bad {
                    readings.push(i64::from(garbage));
                    last_bad = true;
                } else {
                    last_bad = false;
                }
                value += s;
                readings.push(value);
            }
            let (total, _) = run(&readings, Width::U32, false);
            proptest::prop_assert_eq!(total as i64, value - 50_000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn steps() {
        assert_eq!(step(None, 5, Width::U16, true), Step::Baseline);
        assert_eq!(step(Some(5), 9, Width::U16, false), Step::Increase(4));
        assert_eq!(step(Some(65_530), 3, Width::U16, true), Step::Wrapped(9));
        assert_eq!(step(Some(65_530), 3, Width::U16, false), Step::Reset(3));
        // A "wrap" of more than half the range is a reset.
        assert_eq!(step(Some(20_000), 3, Width::U16, true), Step::Reset(3));
        assert_eq!(
            step(Some(i64::from(u32::MAX)), 1, Width::U32, true),
            Step::Wrapped(2)
        );
        assert_eq!(
            step(
                Some(i64::from(i32::MAX)),
                i64::from(i32::MIN),
                Width::I32,
                true
            ),
            Step::Wrapped(1)
        );
        assert_eq!(step(Some(100), -4, Width::I32, false), Step::Reset(0));
    }

    #[test]
    fn decoding() {
        assert_eq!(
            decode(Kind::U32, &[0x0001, 0x0002], true),
            Some(Value::Int(0x0001_0002))
        );
        assert_eq!(
            decode(Kind::U32, &[0x0002, 0x0001], false),
            Some(Value::Int(0x0001_0002))
        );
        assert_eq!(
            decode(Kind::I32, &[0xFFFF, 0xFFFE], true),
            Some(Value::Int(-2))
        );
        let w = 21.5f32.to_bits();
        assert_eq!(
            decode(Kind::F32, &[(w >> 16) as u16, w as u16], true),
            Some(Value::Float(21.5))
        );
        assert_eq!(
            decode(Kind::F32, &[w as u16, (w >> 16) as u16], false),
            Some(Value::Float(21.5))
        );
        assert_eq!(decode(Kind::Bool, &[1], true), Some(Value::Bool(true)));
        assert_eq!(decode(Kind::U32, &[1], true), None);
    }

    proptest! {
        /// Summing the steps of a u16 counter polled at least every 32767 increments, through
        /// wraps, gives exactly the increments.
        #[test]
        fn wrapped_u16_sums_to_increments(start in 0u32..65_536, incs in prop::collection::vec(0u32..32_767, 1..50)) {
            let mut raw = start;
            let mut last = Some(i64::from(start));
            let mut total = 0u64;
            for inc in &incs {
                raw = (raw + inc) % 65_536;
                total += step(last, i64::from(raw), Width::U16, true).events();
                last = Some(i64::from(raw));
            }
            prop_assert_eq!(total, incs.iter().map(|i| u64::from(*i)).sum::<u64>());
        }
    }
}

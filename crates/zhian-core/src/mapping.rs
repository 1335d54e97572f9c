//! Vendor payloads (`[[mqtt.sources]]`, contract: "Vendor payloads"): rules that map another
//! topic layout and JSON shape onto the canonical [`Event`], without code. Pure: no I/O; the
//! site's UTC offset is passed in.
//!
//! A [`Source`] has a topic filter and one [`Rule`] per canonical field. A rule takes its value
//! from a JSON pointer into the payload (RFC 6901), a topic level, a constant, or the parts of a
//! `join` (e.g. device + record number, for a stable event id when the device gives none);
//! then optionally through a value `map` (numeric event codes to actions), with a `default` when
//! the value is missing or not in the map. `ts` is read as `rfc3339`, `epoch_s`, `epoch_ms`,
//! `local` (`YYYY-MM-DD hh:mm:ss[.fff]`, no offset, in the site's time zone) or `auto`.
//!
//! A message that cannot be mapped is rejected `unmapped`, with the rule it broke
//! ([`Unmapped`]); the mapped event then passes the same checks as a canonical one.

use super::event::{valid_device, valid_word, Event, Kind, Reject, MAX_PAYLOAD};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// How a `ts` value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsFormat {
    /// RFC 3339 / ISO 8601 with an offset (`2026-11-30T08:15:02+08:00`).
    Rfc3339,
    /// Unix seconds (number or numeric string; a fraction is kept to the millisecond).
    EpochS,
    /// Unix milliseconds.
    EpochMs,
    /// `YYYY-MM-DD hh:mm:ss` (or with `T`, and a fraction), no offset: the site's local time.
    Local,
    /// A number: milliseconds if above 10^11, else seconds; a string: RFC 3339, else local.
    Auto,
}

impl TsFormat {
    pub fn parse(s: &str) -> Option<TsFormat> {
        Some(match s {
            "rfc3339" | "iso8601" => TsFormat::Rfc3339,
            "epoch_s" => TsFormat::EpochS,
            "epoch_ms" => TsFormat::EpochMs,
            "local" => TsFormat::Local,
            "auto" => TsFormat::Auto,
            _ => return None,
        })
    }
}

/// How a source's payload bytes are decoded before the JSON is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// UTF-8 only (the default): anything else is `invalid_utf8`.
    #[default]
    Utf8,
    /// GB18030, which covers GBK and GB2312 (most Chinese plate cameras and controllers).
    Gb18030,
    /// UTF-8 when the bytes are valid UTF-8, else GB18030.
    Auto,
}

impl Encoding {
    /// `utf-8`, `gb18030` (or `gbk`, `gb2312`: GB18030 decodes both), `auto`.
    pub fn parse(s: &str) -> Option<Encoding> {
        Some(match s.to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Encoding::Utf8,
            "gb18030" | "gbk" | "gb2312" => Encoding::Gb18030,
            "auto" => Encoding::Auto,
            _ => return None,
        })
    }

    /// The name as in the config.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Utf8 => "utf-8",
            Encoding::Gb18030 => "gb18030",
            Encoding::Auto => "utf-8 or gb18030",
        }
    }

    /// The payload as text; `None` when the bytes are not text in this encoding. GB18030 is
    /// decoded by encoding_rs (the WHATWG Encoding Standard's decoder, whose "gbk" label is the
    /// same decoder) without replacement characters: an invalid sequence is an error, not a
    /// silently changed id.
    pub fn decode(self, bytes: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
        let gb = |b: &[u8]| {
            encoding_rs::GB18030
                .decode_without_bom_handling_and_without_replacement(b)
                .map(|c| std::borrow::Cow::Owned(c.into_owned()))
        };
        match self {
            Encoding::Utf8 => std::str::from_utf8(bytes)
                .ok()
                .map(std::borrow::Cow::Borrowed),
            Encoding::Gb18030 => gb(bytes),
            // Some GBK text is also valid UTF-8: a GBK pair with a lead byte C2-DF and a trail
            // byte 80-BF reads as one 2-byte UTF-8 character (鲁 C2 B3 as "³", 豫 D4 A5 as "ԥ";
            // found by a break-it run). A Chinese device's payload holds no characters in that
            // range (U+0080-U+07FF: Latin-1 to Arabic) but such misreadings, so when the UTF-8
            // reading has one and the bytes are also GB18030, GB18030 wins. A device that sends
            // UTF-8 text in those scripts should be set to `utf-8`.
            Encoding::Auto => match std::str::from_utf8(bytes) {
                Ok(t) if t.chars().any(|c| ('\u{80}'..='\u{7ff}').contains(&c)) => {
                    gb(bytes).or(Some(std::borrow::Cow::Borrowed(t)))
                }
                Ok(t) => Some(std::borrow::Cow::Borrowed(t)),
                Err(_) => gb(bytes),
            },
        }
    }
}

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// A JSON pointer into the payload (`/AccessControllerEvent/cardNo`).
    Pointer(String),
    /// A topic level, 0-based (`hik/acs/door-3/event`: level 2 is `door-3`).
    Topic(usize),
    /// A constant.
    Const(String),
    /// Parts joined with `sep`: each part a pointer (`/Data/RecNo`), `topic[N]`, or the name of
    /// a field mapped before it (`device`, `kind`).
    Join(Vec<Part>, String),
}

/// One part of a [`From::Join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Pointer(String),
    Topic(usize),
    Field(&'static str),
}

/// How one canonical field is filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub from: From,
    /// Value map (applied to the value's text): e.g. `{"1" = "granted", "9" = "denied"}`.
    pub map: Option<BTreeMap<String, String>>,
    /// Used when the value is missing, null, or not in `map`.
    pub default: Option<String>,
    /// For `ts` only.
    pub format: TsFormat,
}

impl Rule {
    pub fn constant(v: &str) -> Rule {
        Rule {
            from: From::Const(v.to_string()),
            map: None,
            default: None,
            format: TsFormat::Auto,
        }
    }
}

/// A vendor source: a topic filter and the rules for each canonical field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// For rejects and logs.
    pub name: String,
    /// MQTT topic filter (`+` and `#` allowed).
    pub topic: String,
    /// How the payload bytes are decoded.
    pub encoding: Encoding,
    /// A JSON pointer to an array: each element is one event (a controller's batch upload).
    /// Pointers are read in the element first, then in the whole message.
    pub each: Option<String>,
    pub kind: Rule,
    pub device: Rule,
    pub id: Rule,
    pub ts: Rule,
    pub action: Rule,
    /// Default: constant `ok`.
    pub result: Option<Rule>,
    /// Default: none.
    pub subject: Option<Rule>,
}

/// Why a message on a source's topic could not be mapped: the field and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    pub source: String,
    pub field: &'static str,
    pub why: String,
}

impl fmt::Display for Unmapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source {:?}: {}: {}", self.source, self.field, self.why)
    }
}

/// Whether `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Every filter the device input subscribes: `base` (the canonical `mqtt.topics`) and each
/// source's filter, without repeats.
pub fn subscriptions(base: &[String], sources: &[Source]) -> Vec<String> {
    let mut t = base.to_vec();
    for s in sources {
        if !t.contains(&s.topic) {
            t.push(s.topic.clone());
        }
    }
    t
}

/// The first source whose filter matches `topic`.
pub fn source_for<'a>(sources: &'a [Source], topic: &str) -> Option<&'a Source> {
    sources.iter().find(|s| topic_matches(&s.topic, topic))
}

/// A JSON value as text: strings as they are, integers without a fraction, booleans as
/// `true`/`false`; objects, arrays and null are not values.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

struct Ctx<'a> {
    source: &'a Source,
    topic: Vec<&'a str>,
    /// The element being mapped (the whole message unless the source has `each`).
    payload: &'a Value,
    /// The whole message: pointers not found in the element are read here.
    root: &'a Value,
    offset_s: i32,
}

impl Ctx<'_> {
    /// The value at pointer `p`: in the element, else in the whole message.
    /// The value at pointer `p` for `field`: in the element, else in the whole message; `id`
    /// and `subject` only in the element (found by a break-it run: elements without an id took
    /// the message's, and all but one were dropped as duplicates; a subject borrowed from the
    /// message would name the wrong person).
    fn at(&self, field: &str, p: &str) -> Option<&Value> {
        let own = self.payload.pointer(p);
        if field == "id" || field == "subject" || std::ptr::eq(self.payload, self.root) {
            return own;
        }
        match own {
            Some(v) if !v.is_null() => Some(v),
            Some(_) => None,
            None => self.root.pointer(p),
        }
    }

    fn fail(&self, field: &'static str, why: impl Into<String>) -> Unmapped {
        Unmapped {
            source: self.source.name.clone(),
            field,
            why: why.into(),
        }
    }

    fn raw(
        &self,
        field: &'static str,
        from: &From,
        done: &[(&'static str, String)],
    ) -> Result<Option<Value>, Unmapped> {
        Ok(match from {
            From::Pointer(p) => self.at(field, p).cloned().filter(|v| !v.is_null()),
            From::Topic(i) => self.topic.get(*i).map(|s| Value::String(s.to_string())),
            From::Const(c) => Some(Value::String(c.clone())),
            From::Join(parts, sep) => {
                let mut out = Vec::with_capacity(parts.len());
                for part in parts {
                    let v = match part {
                        Part::Pointer(p) => self.at(field, p).and_then(text_of),
                        Part::Topic(i) => self.topic.get(*i).map(|s| s.to_string()),
                        Part::Field(name) => {
                            done.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
                        }
                    };
                    match v {
                        Some(v) if !v.is_empty() => out.push(v),
                        _ => {
                            return Err(self
                                .fail(field, format!("join part {} is missing", part_name(part))));
                        }
                    }
                }
                Some(Value::String(out.join(sep)))
            }
        })
    }

    /// The field's text after map and default.
    fn text(
        &self,
        field: &'static str,
        rule: &Rule,
        done: &[(&'static str, String)],
    ) -> Result<String, Unmapped> {
        let raw = self.raw(field, &rule.from, done)?;
        let text = match &raw {
            Some(v) => Some(text_of(v).ok_or_else(|| {
                self.fail(
                    field,
                    format!(
                        "{} is an object or array, not a value",
                        from_name(&rule.from)
                    ),
                )
            })?),
            None => None,
        };
        let mapped = match (&rule.map, text) {
            (Some(map), Some(t)) => lookup(map, &t).cloned().ok_or(t).map_err(Some),
            (None, Some(t)) => Ok(t),
            (_, None) => Err(None),
        };
        match (mapped, &rule.default) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(d)) => Ok(d.clone()),
            (Err(Some(t)), None) => Err(self.fail(field, format!("{t:?} is not in its map"))),
            (Err(None), None) => {
                Err(self.fail(field, format!("{} is missing", from_name(&rule.from))))
            }
        }
    }

    fn ts(&self, rule: &Rule) -> Result<i64, Unmapped> {
        let raw = self.raw("ts", &rule.from, &[])?;
        let v = match (raw, &rule.default) {
            (Some(v), _) => v,
            (None, _) => {
                return Err(self.fail("ts", format!("{} is missing", from_name(&rule.from))))
            }
        };
        let bad = |what: &str| self.fail("ts", format!("{v} is not {what}"));
        let ms = match (rule.format, &v) {
            (TsFormat::EpochMs, _) => number(&v)
                .map(|n| n as i64)
                .ok_or_else(|| bad("epoch milliseconds"))?,
            (TsFormat::EpochS, _) => number(&v)
                .map(|n| (n * 1000.0).round() as i64)
                .ok_or_else(|| bad("epoch seconds"))?,
            (TsFormat::Auto, Value::Number(_)) => {
                let n = number(&v).ok_or_else(|| bad("a time"))?;
                if n > 1e11 {
                    n as i64
                } else {
                    (n * 1000.0).round() as i64
                }
            }
            (TsFormat::Rfc3339, Value::String(s)) => {
                rfc3339_ms(s).ok_or_else(|| bad("RFC 3339 with an offset"))?
            }
            (TsFormat::Local, Value::String(s)) => {
                local_ms(s, self.offset_s).ok_or_else(|| bad("local time YYYY-MM-DD hh:mm:ss"))?
            }
            (TsFormat::Auto, Value::String(s)) => auto_ms(s, self.offset_s).ok_or_else(|| {
                bad("RFC 3339 (an offset with or without its colon, an optional [zone] suffix), or local time with or without the site zone's abbreviation")
            })?,
            _ => return Err(bad("a time in the configured format")),
        };
        if !(0..=super::event::MAX_TS_MS).contains(&ms) {
            return Err(bad("a time between 1970 and 2200"));
        }
        Ok(ms)
    }
}

/// A number's value, when `s` is one (`1`, `1.0`, `"1"`, `1e0` alike; not NaN or infinite).
fn numeric(s: &str) -> Option<f64> {
    let t = s.trim();
    // Rust reads "inf" and "NaN" as floats; a value map never means those.
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// `t`'s entry in a value map: the key with the same text, else the key with the same numeric
/// value (a controller sending `0.0` or `"0"` for the code written `0`).
fn lookup<'m>(map: &'m BTreeMap<String, String>, t: &str) -> Option<&'m String> {
    map.get(t).or_else(|| {
        let want = numeric(t)?;
        map.iter()
            .find(|(k, _)| numeric(k) == Some(want))
            .map(|(_, v)| v)
    })
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

fn rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Zone abbreviations a vendor clock appends, and their UTC offsets (seconds). Read only when
/// the offset is the site's (an abbreviation means different zones in different places: `CST` is
/// China Standard Time at a site on +08:00, US Central elsewhere); `UTC`, `GMT` and `Z` always.
const ZONE_ABBREVIATIONS: [(&str, i32); 12] = [
    ("CST", 8 * 3600),
    ("HKT", 8 * 3600),
    ("SGT", 8 * 3600),
    ("AWST", 8 * 3600),
    ("PHT", 8 * 3600),
    ("MYT", 8 * 3600),
    ("JST", 9 * 3600),
    ("KST", 9 * 3600),
    ("ICT", 7 * 3600),
    ("WIB", 7 * 3600),
    ("IST", 5 * 3600 + 1800),
    ("UTC", 0),
];

/// `ts = "auto"` for a string: RFC 3339; the same with a space for `T` or an offset without its
/// colon (`+0800`); with an RFC 9557 zone suffix (`...+08:00[Asia/Shanghai]`, the offset
/// decides); local time followed by the site zone's abbreviation (`2026-12-04 12:37:42 CST` at
/// a +08:00 site), or by `UTC`/`GMT`/`Z`; else local time in the site's zone.
pub fn auto_ms(s: &str, offset_s: i32) -> Option<i64> {
    let mut t = s.trim();
    // RFC 9557: a bracketed suffix after the offset; the offset is what counts, so it must be
    // there (a bare `...12:37:42[UTC]` is not read as site time), and a critical suffix (`[!`)
    // asks for a zone check this reader does not do.
    if t.ends_with(']') {
        let i = t.rfind('[')?;
        if t[i..].starts_with("[!") {
            return None;
        }
        t = t[..i].trim_end();
        return rfc3339_ms(t).or_else(|| rfc3339_ms(&colon_offset(t)));
    }
    if let Some(ms) = rfc3339_ms(t) {
        return Some(ms);
    }
    if let Some(ms) = rfc3339_ms(&colon_offset(t)) {
        return Some(ms);
    }
    // A trailing zone abbreviation.
    if let Some((rest, abbr)) = t.rsplit_once(' ') {
        if !abbr.is_empty() && abbr.bytes().all(|c| c.is_ascii_uppercase()) {
            let off = match abbr {
                "UTC" | "GMT" | "Z" => Some(0),
                _ => ZONE_ABBREVIATIONS
                    .iter()
                    .find(|(a, o)| *a == abbr && *o == offset_s)
                    .map(|(_, o)| *o),
            }?;
            return local_ms(rest, off);
        }
    }
    local_ms(t, offset_s)
}

/// `t` with a space between date and time made a `T`, and `+HHMM` made `+HH:MM`.
fn colon_offset(t: &str) -> String {
    let mut fixed = t.to_string();
    if fixed.len() > 10 && fixed.as_bytes()[10] == b' ' {
        fixed.replace_range(10..11, "T");
    }
    let b = fixed.as_bytes();
    if b.len() > 5
        && matches!(b[b.len() - 5], b'+' | b'-')
        && b[b.len() - 4..].iter().all(u8::is_ascii_digit)
    {
        fixed.insert(fixed.len() - 2, ':');
    }
    fixed
}

/// `YYYY-MM-DD hh:mm:ss[.fff]` (or `T` between) read at UTC offset `offset_s`.
pub fn local_ms(s: &str, offset_s: i32) -> Option<i64> {
    let s = s.trim().replacen('T', " ", 1);
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m.to_string(), f.to_string()),
        None => (s.clone(), String::new()),
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let dt = time::PrimitiveDateTime::parse(&main, &fmt).ok()?;
    let frac_ms = if frac.is_empty() {
        0
    } else {
        if !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let mut f = frac.chars().take(3).collect::<String>();
        while f.len() < 3 {
            f.push('0');
        }
        f.parse::<i64>().ok()?
    };
    let offset = time::UtcOffset::from_whole_seconds(offset_s).ok()?;
    Some(dt.assume_offset(offset).unix_timestamp() * 1000 + frac_ms)
}

fn from_name(f: &From) -> String {
    match f {
        From::Pointer(p) => format!("pointer {p}"),
        From::Topic(i) => format!("topic level {i}"),
        From::Const(_) => "constant".into(),
        From::Join(..) => "join".into(),
    }
}

fn part_name(p: &Part) -> String {
    match p {
        Part::Pointer(p) => p.clone(),
        Part::Topic(i) => format!("topic[{i}]"),
        Part::Field(f) => f.to_string(),
    }
}

/// What [`map`] gives: an event, or the reason it was not one.
pub type Mapped = Result<Event, (Reject, Option<Unmapped>)>;

/// Map one message of `source` onto the canonical event. `offset_s` is the site's UTC offset
/// (for `local` times). A payload over 64 KiB is `too_large`; not text in the source's
/// encoding, `invalid_utf8`; not JSON, `invalid_json`; a rule that fails, or a mapped value the
/// contract does not allow, `unmapped`. For a source with `each`, the first element's outcome
/// ([`map_all`] gives every element's).
pub fn map(source: &Source, topic: &str, payload: &[u8], offset_s: i32) -> Mapped {
    map_all(source, topic, payload, offset_s)
        .into_iter()
        .next()
        .unwrap_or(Err((Reject::Unmapped, None)))
}

/// Map one message of `source`: one outcome, or for a source with `each`, one per element of
/// the array (in order; never empty: an empty or missing array is one `unmapped` outcome).
pub fn map_all(source: &Source, topic: &str, payload: &[u8], offset_s: i32) -> Vec<Mapped> {
    if payload.len() > MAX_PAYLOAD {
        return vec![Err((Reject::TooLarge, None))];
    }
    let unmapped = |field: &'static str, why: String| {
        Some(Unmapped {
            source: source.name.clone(),
            field,
            why,
        })
    };
    let Some(text) = source.encoding.decode(payload) else {
        return vec![Err((
            Reject::InvalidUtf8,
            unmapped(
                "encoding",
                format!("the payload is not {} text", source.encoding.name()),
            ),
        ))];
    };
    // A byte-order mark some firmwares put before their JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Err((
                Reject::InvalidJson,
                unmapped("payload", e.to_string()),
            ))]
        }
    };
    let levels: Vec<&str> = topic.split('/').collect();
    let Some(each) = &source.each else {
        return vec![map_value(source, levels, &value, &value, offset_s)];
    };
    let fail = |why: String| {
        vec![Err((
            Reject::Unmapped,
            Some(Unmapped {
                source: source.name.clone(),
                field: "each",
                why,
            }),
        ))]
    };
    match value.pointer(each) {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                if !item.is_object() {
                    return Err((
                        Reject::Unmapped,
                        Some(Unmapped {
                            source: source.name.clone(),
                            field: "each",
                            why: format!("element {i} is not an object"),
                        }),
                    ));
                }
                map_value(source, levels.clone(), item, &value, offset_s).map_err(|(r, u)| {
                    (
                        r,
                        u.map(|mut u| {
                            u.why = format!("element {i}: {}", u.why);
                            u
                        }),
                    )
                })
            })
            .collect(),
        Some(Value::Array(_)) => fail(format!("{each} is an empty array")),
        Some(_) => fail(format!("{each} is not an array")),
        None => fail(format!("{each} is missing")),
    }
}

/// Map one JSON value (the message, or one element of its `each` array) onto an event.
fn map_value(
    source: &Source,
    topic: Vec<&str>,
    value: &Value,
    root: &Value,
    offset_s: i32,
) -> Mapped {
    let cx = Ctx {
        source,
        topic,
        payload: value,
        root,
        offset_s,
    };
    let un = |u: Unmapped| (Reject::Unmapped, Some(u));
    let mut done: Vec<(&'static str, String)> = Vec::with_capacity(7);
    let kind_text = cx.text("kind", &source.kind, &done).map_err(un)?;
    let kind = Kind::parse(&kind_text).ok_or_else(|| {
        un(cx.fail(
            "kind",
            format!("{kind_text:?} is not access, camera or vehicle"),
        ))
    })?;
    done.push(("kind", kind_text));
    let device = cx.text("device", &source.device, &done).map_err(un)?;
    if !valid_device(&device) {
        return Err(un(cx.fail(
            "device",
            format!("{device:?} is not 1-64 of [A-Za-z0-9_.-]"),
        )));
    }
    done.push(("device", device.clone()));
    let id = cx.text("id", &source.id, &done).map_err(un)?;
    if id.is_empty() || id.chars().count() > 128 {
        return Err(un(cx.fail("id", "must be 1-128 characters")));
    }
    let ts_ms = cx.ts(&source.ts).map_err(un)?;
    let action = cx.text("action", &source.action, &done).map_err(un)?;
    if !valid_word(&action) {
        return Err(un(
            cx.fail("action", format!("{action:?} is not 1-64 of [a-z0-9_]"))
        ));
    }
    let result = match &source.result {
        Some(r) => cx.text("result", r, &done).map_err(un)?,
        None => "ok".to_string(),
    };
    if !valid_word(&result) {
        return Err(un(
            cx.fail("result", format!("{result:?} is not 1-64 of [a-z0-9_]"))
        ));
    }
    let subject = match &source.subject {
        None => None,
        Some(r) => match cx.text("subject", r, &done) {
            Ok(s) if s.is_empty() => None,
            Ok(s) if s.chars().count() <= 128 => Some(s),
            Ok(_) => return Err(un(cx.fail("subject", "longer than 128 characters"))),
            // A subject is optional: a rule that finds none leaves the event without one.
            Err(_) => None,
        },
    };
    Ok(Event {
        kind,
        device,
        id,
        ts_ms,
        action,
        result,
        subject,
    })
}

#[cfg(test)]
mod tests;

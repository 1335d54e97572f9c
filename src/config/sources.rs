//! `[[mqtt.sources]]`: vendor payload mappings as written in the config, and their compilation
//! into the pure core's [`crate::core::mapping::Source`] (with every problem named by its key).
//!
//! Each canonical field is a string or a table:
//! - `"/json/pointer"`: the value at that JSON pointer (RFC 6901) in the payload;
//! - `"topic[N]"`: topic level N (0-based);
//! - any other string: a constant;
//! - a table with one of `pointer`, `topic` (N), `value` (a constant) or `join` (a list of
//!   parts: pointers, `topic[N]`, or `kind`/`device` as mapped; joined with `sep`, default
//!   `-`), and optionally `map` (value text to field value), `default`, and for `ts`, `format`
//!   (`rfc3339`, `epoch_s`, `epoch_ms`, `local`, `auto`: the default).

use super::{problem, Problem};
use crate::core::event::{valid_word, Kind};
use crate::core::mapping::{From, Part, Rule, Source, TsFormat};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// One `[[mqtt.sources]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceCfg {
    /// Shown in rejects and logs; default `sources[i]`.
    pub name: Option<String>,
    /// MQTT topic filter the source's devices publish on; subscribed at QoS 1.
    pub topic: String,
    /// `utf-8` (default), `gb18030` / `gbk`, or `auto` (UTF-8, else GB18030).
    pub encoding: Option<String>,
    /// A JSON pointer to an array: one event per element (a batch upload). Field pointers are
    /// read in the element first, then in the whole message.
    pub each: Option<String>,
    pub kind: FieldCfg,
    pub device: FieldCfg,
    pub id: FieldCfg,
    pub ts: FieldCfg,
    pub action: FieldCfg,
    pub result: Option<FieldCfg>,
    pub subject: Option<FieldCfg>,
}

/// A field's rule: a short string or a table (see the module).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum FieldCfg {
    Short(String),
    Table(FieldTable),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldTable {
    pub pointer: Option<String>,
    pub topic: Option<usize>,
    #[serde(alias = "const")]
    pub value: Option<String>,
    pub join: Option<Vec<String>>,
    pub sep: Option<String>,
    pub map: Option<BTreeMap<String, String>>,
    pub default: Option<String>,
    pub format: Option<String>,
}

impl<'de> Deserialize<'de> for FieldCfg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldCfg;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string (\"/json/pointer\", \"topic[N]\" or a constant) or a table (pointer, topic, value, join, map, default, format)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FieldCfg, E> {
                Ok(FieldCfg::Short(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<FieldCfg, A::Error> {
                FieldTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(FieldCfg::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// `topic[N]` → N.
fn topic_index(s: &str) -> Option<usize> {
    s.strip_prefix("topic[")?.strip_suffix(']')?.parse().ok()
}

fn pointer_ok(p: &str) -> bool {
    p.is_empty()
        || (p.starts_with('/') && !p.contains("~2") && {
            // RFC 6901: `~` only as `~0` or `~1`.
            let b = p.as_bytes();
            b.iter()
                .enumerate()
                .all(|(i, c)| *c != b'~' || matches!(b.get(i + 1), Some(b'0' | b'1')))
        })
}

fn levels(filter: &str) -> Option<usize> {
    if filter.contains('#') {
        None
    } else {
        Some(filter.split('/').count())
    }
}

/// Compile one field's rule; problems are named `{key}...`.
fn compile_field(
    key: &str,
    field: &'static str,
    cfg: &FieldCfg,
    topic_levels: Option<usize>,
    p: &mut Vec<Problem>,
) -> Option<Rule> {
    let topic_ok = |i: usize, key: String, p: &mut Vec<Problem>| {
        if let Some(n) = topic_levels {
            if i >= n {
                p.push(problem(
                    key,
                    format!("topic level {i} does not exist: the source's topic filter has {n} levels (0-{})", n - 1),
                ));
                return false;
            }
        }
        true
    };
    let (from, table) = match cfg {
        FieldCfg::Short(s) => {
            let from = if s.starts_with('/') {
                From::Pointer(s.clone())
            } else if let Some(i) = topic_index(s) {
                From::Topic(i)
            } else {
                if s.is_empty() {
                    p.push(problem(
                        key,
                        "is empty (a JSON pointer, \"topic[N]\" or a constant)",
                    ));
                    return None;
                }
                From::Const(s.clone())
            };
            (from, FieldTable::default())
        }
        FieldCfg::Table(t) => {
            let given = [
                t.pointer.is_some(),
                t.topic.is_some(),
                t.value.is_some(),
                t.join.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if given != 1 {
                p.push(problem(
                    key,
                    "give exactly one of pointer, topic, value or join",
                ));
                return None;
            }
            let from = if let Some(ptr) = &t.pointer {
                From::Pointer(ptr.clone())
            } else if let Some(i) = t.topic {
                From::Topic(i)
            } else if let Some(v) = &t.value {
                From::Const(v.clone())
            } else {
                let mut parts = Vec::new();
                for (j, part) in t.join.as_deref().unwrap_or_default().iter().enumerate() {
                    let pk = format!("{key}.join[{j}]");
                    if part.starts_with('/') {
                        if !pointer_ok(part) {
                            p.push(problem(pk, format!("{part:?} is not a JSON pointer")));
                        }
                        parts.push(Part::Pointer(part.clone()));
                    } else if let Some(i) = topic_index(part) {
                        topic_ok(i, pk, p);
                        parts.push(Part::Topic(i));
                    } else if part == "kind" || part == "device" {
                        if field == "kind" || (field == "device" && part == "device") {
                            p.push(problem(
                                pk,
                                format!("{field} cannot use {part}: it is mapped after"),
                            ));
                        }
                        parts.push(Part::Field(if part == "kind" { "kind" } else { "device" }));
                    } else {
                        p.push(problem(
                            pk,
                            format!("{part:?}: a part is a JSON pointer (\"/a/b\"), \"topic[N]\", \"kind\" or \"device\""),
                        ));
                    }
                }
                if parts.is_empty() {
                    p.push(problem(format!("{key}.join"), "needs at least one part"));
                }
                From::Join(parts, t.sep.clone().unwrap_or_else(|| "-".into()))
            };
            (from, t.clone())
        }
    };
    match &from {
        From::Pointer(ptr) if !pointer_ok(ptr) => {
            p.push(problem(
                key,
                format!("{ptr:?} is not a JSON pointer (\"/a/b\", ~0 and ~1 escapes)"),
            ));
        }
        From::Topic(i) => {
            topic_ok(*i, key.to_string(), p);
        }
        _ => {}
    }
    let format = match (field, &table.format) {
        ("ts", Some(f)) => match TsFormat::parse(f) {
            Some(f) => f,
            None => {
                p.push(problem(
                    format!("{key}.format"),
                    format!("{f:?} is not one of \"rfc3339\", \"epoch_s\", \"epoch_ms\", \"local\", \"auto\""),
                ));
                TsFormat::Auto
            }
        },
        (_, Some(_)) => {
            p.push(problem(format!("{key}.format"), "only ts has a format"));
            TsFormat::Auto
        }
        (_, None) => TsFormat::Auto,
    };
    // Values the field can end up with must be allowed values for it.
    let check = |v: &str, at: String, p: &mut Vec<Problem>| match field {
        "kind" if Kind::parse(v).is_none() => p.push(problem(
            at,
            format!("{v:?} is not access, camera or vehicle"),
        )),
        "action" | "result" if !valid_word(v) => {
            p.push(problem(at, format!("{v:?} is not 1-64 of [a-z0-9_]")))
        }
        "device" if !crate::core::event::valid_device(v) => {
            p.push(problem(at, format!("{v:?} is not 1-64 of [A-Za-z0-9_.-]")))
        }
        _ => {}
    };
    if let From::Const(c) = &from {
        if table.map.is_none() {
            check(c, key.to_string(), p);
        }
    }
    if let Some(map) = &table.map {
        if map.is_empty() {
            p.push(problem(format!("{key}.map"), "is empty"));
        }
        // Keys match numbers by value: two keys of one value must not say different things
        // ("1" = "entry" and "1.0" = "exit" would make 1 and 1.0 differ).
        let num = |k: &str| k.trim().parse::<f64>().ok().filter(|n| n.is_finite());
        for (a, va) in map {
            for (b, vb) in map.range::<String, _>((
                std::ops::Bound::Excluded(a.clone()),
                std::ops::Bound::Unbounded,
            )) {
                if va != vb && num(a).is_some() && num(a) == num(b) {
                    p.push(problem(
                        format!("{key}.map"),
                        format!(
                            "keys {a:?} and {b:?} are the same number but map to {va:?} and {vb:?}"
                        ),
                    ));
                }
            }
        }
        for (k, v) in map {
            check(v, format!("{key}.map.{k:?}"), p);
        }
    }
    if let Some(d) = &table.default {
        check(d, format!("{key}.default"), p);
    }
    if field == "ts" && table.map.is_some() {
        p.push(problem(format!("{key}.map"), "ts takes no map"));
    }
    Some(Rule {
        from,
        map: table.map.clone(),
        default: table.default.clone(),
        format,
    })
}

/// Whether some topic matches both MQTT filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if *x == "+" || *y == "+" || x == y => i += 1,
            _ => return false,
        }
    }
}

/// Compile the sources, pushing one problem per mistake (named `mqtt.sources[i]...`).
pub fn compile(sources: &[SourceCfg], p: &mut Vec<Problem>) -> Vec<Source> {
    let mut out = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let key = format!("mqtt.sources[{i}]");
        let before = p.len();
        if s.topic.is_empty()
            || s.topic.len() > 1024
            || s.topic.split('/').enumerate().any(|(j, l)| {
                (l.contains('#') && (l != "#" || j + 1 != s.topic.split('/').count()))
                    || (l.contains('+') && l != "+")
            })
        {
            p.push(problem(
                format!("{key}.topic"),
                format!("{:?} is not an MQTT topic filter", s.topic),
            ));
        }
        let lv = levels(&s.topic);
        let encoding = match s
            .encoding
            .as_deref()
            .map(crate::core::mapping::Encoding::parse)
        {
            None => crate::core::mapping::Encoding::Utf8,
            Some(Some(e)) => e,
            Some(None) => {
                p.push(problem(
                    format!("{key}.encoding"),
                    format!(
                        "{:?} is not one of \"utf-8\", \"gb18030\" (or \"gbk\"), \"auto\"",
                        s.encoding.as_deref().unwrap_or("")
                    ),
                ));
                crate::core::mapping::Encoding::Utf8
            }
        };
        if let Some(each) = &s.each {
            // "" is the whole payload (a message that is itself an array).
            if !pointer_ok(each) {
                p.push(problem(
                    format!("{key}.each"),
                    format!("{each:?} is not a JSON pointer to an array (\"/events\")"),
                ));
            }
        }
        let f = |name: &'static str, c: &FieldCfg, p: &mut Vec<Problem>| {
            compile_field(&format!("{key}.{name}"), name, c, lv, p)
        };
        let kind = f("kind", &s.kind, p);
        let device = f("device", &s.device, p);
        let id = f("id", &s.id, p);
        let ts = f("ts", &s.ts, p);
        let action = f("action", &s.action, p);
        let result = s.result.as_ref().map(|c| f("result", c, p));
        let subject = s.subject.as_ref().map(|c| f("subject", c, p));
        // The event id is what dedup keys on: a constant would make every event after the first
        // a duplicate (found by a break-it run: `id = "serialNo"` without its `/`).
        if let Some(id) = &id {
            let varies = match &id.from {
                From::Pointer(_) | From::Topic(_) => true,
                From::Const(_) => false,
                From::Join(parts, _) => parts
                    .iter()
                    .any(|x| matches!(x, Part::Pointer(_) | Part::Topic(_))),
            };
            if !varies {
                p.push(problem(
                    format!("{key}.id"),
                    "must come from the payload or the topic (a JSON pointer starts with '/'): a constant id makes every later event a duplicate",
                ));
            }
            // Alerts carry the event id upstream: it must not hold the subject.
            if let Some(Rule {
                from: From::Pointer(sp),
                ..
            }) = &subject.clone().flatten()
            {
                let uses = match &id.from {
                    From::Pointer(ip) => ip == sp,
                    From::Join(parts, _) => parts
                        .iter()
                        .any(|x| matches!(x, Part::Pointer(ip) if ip == sp)),
                    _ => false,
                };
                if uses {
                    p.push(problem(
                        format!("{key}.id"),
                        format!("uses the subject's pointer {sp}: event ids go upstream with alerts, subjects never do"),
                    ));
                }
            }
        }
        if p.len() > before {
            continue;
        }
        if let (Some(kind), Some(device), Some(id), Some(ts), Some(action)) =
            (kind, device, id, ts, action)
        {
            out.push(Source {
                name: s.name.clone().unwrap_or_else(|| format!("sources[{i}]")),
                topic: s.topic.clone(),
                encoding,
                each: s.each.clone(),
                kind,
                device,
                id,
                ts,
                action,
                result: result.flatten(),
                subject: subject.flatten(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    fn problems(toml_text: &str) -> Vec<String> {
        let cfg = format!("[gateway]\nid = \"gw-1\"\n{toml_text}");
        match crate::config::load_str(&cfg) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn the_shipped_examples_compile() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/vendor-sources.toml"
        ))
        .unwrap();
        let cfg = crate::config::load_str(&text).unwrap();
        assert_eq!(cfg.sources().len(), 6);
        let subs = crate::core::mapping::subscriptions(&cfg.mqtt.topics, &cfg.sources());
        assert!(subs.contains(&"parking/+/plate".to_string()), "{subs:?}");
    }

    #[test]
    fn keys_of_one_number_must_agree() {
        let p = problems(
            r#"
[[mqtt.sources]]
topic = "v/+/e"
kind = "access"
device = "topic[1]"
id = "/id"
ts = "/t"
action = { pointer = "/dir", map = { "1" = "entry", "1.0" = "exit", "2" = "exit", "02" = "exit" } }
each = ""
"#,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("mqtt.sources[0].action.map"), "{p:?}");
        assert!(p[0].contains("\"1\" and \"1.0\""), "{p:?}");
    }

    #[test]
    fn every_mistake_names_its_key() {
        let p = problems(
            r#"
[[mqtt.sources]]
topic = "v/+/e"
kind = "door"
device = "topic[5]"
id = { join = ["device", "serial"] }
ts = { pointer = "t", format = "julian" }
action = { pointer = "/a", map = { "1" = "Entry" } }
result = { pointer = "/r", value = "x" }
"#,
        );
        let joined = p.join("\n");
        for key in [
            "mqtt.sources[0].kind: \"door\" is not access",
            "mqtt.sources[0].device: topic level 5 does not exist",
            "mqtt.sources[0].id.join[1]",
            "mqtt.sources[0].ts: \"t\" is not a JSON pointer",
            "mqtt.sources[0].ts.format",
            "mqtt.sources[0].action.map.\"1\": \"Entry\" is not 1-64 of [a-z0-9_]",
            "mqtt.sources[0].result: give exactly one of",
        ] {
            assert!(joined.contains(key), "missing {key:?} in:\n{joined}");
        }
        // Found by a break-it run: a constant id (a forgotten '/'), an id holding the subject, a
        // source taking canonical topics.
        let p = problems(concat!(
            "[[mqtt.sources]]\ntopic = \"v/+/e\"\nkind = \"access\"\ndevice = \"topic[1]\"\nid = \"serialNo\"\nts = \"/ts\"\naction = \"entry\"\n",
            "[[mqtt.sources]]\ntopic = \"w/+/e\"\nkind = \"camera\"\ndevice = \"topic[1]\"\nid = { join = [\"/plate\", \"/time\"] }\nts = \"/ts\"\naction = \"fire_lane_blocked\"\nsubject = \"/plate\"\n",
            "[[mqtt.sources]]\ntopic = \"#\"\nkind = \"access\"\ndevice = \"topic[1]\"\nid = \"/id\"\nts = \"/ts\"\naction = \"entry\"\n",
        ))
        .join("\n");
        assert!(
            p.contains("mqtt.sources[0].id: must come from the payload"),
            "{p}"
        );
        assert!(
            p.contains("mqtt.sources[1].id: uses the subject's pointer /plate"),
            "{p}"
        );
        assert!(
            p.contains("mqtt.sources[2].topic: \"#\" overlaps mqtt.topics"),
            "{p}"
        );
        assert!(super::filters_overlap("zhian/+/+", "zhian/access/door-1"));
        assert!(!super::filters_overlap("hik/+/event", "zhian/+/+"));
        assert!(problems("[[mqtt.sources]]\ntopic = \"a/#/b\"\nkind = \"access\"\ndevice = \"topic[1]\"\nid = \"/id\"\nts = \"/ts\"\naction = \"entry\"\n")
            .iter()
            .any(|p| p.starts_with("mqtt.sources[0].topic")));
        let missing = problems("[[mqtt.sources]]\ntopic = \"a/b\"\nkind = \"access\"\n");
        assert!(missing.iter().any(|p| p.contains("device")), "{missing:?}");
    }
}

//! `[care]`: the care watch (residents by alias, silence limits, quiet hours), its types,
//! defaults and validation.

use super::*;

/// `[care]`: the care watch (独居老人关怀, contract: "Care watch").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Care {
    pub residents: Vec<CareResident>,
}

/// One `[[care.residents]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CareResident {
    /// The card or face id as devices send it. Kept only in the config (printed redacted); the
    /// daemon keeps its care pseudonym. Give `pseudonym` instead to keep it out of the config.
    pub subject: Option<Secret>,
    /// 32 hex digits from `zhian-gateway care-pseudonym`.
    pub pseudonym: Option<String>,
    /// A flat number (`3-2-601`), never a name: 1-32 of `[A-Za-z0-9_.#-]`.
    pub alias: String,
    /// A `silent` notice once no access event of the resident arrived for this long.
    #[serde(default = "default_care_silence")]
    pub silence: Dur,
    /// Quiet hours, site time, `HH:MM-HH:MM` (may wrap midnight): no `silent` notice in them.
    pub quiet: Option<String>,
}

pub(crate) fn default_care_silence() -> Dur {
    Dur::secs(24 * 3600)
}

/// 32 hex digits → 16 bytes.
pub fn parse_pseudonym(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub(crate) fn validate_care(c: &Care, p: &mut Vec<Problem>) {
    let mut aliases = std::collections::BTreeSet::new();
    let mut idents = std::collections::BTreeSet::new();
    for (i, r) in c.residents.iter().enumerate() {
        let key = format!("care.residents[{i}]");
        match (&r.subject, &r.pseudonym) {
            (Some(s), None) if s.0.is_empty() || s.0.chars().count() > 128 => p.push(problem(
                format!("{key}.subject"),
                "must be 1-128 characters",
            )),
            (None, Some(ps)) if parse_pseudonym(ps).is_none() => p.push(problem(
                format!("{key}.pseudonym"),
                "must be 32 hex digits, as `zhian-gateway care-pseudonym` prints",
            )),
            (Some(_), Some(_)) | (None, None) => p.push(problem(
                key.clone(),
                "give subject or pseudonym (one of them)",
            )),
            _ => {}
        }
        let ident = match (&r.subject, &r.pseudonym) {
            (Some(s), _) => format!("s:{}", s.0),
            (None, Some(ps)) => format!("p:{}", ps.to_ascii_lowercase()),
            _ => String::new(),
        };
        if !ident.is_empty() && !idents.insert(ident) {
            p.push(problem(
                key.clone(),
                "the same resident is listed twice (one subject, one alias)",
            ));
        }
        let ok_alias = !r.alias.is_empty()
            && r.alias.chars().count() <= 32
            && r.alias
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_.#-".contains(ch));
        if !ok_alias {
            // The value is not echoed: a refused alias may be a resident's name.
            p.push(problem(
                format!("{key}.alias"),
                "must be a flat number such as \"3-2-601\", 1-32 of [A-Za-z0-9_.#-] (never a name)",
            ));
        } else if !aliases.insert(r.alias.to_ascii_lowercase()) {
            p.push(problem(
                format!("{key}.alias"),
                format!("{:?} is listed twice", r.alias),
            ));
        }
        if r.silence.0 < Duration::from_secs(60) {
            p.push(problem(format!("{key}.silence"), "at least 1m"));
        }
        if let Some(q) = &r.quiet {
            if crate::core::care::Quiet::parse(q).is_none() {
                p.push(problem(
                    format!("{key}.quiet"),
                    format!("{q:?} is not HH:MM-HH:MM (e.g. \"22:00-07:00\")"),
                ));
            }
        }
    }
}

//! Upstream topics: `{prefix}/{gateway}/{leaf}` (contract: "Upstream to the district platform").

use std::fmt;

/// The last level of an upstream topic: which message it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leaf {
    Summary,
    Alert,
    Care,
    Daily,
    Status,
    Heartbeat,
    /// `config/state`: where a fleet configuration change stands (two topic levels).
    ConfigState,
    /// `occupancy`: vehicles inside, once per window.
    Occupancy,
}

impl Leaf {
    /// Every leaf, in the contract's order.
    pub const ALL: [Leaf; 8] = [
        Leaf::Summary,
        Leaf::Alert,
        Leaf::Care,
        Leaf::Daily,
        Leaf::Status,
        Leaf::Heartbeat,
        Leaf::ConfigState,
        Leaf::Occupancy,
    ];

    /// The topic level as written (`summary`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Leaf::Summary => "summary",
            Leaf::Alert => "alert",
            Leaf::Care => "care",
            Leaf::Daily => "daily",
            Leaf::Status => "status",
            Leaf::Heartbeat => "heartbeat",
            Leaf::ConfigState => "config/state",
            Leaf::Occupancy => "occupancy",
        }
    }

    /// The leaf named `s`, if any.
    pub fn parse(s: &str) -> Option<Leaf> {
        Leaf::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{prefix}/{gateway}/{leaf}` (`config/state` is the one leaf of two levels).
pub fn topic(prefix: &str, gateway: &str, leaf: Leaf) -> String {
    format!("{prefix}/{gateway}/{leaf}")
}

/// Whether `id` is a gateway id the contract allows: 1 to 64 of `[a-z0-9-]` (it is a topic
/// level and a database key).
pub fn valid_gateway_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Why a topic is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// Not under `{prefix}/`.
    NotUnderPrefix,
    /// Not `{prefix}/{gateway}/{leaf}` (too few or too many levels).
    Shape,
    /// The gateway level is not 1-64 of `[a-z0-9-]`.
    Gateway,
    /// A leaf the contract does not define.
    UnknownLeaf(String),
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::NotUnderPrefix => f.write_str("not under {prefix}/"),
            TopicError::Shape => f.write_str("not {prefix}/{gateway}/{leaf}"),
            TopicError::Gateway => f.write_str("gateway is not 1-64 of [a-z0-9-]"),
            TopicError::UnknownLeaf(l) => write!(f, "unknown leaf {l:?}"),
        }
    }
}

/// The gateway id and leaf of `topic` under `prefix`.
pub fn parse_topic<'t>(prefix: &str, topic: &'t str) -> Result<(&'t str, Leaf), TopicError> {
    let rest = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(TopicError::NotUnderPrefix)?;
    let (gateway, leaf) = rest
        .split_once('/')
        .filter(|(g, l)| !g.is_empty() && (!l.contains('/') || *l == "config/state"))
        .ok_or(TopicError::Shape)?;
    if !valid_gateway_id(gateway) {
        return Err(TopicError::Gateway);
    }
    let leaf = Leaf::parse(leaf).ok_or_else(|| TopicError::UnknownLeaf(leaf.to_string()))?;
    Ok((gateway, leaf))
}

//! `[modbus]`: devices over TCP and RTU (serial lines), their points (counters, states), word
//! order and register tables, with defaults and validation.

use super::*;

/// `[modbus]`: counters and states polled from Modbus TCP/RTU controllers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Modbus {
    pub devices: Vec<ModbusDevice>,
}

/// One `[[modbus.devices]]` entry: a unit on a TCP connection or an RS-485 line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// Counted under this name (the summary's `device`); 1-64 of [A-Za-z0-9_.-].
    pub name: String,
    /// An example (the reference config's devices): checked like any device, never polled,
    /// never shown. Remove the flag (or the device) once it describes a real one.
    #[serde(default)]
    pub example: bool,
    /// `vehicle` or `access`.
    pub kind: crate::core::event::Kind,
    /// `host:port` of a Modbus TCP device (or gateway).
    #[serde(default)]
    pub tcp: Option<String>,
    /// A serial line (RS-485) shared by every device naming the same `path`.
    #[serde(default)]
    pub rtu: Option<Rtu>,
    /// Unit (slave) id, 0-247 (TCP devices commonly use 1 or 255).
    #[serde(default = "default_unit")]
    pub unit: u8,
    #[serde(default = "default_poll")]
    pub poll: Dur,
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Failed polls in a row before the device counts as offline.
    #[serde(default = "default_offline_after")]
    pub offline_after: u32,
    #[serde(default)]
    pub points: Vec<ModbusPoint>,
}

pub(crate) fn default_unit() -> u8 {
    1
}
pub(crate) fn default_poll() -> Dur {
    Dur::secs(1)
}
pub(crate) fn default_timeout() -> Dur {
    Dur::millis(500)
}
pub(crate) fn default_offline_after() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rtu {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
}

pub(crate) fn default_baud() -> u32 {
    9600
}
pub(crate) fn default_data_bits() -> u8 {
    8
}
pub(crate) fn default_stop_bits() -> u8 {
    1
}

/// `parity`: `"N"`, `"E"`, `"O"` as Modbus tools write it (Telegraf, pymodbus), or `"none"`,
/// `"even"`, `"odd"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    #[serde(alias = "N", alias = "n")]
    None,
    #[serde(alias = "E", alias = "e")]
    Even,
    #[serde(alias = "O", alias = "o")]
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl Table {
    /// Coils and discrete inputs are bits; holding and input registers are 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointType {
    U16,
    U32,
    I32,
    F32,
    Bool,
}

impl PointType {
    /// Registers (or bits) the value spans.
    pub fn width(self) -> u16 {
        match self {
            PointType::U16 | PointType::Bool => 1,
            PointType::U32 | PointType::I32 | PointType::F32 => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (the Modbus convention).
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Counter,
    State,
}

/// One `[[modbus.devices.points]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusPoint {
    pub name: String,
    pub table: Table,
    /// 0-based address.
    pub address: u32,
    #[serde(rename = "type")]
    pub ty: PointType,
    #[serde(default)]
    pub word_order: WordOrder,
    pub role: Role,
    /// Counters: the events' action and result.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub result: Option<String>,
    /// Counters: a decrease that looks like a wrap past the type's maximum is counted as one.
    #[serde(default)]
    pub wrap: bool,
    /// Counters: the glitch rule's bound. A reading that decreases, or rises by more than this
    /// since the last poll, is held for one more poll; if the next reading continues from the
    /// value before it, the held one was a misread and is dropped (counted per device).
    #[serde(default = "default_max_step")]
    pub max_step: u64,
}

pub(crate) fn default_max_step() -> u64 {
    1000
}

pub(crate) fn validate_modbus(m: &Modbus, p: &mut Vec<Problem>) {
    let mut names = std::collections::BTreeSet::new();
    let mut lines: std::collections::BTreeMap<PathBuf, (usize, Rtu)> = Default::default();
    for (i, d) in m.devices.iter().enumerate() {
        let k = |rest: &str| format!("modbus.devices[{i}].{rest}");
        if !crate::core::event::valid_device(&d.name) {
            p.push(problem(
                k("name"),
                format!("{:?} must be 1-64 of [A-Za-z0-9_.-]", d.name),
            ));
        } else if !names.insert((d.kind, d.name.clone())) {
            p.push(problem(
                k("name"),
                format!("{:?} is used by another {} device", d.name, d.kind),
            ));
        }
        if d.kind == crate::core::event::Kind::Camera {
            p.push(problem(k("kind"), "must be vehicle or access"));
        }
        match (&d.tcp, &d.rtu) {
            (Some(_), Some(_)) => p.push(problem(
                k("tcp"),
                "a device has either tcp or rtu, not both",
            )),
            (None, None) => p.push(problem(
                k("tcp"),
                "a device needs tcp = \"host:port\" or rtu = { path = ... }",
            )),
            (Some(addr), None) => {
                if addr
                    .rsplit_once(':')
                    .and_then(|(h, port)| {
                        (!h.is_empty()).then(|| port.parse::<u16>().ok()).flatten()
                    })
                    .is_none()
                {
                    p.push(problem(k("tcp"), format!("{addr:?} is not host:port")));
                }
            }
            (None, Some(r)) => match &r.path {
                None => p.push(problem(
                    k("rtu.path"),
                    "an RTU device needs the serial port path",
                )),
                Some(path) => {
                    if !(1200..=921_600).contains(&r.baud) {
                        p.push(problem(k("rtu.baud"), "between 1200 and 921600"));
                    }
                    if !(5..=8).contains(&r.data_bits) {
                        p.push(problem(k("rtu.data_bits"), "5, 6, 7 or 8"));
                    }
                    if !(1..=2).contains(&r.stop_bits) {
                        p.push(problem(k("rtu.stop_bits"), "1 or 2"));
                    }
                    match lines.get(path) {
                        Some((j, other)) if other != r => p.push(problem(
                            k("rtu"),
                            format!("{} is shared with modbus.devices[{j}] but its line settings differ", path.display()),
                        )),
                        _ => {
                            lines.insert(path.clone(), (i, r.clone()));
                        }
                    }
                }
            },
        }
        if (d.unit == 0 || d.unit > 247) && d.rtu.is_some() {
            p.push(problem(
                k("unit"),
                format!(
                    "{} is not an RTU unit id: use 1-247 (0 is the broadcast address, which no unit answers)",
                    d.unit
                ),
            ));
        }
        if d.poll.0 < Duration::from_millis(10) {
            p.push(problem(k("poll"), "at least 10ms"));
        }
        if d.timeout.0 < Duration::from_millis(10) || d.timeout.0 > Duration::from_secs(30) {
            p.push(problem(k("timeout"), "between 10ms and 30s"));
        }
        if d.offline_after == 0 {
            p.push(problem(k("offline_after"), "at least 1"));
        }
        if d.points.is_empty() {
            p.push(problem(k("points"), "a device needs at least one point"));
        }
        let mut point_names = std::collections::BTreeSet::new();
        for (j, pt) in d.points.iter().enumerate() {
            let k = |rest: &str| format!("modbus.devices[{i}].points[{j}].{rest}");
            if pt.name.is_empty()
                || pt.name.len() > 64
                || !pt
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                p.push(problem(
                    k("name"),
                    format!("{:?} must be 1-64 of [A-Za-z0-9_-]", pt.name),
                ));
            } else if !point_names.insert(pt.name.clone()) {
                p.push(problem(
                    k("name"),
                    format!("{:?} appears twice on this device", pt.name),
                ));
            }
            let end = u64::from(pt.address) + u64::from(pt.ty.width());
            if end > 65_536 {
                p.push(problem(
                    k("address"),
                    format!(
                        "{} (+{} {}) is past the last Modbus address 65535",
                        pt.address,
                        pt.ty.width(),
                        if pt.table.is_bits() {
                            "bits"
                        } else {
                            "registers"
                        }
                    ),
                ));
            }
            if pt.table.is_bits() && pt.ty != PointType::Bool {
                p.push(problem(
                    k("type"),
                    format!("a {:?} table holds bits: use type = \"bool\"", pt.table)
                        .to_lowercase(),
                ));
            }
            match pt.role {
                Role::Counter => {
                    if matches!(pt.ty, PointType::F32 | PointType::Bool) {
                        p.push(problem(
                            k("type"),
                            "a counter needs an integer type (u16, u32 or i32)",
                        ));
                    }
                    match pt.action.as_deref() {
                        Some(a) if crate::core::event::valid_word(a) => {}
                        Some(a) => p.push(problem(
                            k("action"),
                            format!("{a:?} must be 1-64 of [a-z0-9_]"),
                        )),
                        None => p.push(problem(
                            k("action"),
                            "a counter needs an action (e.g. \"entry\")",
                        )),
                    }
                    if let Some(r) = pt.result.as_deref() {
                        if !crate::core::event::valid_word(r) {
                            p.push(problem(
                                k("result"),
                                format!("{r:?} must be 1-64 of [a-z0-9_]"),
                            ));
                        }
                    }
                }
                Role::State => {
                    if pt.action.is_some() || pt.result.is_some() || pt.wrap {
                        p.push(problem(
                            k("role"),
                            "action, result and wrap belong to counters, not states",
                        ));
                    }
                }
            }
        }
    }
}

//! Whose fault a database error is (contract: "Receiver operations"): the message's (a value
//! PostgreSQL cannot store: the message becomes a reject and is acknowledged) or the database's
//! state (down, restarting, disk full, read-only after a failover, a statement timeout, lock
//! conflicts: the batch is retried and nothing is acknowledged). Pure: SQLSTATE in, verdict out.
//!
//! SQLSTATE classes from the PostgreSQL manual, Appendix A "PostgreSQL Error Codes": `22` data
//! exception and `23` integrity constraint violation and `54` program limit exceeded are the
//! value's fault; everything else (`08` connection exception, `25006` read-only SQL transaction,
//! `40` transaction rollback, `53` insufficient resources, `55P03` lock not available, `57`
//! operator intervention, `58` system error, `XX` internal error, and anything unexpected) is
//! the database's state. When in doubt, retry: a wrong "retry" delays a message, a wrong "reject"
//! loses it.

/// The kinds of `zhian_district_db_errors_total{kind}`.
pub const KINDS: [&str; 9] = [
    "connection",
    "partition",
    "disk_full",
    "read_only",
    "timeout",
    "resources",
    "conflict",
    "refused_value",
    "other",
];

/// What to do about a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The message holds a value the database cannot store: reject it, acknowledge it.
    Value,
    /// The database's state, of this kind (one of [`KINDS`]): retry, acknowledge nothing.
    Database(&'static str),
}

impl Fault {
    /// The metric label.
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Value => "refused_value",
            Fault::Database(k) => k,
        }
    }
}

/// Classify by SQLSTATE (`None`: no server error at all, the connection failed or closed).
pub fn classify(sqlstate: Option<&str>) -> Fault {
    let Some(code) = sqlstate else {
        return Fault::Database("connection");
    };
    match code {
        "53100" => Fault::Database("disk_full"),
        "25006" => Fault::Database("read_only"),
        "57014" | "55P03" => Fault::Database("timeout"),
        _ => match code.get(..2).unwrap_or("") {
            "22" | "23" | "54" => Fault::Value,
            "08" | "57" => Fault::Database("connection"),
            "53" => Fault::Database("resources"),
            "40" => Fault::Database("conflict"),
            _ => Fault::Database("other"),
        },
    }
}

/// Classify by SQLSTATE and the server's message: a row with no partition for it (`23514`,
/// "no partition of relation ... found for row") is the schema's state, not the value's: a
/// month not created, or dropped under the receiver. The receiver creates it and retries
/// (found by a break-it run: as a class-23 value fault, each such message became a reject).
pub fn classify_db(sqlstate: Option<&str>, message: Option<&str>) -> Fault {
    if sqlstate == Some("23514")
        && message.is_some_and(|m| m.starts_with("no partition of relation"))
    {
        return Fault::Database("partition");
    }
    classify(sqlstate)
}

/// Classify a tokio-postgres error.
pub fn of(e: &tokio_postgres::Error) -> Fault {
    classify_db(
        e.code().map(|c| c.code()),
        e.as_db_error().map(|d| d.message()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_the_messages_fault_states_are_the_databases() {
        for (code, want) in [
            (Some("22P05"), Fault::Value), // untranslatable character
            (Some("22008"), Fault::Value), // datetime field overflow
            (Some("22003"), Fault::Value), // numeric value out of range
            (Some("23502"), Fault::Value), // not null violation
            (Some("54000"), Fault::Value), // program limit (index row too large)
            (None, Fault::Database("connection")),
            (Some("08006"), Fault::Database("connection")),
            (Some("57P01"), Fault::Database("connection")), // admin shutdown (pg_ctl restart)
            (Some("57P03"), Fault::Database("connection")), // cannot connect now (recovery)
            (Some("57014"), Fault::Database("timeout")),    // statement_timeout
            (Some("55P03"), Fault::Database("timeout")),    // lock_timeout
            (Some("53100"), Fault::Database("disk_full")),
            (Some("53200"), Fault::Database("resources")),
            (Some("25006"), Fault::Database("read_only")),
            (Some("40P01"), Fault::Database("conflict")),
            (Some("40001"), Fault::Database("conflict")),
            (Some("58030"), Fault::Database("other")), // I/O error
            (Some("XX000"), Fault::Database("other")),
            (Some("42P01"), Fault::Database("other")), // a table dropped under us
        ] {
            assert_eq!(classify(code), want, "{code:?}");
            assert!(KINDS.contains(&want.kind()));
        }
        assert_eq!(
            classify_db(
                Some("23514"),
                Some("no partition of relation \"window_rows\" found for row")
            ),
            Fault::Database("partition")
        );
        assert_eq!(
            classify_db(Some("23514"), Some("new row violates check constraint")),
            Fault::Value
        );
    }
}

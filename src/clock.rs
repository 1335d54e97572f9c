//! The wall clock as the daemon reads it (`now_ms`), and the kernel's word on it for
//! `clock.require_sync`. The trust rules and the store clock are pure, in `core::clock`; time
//! formatting is in `core::summary` (`rfc3339_utc`).

/// The wall clock, ms since the Unix epoch (0 before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether the kernel reports the clock synchronized: `adjtimex(2)` read-only, state not
/// `TIME_ERROR` and `STA_UNSYNC` clear. Many boxes and VMs never set this (field notes), so it
/// is consulted only when `clock.require_sync` is on.
pub fn kernel_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

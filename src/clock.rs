//! The kernel's word on the wall clock, for `clock.require_sync` (the trust rules themselves
//! are pure, in `core::clock`).

/// Whether the kernel reports the clock synchronized: `adjtimex(2)` read-only, state not
/// `TIME_ERROR` and `STA_UNSYNC` clear. Many boxes and VMs never set this (field notes), so it
/// is consulted only when `clock.require_sync` is on.
pub fn kernel_synced() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

//! The daemon's last log lines, kept in memory for `fleet diag` (contract: "Fleet
//! configuration"): at most [`LINES`], oldest first, each as written to stderr (escaped and
//! with URL passwords redacted by `logfmt`) and redacted once more when read. The daemon's
//! logs never carry a subject (README "Security and privacy"); the diag test checks the reply's
//! bytes for the subjects a device sent.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Mutex;

/// How many lines are kept.
pub const LINES: usize = 200;

static TAIL: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Keep `line` (a trailing newline is dropped; an empty line is not kept).
pub fn push(line: &str) {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        return;
    }
    let mut t = TAIL.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() == LINES {
        t.pop_front();
    }
    t.push_back(line.to_string());
}

/// The kept lines, oldest first, each redacted again (`logfmt::redact_url`).
pub fn lines() -> Vec<String> {
    let t = TAIL.lock().unwrap_or_else(|e| e.into_inner());
    t.iter().map(|l| crate::logfmt::redact_url(l)).collect()
}

/// A writer that passes everything to `inner` and keeps each complete line in the tail
/// (the log's `MakeWriter` returns one per event).
pub struct Tee<W: Write> {
    pub inner: W,
    buf: Vec<u8>,
}

impl<W: Write> Tee<W> {
    pub fn new(inner: W) -> Self {
        Tee {
            inner,
            buf: Vec::new(),
        }
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.buf.extend_from_slice(&b[..n]);
        while let Some(i) = self.buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            push(&String::from_utf8_lossy(&line));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for Tee<W> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            push(&String::from_utf8_lossy(&self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_whole() {
        for i in 0..(LINES + 5) {
            let mut w = Tee::new(Vec::new());
            write!(w, "line {i} ").unwrap();
            writeln!(w, "password in mqtt://u:secret@h:1 end").unwrap();
        }
        let l = lines();
        assert_eq!(l.len(), LINES);
        assert!(l[0].starts_with("line 5 "), "{}", l[0]);
        assert!(l.iter().all(|x| !x.contains("secret")), "{}", l[0]);
    }
}

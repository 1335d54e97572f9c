//! What reaches the log from outside (topics, device ids, client ids, URLs, peer errors) goes
//! through here, so a line cannot be forged or hide a secret:
//! - [`Clean`] escapes control characters (a newline in an MQTT topic filter or a device id
//!   would otherwise start a new, forged log line; ESC would drive a terminal) and bounds the
//!   length;
//! - [`redact_url`] removes the password from `scheme://user:password@host` URLs;
//! - [`redact_secrets`] also blanks the value of secret-bearing `key = value` lines (a TOML
//!   syntax error quotes the offending line).

use std::fmt;

/// Longest text [`Clean`] shows, in chars; the rest is elided with `…`.
pub const MAX_LOGGED_CHARS: usize = 200;

/// Displays a string with control characters escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...) and at
/// most [`MAX_LOGGED_CHARS`] characters.
pub struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, MAX_LOGGED_CHARS)
    }
}

/// Line and paragraph separators, bidi embeddings, overrides, isolates and marks: they can
/// forge or hide text in a log line without being control characters.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
    )
}

/// `s` with control characters escaped, whole (for messages the program composed, which may
/// quote a value from outside).
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = write_escaped(&mut out, s, usize::MAX);
    out
}

fn write_escaped(f: &mut impl fmt::Write, s: &str, max: usize) -> fmt::Result {
    for (i, c) in s.chars().enumerate() {
        if i == max {
            return f.write_str("…");
        }
        // Line and paragraph separators and bidi overrides can forge or hide text too.
        if c.is_control() || is_invisible_format(c) {
            for e in c.escape_default() {
                f.write_char(e)?;
            }
        } else {
            f.write_char(c)?;
        }
    }
    Ok(())
}

impl fmt::Debug for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A log writer that escapes every control character of a formatted log line except its final
/// newline, so no field, ours or a library's (the embedded broker logs client ids and topic
/// filters), can start a forged line. `keep_ansi` keeps ESC for colours at a terminal.
pub struct EscapingWriter<W> {
    pub inner: W,
    pub keep_ansi: bool,
}

impl<W: std::io::Write> std::io::Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Fast path: printable ASCII (and its own final newline) needs nothing.
        let clean = buf.iter().enumerate().all(|(i, b)| {
            (0x20..0x7f).contains(b)
                || (*b == b'\n' && i + 1 == buf.len())
                || (*b == 0x1b && self.keep_ansi)
        });
        if clean {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let text = String::from_utf8_lossy(buf);
        let (body, nl) = match text.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (&text[..], ""),
        };
        let mut out = String::with_capacity(body.len() + 16);
        for c in body.chars() {
            if c == '\u{1b}' && self.keep_ansi {
                out.push(c);
            } else if c.is_control() || is_invisible_format(c) {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        out.push_str(nl);
        self.inner.write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `s` with the password of every `scheme://user:password@` replaced by `***`
/// (`mqtt://gw:s3cret@host` → `mqtt://gw:***@host`); a userinfo without a password is kept.
pub fn redact_url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL ends at whitespace or a quote. A password may hold '/', '?' or '#' (which a
        // valid URL would escape, but a config may not): the userinfo ends at the last '@'
        // before the URL's end, and a '@' later in a path only widens what is hidden.
        let end = tail
            .find(|c: char| matches!(c, '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Key names whose values are secrets: `password`, `password_hash`, `*_password`, `secret`,
/// `token`, and `database_url`/`url` are handled by [`redact_url`].
fn secret_key(k: &str) -> bool {
    let k = k.trim().trim_matches('"').to_ascii_lowercase();
    // A TOML key (bare or dotted), not prose that happens to hold an '='.
    let is_key = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    is_key && (k.contains("password") || k.contains("secret") || k.contains("token") || k == "key")
}

/// [`redact_url`], and every line of the form `key = value` (TOML, or an error quoting one)
/// whose key names a secret has its value replaced by `"<redacted>"`.
pub fn redact_secrets(s: &str) -> String {
    let s = redact_url(s);
    let mut out = String::with_capacity(s.len());
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        // A quoted TOML error line looks like `12 | password = "x"`: look after the gutter.
        let body_at = line.find('|').map_or(0, |p| p + 1);
        let (gutter, body) = line.split_at(body_at);
        match body.find('=') {
            Some(eq) if secret_key(body[..eq].trim_start_matches(['+', '-', ' '])) => {
                out.push_str(gutter);
                out.push_str(&body[..eq]);
                out.push_str("= \"<redacted>\"");
            }
            _ => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        let forged = "zhian/#\n2026-11-30T00:00:00Z ERROR forged line\u{1b}[31m";
        let s = Clean(forged).to_string();
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{s}");
        assert!(s.contains("\\n2026") && s.contains("\\u{1b}"), "{s}");
        assert_eq!(Clean("门禁-3").to_string(), "门禁-3");
        let long = "x".repeat(1000);
        assert_eq!(
            Clean(&long).to_string().chars().count(),
            MAX_LOGGED_CHARS + 1
        );
    }

    #[test]
    fn the_log_writer_lets_no_field_start_a_line() {
        use std::io::Write;
        let mut w = EscapingWriter {
            inner: Vec::new(),
            keep_ansi: false,
        };
        w.write_all(b"INFO subscribe filter=a/#\nERROR forged\r\x1b[2K\n")
            .unwrap();
        w.write_all("WARN 门禁\u{202e}x\n".as_bytes()).unwrap();
        let s = String::from_utf8(w.inner).unwrap();
        assert_eq!(s.lines().count(), 2, "{s}");
        assert!(
            s.starts_with("INFO subscribe filter=a/#\\nERROR forged\\r\\u{1b}[2K\n"),
            "{s}"
        );
        assert!(s.contains("门禁\\u{202e}x"), "{s}");
        let mut w = EscapingWriter {
            inner: Vec::new(),
            keep_ansi: false,
        };
        w.write_all("INFO topic=d\u{2066}ISOFORGE\u{2069}\n".as_bytes())
            .unwrap();
        let s = String::from_utf8(w.inner).unwrap();
        assert!(s.contains("\\u{2066}ISOFORGE\\u{2069}"), "{s}");
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url("upstream.url: mqtts://gw:s3cr:et@district.example:8883/x is bad"),
            "upstream.url: mqtts://gw:***@district.example:8883/x is bad"
        );
        assert_eq!(redact_url("mqtt://user@h:1"), "mqtt://user@h:1");
        // Passwords holding URL delimiters (found by a break-it run).
        assert_eq!(
            redact_url("\"mqtt://gw:Top/Secret#9@127.0.0.1:33773\": bad"),
            "\"mqtt://gw:***@127.0.0.1:33773\": bad"
        );
        assert!(!redact_url("mqtt://u:ENV#SECRET2@h:1").contains("SECRET2"));
        assert_eq!(redact_url("no url"), "no url");
        assert_eq!(
            redact_url("\"postgres://a:b@db/z\" and mqtt://c:d@e"),
            "\"postgres://a:***@db/z\" and mqtt://c:***@e"
        );
    }

    #[test]
    fn secret_lines_are_redacted() {
        let err = "TOML parse error at line 3, column 12\n  |\n3 | password = \"hunter2\n  |            ^\ninvalid string";
        let r = redact_secrets(err);
        assert!(!r.contains("hunter2"), "{r}");
        assert!(r.contains("3 | password = \"<redacted>\""), "{r}");
        assert!(!redact_secrets("password_hash = \"$argon2id$v=19$m=1\"").contains("argon2id"));
        assert_eq!(redact_secrets("id = \"gw-1\""), "id = \"gw-1\"");
        // Prose with an '=' is not a key line.
        let prose =
            "pw/upstream.password is relative: run under systemd with LoadCredential= (it sets it)";
        assert_eq!(redact_secrets(prose), prose);
    }
}

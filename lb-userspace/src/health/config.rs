//! Health checking in the TOML configuration: per service, timing defaults, the sorry server
//! and quorum; per real server, its checks, `inhibit_on_failure` and notify programs.
//!
//! ```toml
//! [[services]]
//! health = { interval = 6, timeout = 3, retry = 1, delay_before_retry = 1 }
//! sorry_server = "10.0.0.99:80"
//! [[services.backends]]
//! address = "10.0.0.11:80"
//! inhibit_on_failure = true
//! checks = [{ type = "http", path = "/health", status = [200] }, { type = "tcp" }]
//! notify_down = "/usr/local/bin/page-oncall down %h"
//! ```

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::spec::{
    CheckSpec, HttpProbe, HttpVersion, MiscProbe, Probe, SendExpectProbe, Timing, TlsProbe,
    UrlProbe,
};

/// A service's health settings (the model).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHealth {
    /// Takes new connections while no real server is usable (or the quorum is lost).
    #[serde(default)]
    pub sorry_server: Option<(IpAddr, u16)>,
    /// A recovered real server takes connections again only after this long.
    #[serde(default)]
    pub reentry_delay: Duration,
    /// Sum of alive servers' weights below which the service is "down" (0: no quorum).
    #[serde(default)]
    pub quorum: u32,
    #[serde(default)]
    pub hysteresis: u32,
    #[serde(default)]
    pub quorum_up: Option<Vec<String>>,
    #[serde(default)]
    pub quorum_down: Option<Vec<String>>,
}

/// A real server's health settings (the model).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// Keep a failed server with weight 0 (its connections go on) instead of removing it.
    #[serde(default)]
    pub inhibit_on_failure: bool,
    #[serde(default)]
    pub notify_up: Option<Vec<String>>,
    #[serde(default)]
    pub notify_down: Option<Vec<String>>,
}

/// `health = { ... }` of a service: defaults for its checks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTiming {
    pub interval: Option<f64>,
    pub timeout: Option<f64>,
    pub retry: Option<u32>,
    pub delay_before_retry: Option<f64>,
    pub warmup: Option<f64>,
    pub alpha: Option<bool>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

/// One entry of `checks = [...]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCheck {
    #[serde(rename = "type")]
    pub kind: String,
    pub connect_ip: Option<String>,
    pub connect_port: Option<u16>,
    pub bind: Option<String>,
    pub interval: Option<f64>,
    pub timeout: Option<f64>,
    pub retry: Option<u32>,
    pub delay_before_retry: Option<f64>,
    pub warmup: Option<f64>,
    pub alpha: Option<bool>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    // http / https
    pub path: Option<String>,
    pub urls: Option<Vec<FileUrl>>,
    pub status: Option<Vec<toml::Value>>,
    pub digest: Option<String>,
    pub virtualhost: Option<String>,
    pub version: Option<String>,
    pub sni: Option<String>,
    pub verify: Option<bool>,
    pub fast_recovery: Option<bool>,
    // smtp
    pub helo: Option<String>,
    // dns
    pub query_type: Option<String>,
    pub name: Option<String>,
    // udp
    pub payload: Option<String>,
    pub require_reply: Option<bool>,
    pub reply: Option<String>,
    // file
    pub file: Option<String>,
    /// keepalived track_file semantics: value × weight added (0: value 0 = up).
    pub weight: Option<i32>,
    pub reverse: Option<bool>,
    // misc
    pub command: Option<String>,
    pub shell: Option<bool>,
    pub dynamic: Option<bool>,
    pub user: Option<String>,
    pub group: Option<String>,
    // send_expect
    pub send: Option<String>,
    pub expect: Option<String>,
    pub program: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUrl {
    pub path: String,
    pub status: Option<Vec<toml::Value>>,
    pub digest: Option<String>,
    pub virtualhost: Option<String>,
}

/// A duration in seconds as the configuration gives it (0 to a day).
pub fn secs(v: f64, what: &str) -> Result<Duration, String> {
    if !(0.0..=86400.0).contains(&v) || v.is_nan() {
        return Err(format!(
            "{what} must be between 0 and 86400 seconds, not {v}"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Splits a command line into words as a shell would, without expanding anything: blanks
/// separate; `'...'` is literal; in `"..."` a backslash escapes only `"`, `\`, `$` and
/// `` ` ``; elsewhere it escapes any character. Returns the words and whether a quote was
/// left open (the open quote runs to the end, as keepalived reads it).
pub fn split_words(s: &str) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut open = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = cur.take() {
                    out.push(w);
                }
            }
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                open = true;
                for x in chars.by_ref() {
                    if x == '\'' {
                        open = false;
                        break;
                    }
                    w.push(x);
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                open = true;
                while let Some(x) = chars.next() {
                    match x {
                        '"' => {
                            open = false;
                            break;
                        }
                        '\\' => {
                            if let Some(n) = chars.next() {
                                if !matches!(n, '"' | '\\' | '$' | '`') {
                                    w.push('\\');
                                }
                                w.push(n);
                            }
                        }
                        x => w.push(x),
                    }
                }
            }
            '\\' => {
                let w = cur.get_or_insert_with(String::new);
                if let Some(n) = chars.next() {
                    w.push(n);
                }
            }
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = cur {
        out.push(w);
    }
    (out, open)
}

/// [`split_words`] for a configuration file: an open quote or an empty command is an error.
pub fn split_command(s: &str) -> Result<Vec<String>, String> {
    let (words, open) = split_words(s);
    if open {
        return Err(format!("unterminated quote in command \"{s}\""));
    }
    if words.is_empty() {
        return Err("empty command".into());
    }
    Ok(words)
}

/// Piranha's escapes in send/expect strings: `\n`, `\r`, `\t`, `\\`.
pub fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'\\' {
            match it.next() {
                Some(b'n') => out.push(b'\n'),
                Some(b'r') => out.push(b'\r'),
                Some(b't') => out.push(b'\t'),
                Some(b'\\') => out.push(b'\\'),
                Some(o) => {
                    out.push(b'\\');
                    out.push(o);
                }
                None => out.push(b'\\'),
            }
        } else {
            out.push(b);
        }
    }
    out
}

/// The reverse of [`unescape`] (for writing a configuration back).
pub fn escape(b: &[u8]) -> String {
    let mut s = String::new();
    for c in String::from_utf8_lossy(b).chars() {
        match c {
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\\' => s.push_str("\\\\"),
            c => s.push(c),
        }
    }
    s
}

/// Hexadecimal bytes (blanks ignored).
pub fn hex(s: &str, what: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !s.len().is_multiple_of(2) || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{what} \"{s}\" is not hexadecimal bytes"));
    }
    Ok((0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or(0))
        .collect())
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn status_ranges(v: &[toml::Value]) -> Result<Vec<(u16, u16)>, String> {
    let mut out = Vec::new();
    for x in v {
        let r = match x {
            toml::Value::Integer(n) => (*n, *n),
            toml::Value::String(s) => {
                let (a, b) = s.split_once('-').ok_or_else(|| {
                    format!("status \"{s}\" is not a code or a range like \"200-299\"")
                })?;
                let p = |t: &str| {
                    t.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("status \"{s}\" is not a range like \"200-299\""))
                };
                (p(a)?, p(b)?)
            }
            other => return Err(format!("status {other} is not a code or a range")),
        };
        if !(100..=599).contains(&r.0) || !(100..=599).contains(&r.1) || r.0 > r.1 {
            return Err(format!(
                "status {}-{} is not within 100-599 (low to high)",
                r.0, r.1
            ));
        }
        out.push((r.0 as u16, r.1 as u16));
    }
    Ok(out)
}

/// An MD5 digest as 32 hexadecimal digits (keepalived's `genhash` output).
pub fn digest(s: &str) -> Result<[u8; 16], String> {
    let b = hex(s, "digest")?;
    b.try_into()
        .map_err(|_| format!("digest \"{s}\" is not an MD5 (32 hexadecimal digits)"))
}

fn ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{what} \"{s}\" is not an IP address"))
}

/// keepalived's DNS query types.
pub const DNS_TYPES: [(&str, u16); 9] = [
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("RRSIG", 46),
    ("DNSKEY", 48),
];

/// A check as configured, with the service's defaults and the type's keepalived defaults.
pub fn check(c: &FileCheck, defaults: &FileTiming) -> Result<CheckSpec, String> {
    let kind = c.kind.as_str();
    let probe = match kind {
        "tcp" => Probe::Tcp,
        "http" | "https" => {
            let mut urls = Vec::new();
            if let Some(p) = &c.path {
                urls.push(UrlProbe {
                    path: p.clone(),
                    status: status_ranges(c.status.as_deref().unwrap_or(&[]))?,
                    digest: c.digest.as_deref().map(digest).transpose()?,
                    virtualhost: None,
                });
            } else if c.status.is_some() || c.digest.is_some() {
                return Err("status and digest belong to a path (or to each of urls)".into());
            }
            for u in c.urls.iter().flatten() {
                urls.push(UrlProbe {
                    path: u.path.clone(),
                    status: status_ranges(u.status.as_deref().unwrap_or(&[]))?,
                    digest: u.digest.as_deref().map(digest).transpose()?,
                    virtualhost: u.virtualhost.clone(),
                });
            }
            if urls.is_empty() {
                urls.push(UrlProbe {
                    path: "/".into(),
                    status: Vec::new(),
                    digest: None,
                    virtualhost: None,
                });
            }
            if let Some(u) = urls.iter().find(|u| !u.path.starts_with('/')) {
                return Err(format!("path \"{}\" must start with /", u.path));
            }
            let version = match c.version.as_deref() {
                None | Some("1.0") => HttpVersion::Http10,
                Some("1.0C") => HttpVersion::Http10Close,
                Some("1.1") => HttpVersion::Http11,
                Some(v) => return Err(format!("version \"{v}\" is not one of: 1.0, 1.0C, 1.1")),
            };
            if kind == "http" && (c.sni.is_some() || c.verify.is_some()) {
                return Err("sni and verify are for type = \"https\"".into());
            }
            Probe::Http(HttpProbe {
                tls: (kind == "https").then(|| TlsProbe {
                    sni: c.sni.clone(),
                    verify: c.verify.unwrap_or(false),
                }),
                urls,
                version,
                virtualhost: c.virtualhost.clone(),
                fast_recovery: c.fast_recovery.unwrap_or(false),
            })
        }
        "smtp" => Probe::Smtp {
            helo: c
                .helo
                .clone()
                .unwrap_or_else(|| "smtpchecker.keepalived.org".into()),
        },
        "dns" => {
            let t = c.query_type.as_deref().unwrap_or("SOA");
            let qtype = DNS_TYPES
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(t))
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    format!("query_type \"{t}\" is not one of: A, NS, CNAME, SOA, MX, TXT, AAAA, RRSIG, DNSKEY")
                })?;
            Probe::Dns {
                qtype,
                name: c.name.clone().unwrap_or_else(|| ".".into()),
            }
        }
        "udp" => Probe::Udp {
            payload: c
                .payload
                .as_deref()
                .map(|p| hex(p, "payload"))
                .transpose()?
                .unwrap_or_default(),
            require_reply: c.require_reply.unwrap_or(false),
            reply: c.reply.as_deref().map(|p| hex(p, "reply")).transpose()?,
        },
        "ping" => Probe::Ping,
        "file" => {
            if let Some(w) = c.weight
                && !(-65535..=65535).contains(&w)
            {
                return Err(format!("weight must be between -65535 and 65535, not {w}"));
            }
            if c.reverse.is_some() && c.weight.is_none() {
                return Err("reverse goes with a weight".into());
            }
            Probe::File {
                path: c
                    .file
                    .clone()
                    .ok_or("a file check needs file = \"/path\"")?,
                weight: c.weight,
                reverse: c.reverse.unwrap_or(false),
            }
        }
        "misc" => {
            let cmd = c
                .command
                .as_deref()
                .ok_or("a misc check needs command = \"/path/to/program args\"")?;
            let shell = c.shell.unwrap_or(false);
            Probe::Misc(MiscProbe {
                argv: if shell {
                    vec![cmd.to_string()]
                } else {
                    split_command(cmd)?
                },
                shell,
                dynamic: c.dynamic.unwrap_or(false),
                user: c.user.clone(),
                group: c.group.clone(),
            })
        }
        "send_expect" => Probe::SendExpect(SendExpectProbe {
            send: unescape(c.send.as_deref().unwrap_or("")),
            expect: unescape(c.expect.as_deref().unwrap_or("")),
            program: c.program.as_deref().map(split_command).transpose()?,
        }),
        other => {
            return Err(format!(
                "check type \"{other}\" is not one of: tcp, http, https, smtp, dns, udp, ping, file, misc, send_expect"
            ));
        }
    };
    // Options that do not belong to the type are refused (a typo must not pass silently).
    let stray: &[(&str, bool)] = &[
        (
            "path",
            c.path.is_some() && !matches!(kind, "http" | "https"),
        ),
        (
            "urls",
            c.urls.is_some() && !matches!(kind, "http" | "https"),
        ),
        ("helo", c.helo.is_some() && kind != "smtp"),
        ("query_type", c.query_type.is_some() && kind != "dns"),
        ("name", c.name.is_some() && kind != "dns"),
        ("payload", c.payload.is_some() && kind != "udp"),
        ("file", c.file.is_some() && kind != "file"),
        ("weight", c.weight.is_some() && kind != "file"),
        ("reverse", c.reverse.is_some() && kind != "file"),
        ("command", c.command.is_some() && kind != "misc"),
        ("send", c.send.is_some() && kind != "send_expect"),
        ("expect", c.expect.is_some() && kind != "send_expect"),
    ];
    if let Some((name, _)) = stray.iter().find(|(_, bad)| *bad) {
        return Err(format!("{name} does not apply to a {kind} check"));
    }
    // keepalived's defaults per type (check_api.c:queue_checker and friends).
    let d = defaults;
    let interval = secs(c.interval.or(d.interval).unwrap_or(60.0), "interval")?;
    if interval.is_zero() {
        return Err("interval must be more than 0 seconds".into());
    }
    let default_retry = match kind {
        "dns" => 3,
        "misc" | "file" => 0,
        _ => 1,
    };
    let default_dbr = match kind {
        "http" | "https" => Some(3.0),
        "dns" => None,
        _ => Some(1.0),
    };
    let timing = Timing {
        interval,
        timeout: secs(c.timeout.or(d.timeout).unwrap_or(5.0), "timeout")?,
        retry: c.retry.or(d.retry).unwrap_or(default_retry),
        delay_before_retry: match c
            .delay_before_retry
            .or(d.delay_before_retry)
            .or(default_dbr)
        {
            Some(v) => secs(v, "delay_before_retry")?,
            None => interval,
        },
        warmup: match c.warmup.or(d.warmup) {
            Some(v) => secs(v, "warmup")?,
            None => interval,
        },
        alpha: c.alpha.or(d.alpha).unwrap_or(false),
        rise: c.rise.or(d.rise).unwrap_or(1).max(1),
        fall: c.fall.or(d.fall).unwrap_or(0),
    };
    if timing.timeout.is_zero() {
        return Err("timeout must be more than 0 seconds".into());
    }
    Ok(CheckSpec {
        probe,
        connect_ip: c
            .connect_ip
            .as_deref()
            .map(|s| ip(s, "connect_ip"))
            .transpose()?,
        connect_port: c.connect_port,
        bind: c.bind.as_deref().map(|s| ip(s, "bind")).transpose()?,
        timing,
    })
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn command_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty()
                || a.chars()
                    .any(|c| c.is_whitespace() || "\"'\\$`".contains(c))
            {
                // Double quotes: what split_words reads back unchanged.
                let mut s = String::from("\"");
                for c in a.chars() {
                    if matches!(c, '"' | '\\' | '$' | '`') {
                        s.push('\\');
                    }
                    s.push(c);
                }
                s.push('"');
                s
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command as written in the file (see [`split_command`]).
pub fn command_text(argv: &[String]) -> String {
    command_line(argv)
}

fn status_text(s: &[(u16, u16)]) -> String {
    let v: Vec<String> = s
        .iter()
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("\"{a}-{b}\"")
            }
        })
        .collect();
    format!("[{}]", v.join(", "))
}

/// A check as one inline table, every setting explicit (so that it reads back the same).
pub fn render_check(c: &CheckSpec) -> String {
    let mut p: Vec<String> = Vec::new();
    let t = &c.timing;
    match &c.probe {
        Probe::Tcp => p.push("type = \"tcp\"".into()),
        Probe::Http(h) => {
            p.push(format!(
                "type = \"{}\"",
                if h.tls.is_some() { "https" } else { "http" }
            ));
            let urls: Vec<String> = h
                .urls
                .iter()
                .map(|u| {
                    let mut f = vec![format!("path = {}", q(&u.path))];
                    if !u.status.is_empty() {
                        f.push(format!("status = {}", status_text(&u.status)));
                    }
                    if let Some(d) = u.digest {
                        f.push(format!("digest = \"{}\"", hex_string(&d)));
                    }
                    if let Some(v) = &u.virtualhost {
                        f.push(format!("virtualhost = {}", q(v)));
                    }
                    format!("{{ {} }}", f.join(", "))
                })
                .collect();
            p.push(format!("urls = [{}]", urls.join(", ")));
            p.push(format!(
                "version = \"{}\"",
                match h.version {
                    HttpVersion::Http10 => "1.0",
                    HttpVersion::Http10Close => "1.0C",
                    HttpVersion::Http11 => "1.1",
                }
            ));
            if let Some(v) = &h.virtualhost {
                p.push(format!("virtualhost = {}", q(v)));
            }
            if h.fast_recovery {
                p.push("fast_recovery = true".into());
            }
            if let Some(tls) = &h.tls {
                if let Some(s) = &tls.sni {
                    p.push(format!("sni = {}", q(s)));
                }
                p.push(format!("verify = {}", tls.verify));
            }
        }
        Probe::Smtp { helo } => {
            p.push("type = \"smtp\"".into());
            p.push(format!("helo = {}", q(helo)));
        }
        Probe::Dns { qtype, name } => {
            p.push("type = \"dns\"".into());
            let t = DNS_TYPES
                .iter()
                .find(|(_, v)| v == qtype)
                .map_or("SOA", |(n, _)| n);
            p.push(format!("query_type = \"{t}\""));
            p.push(format!("name = {}", q(name)));
        }
        Probe::Udp {
            payload,
            require_reply,
            reply,
        } => {
            p.push("type = \"udp\"".into());
            p.push(format!("payload = \"{}\"", hex_string(payload)));
            p.push(format!("require_reply = {require_reply}"));
            if let Some(r) = reply {
                p.push(format!("reply = \"{}\"", hex_string(r)));
            }
        }
        Probe::Ping => p.push("type = \"ping\"".into()),
        Probe::File {
            path,
            weight,
            reverse,
        } => {
            p.push("type = \"file\"".into());
            p.push(format!("file = {}", q(path)));
            if let Some(w) = weight {
                p.push(format!("weight = {w}"));
                p.push(format!("reverse = {reverse}"));
            }
        }
        Probe::Misc(m) => {
            p.push("type = \"misc\"".into());
            let cmd = if m.shell {
                m.argv.first().cloned().unwrap_or_default()
            } else {
                command_line(&m.argv)
            };
            p.push(format!("command = {}", q(&cmd)));
            p.push(format!("shell = {}", m.shell));
            p.push(format!("dynamic = {}", m.dynamic));
            if let Some(u) = &m.user {
                p.push(format!("user = {}", q(u)));
            }
            if let Some(g) = &m.group {
                p.push(format!("group = {}", q(g)));
            }
        }
        Probe::SendExpect(s) => {
            p.push("type = \"send_expect\"".into());
            p.push(format!("send = {}", q(&escape(&s.send))));
            p.push(format!("expect = {}", q(&escape(&s.expect))));
            if let Some(prog) = &s.program {
                p.push(format!("program = {}", q(&command_line(prog))));
            }
        }
    }
    if let Some(a) = c.connect_ip {
        p.push(format!("connect_ip = \"{a}\""));
    }
    if let Some(port) = c.connect_port {
        p.push(format!("connect_port = {port}"));
    }
    if let Some(b) = c.bind {
        p.push(format!("bind = \"{b}\""));
    }
    let f = |d: Duration| {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 {
            format!("{s:.1}")
        } else {
            format!("{s}")
        }
    };
    p.push(format!("interval = {}", f(t.interval)));
    p.push(format!("timeout = {}", f(t.timeout)));
    p.push(format!("retry = {}", t.retry));
    p.push(format!("delay_before_retry = {}", f(t.delay_before_retry)));
    p.push(format!("warmup = {}", f(t.warmup)));
    p.push(format!("alpha = {}", t.alpha));
    p.push(format!("rise = {}", t.rise));
    p.push(format!("fall = {}", t.fall));
    format!("{{ {} }}", p.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CheckSpec, String> {
        let c: FileCheck = toml::from_str(text).map_err(|e| e.to_string())?;
        check(&c, &FileTiming::default())
    }

    #[test]
    fn defaults_follow_keepalived() {
        let c = parse("type = \"tcp\"").unwrap();
        assert_eq!(c.timing.interval, Duration::from_secs(60));
        assert_eq!(c.timing.retry, 1);
        assert_eq!(c.timing.delay_before_retry, Duration::from_secs(1));
        assert_eq!(c.timing.warmup, Duration::from_secs(60));
        let h = parse("type = \"http\"\ninterval = 6").unwrap();
        assert_eq!(h.timing.delay_before_retry, Duration::from_secs(3));
        let d = parse("type = \"dns\"\ninterval = 6").unwrap();
        assert_eq!(d.timing.retry, 3);
        assert_eq!(d.timing.delay_before_retry, Duration::from_secs(6));
        assert_eq!(
            d.probe,
            Probe::Dns {
                qtype: 6,
                name: ".".into()
            }
        );
        let m = parse("type = \"misc\"\ncommand = \"/bin/check --host %h 'a b'\"").unwrap();
        assert_eq!(m.timing.retry, 0);
        match m.probe {
            Probe::Misc(m) => assert_eq!(m.argv, ["/bin/check", "--host", "%h", "a b"]),
            _ => unreachable!(),
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (text, want) in [
            ("type = \"tcpp\"", "check type \"tcpp\" is not one of"),
            (
                "type = \"tcp\"\npath = \"/\"",
                "path does not apply to a tcp check",
            ),
            ("type = \"http\"\npath = \"x\"", "must start with /"),
            (
                "type = \"http\"\npath = \"/\"\nstatus = [\"200-99\"]",
                "not within 100-599",
            ),
            (
                "type = \"http\"\npath = \"/\"\ndigest = \"abcd\"",
                "not an MD5",
            ),
            (
                "type = \"http\"\nsni = \"x\"",
                "sni and verify are for type = \"https\"",
            ),
            (
                "type = \"dns\"\nquery_type = \"PTR\"",
                "query_type \"PTR\" is not one of",
            ),
            ("type = \"misc\"", "needs command"),
            ("type = \"misc\"\ncommand = \"'open\"", "unterminated quote"),
            (
                "type = \"tcp\"\ninterval = 0",
                "interval must be more than 0",
            ),
            (
                "type = \"tcp\"\nconnect_ip = \"x\"",
                "connect_ip \"x\" is not an IP",
            ),
            ("type = \"udp\"\npayload = \"zz\"", "not hexadecimal"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    /// Every kind, written back, reads back the same.
    #[test]
    fn render_round_trip() {
        for text in [
            "type = \"tcp\"\nconnect_port = 81\nbind = \"10.0.0.1\"\ninterval = 2.5",
            "type = \"https\"\nurls = [{ path = \"/a\", status = [200, \"300-399\"], digest = \"0123456789abcdef0123456789abcdef\" }, { path = \"/b\", virtualhost = \"x\" }]\nsni = \"example.org\"\nversion = \"1.1\"",
            "type = \"smtp\"\nhelo = \"me\"",
            "type = \"dns\"\nquery_type = \"aaaa\"\nname = \"example.org\"",
            "type = \"udp\"\npayload = \"00ff\"\nrequire_reply = true\nreply = \"01\"",
            "type = \"ping\"\nalpha = true\nrise = 2\nfall = 3",
            "type = \"file\"\nfile = \"/run/weight\"",
            "type = \"file\"\nfile = \"/run/weight\"\nweight = -3\nreverse = true",
            "type = \"misc\"\ncommand = \"/bin/x 'a b' %h\"\ndynamic = true\nuser = \"nobody\"",
            "type = \"misc\"\ncommand = \"exit $(cat /x)\"\nshell = true",
            "type = \"send_expect\"\nsend = \"GET / HTTP/1.0\\\\r\\\\n\\\\r\\\\n\"\nexpect = \"HTTP\"",
            "type = \"send_expect\"\nexpect = \"ok\"\nprogram = \"/bin/check %h\"",
        ] {
            let c = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let written = render_check(&c);
            let back: FileCheck = toml::from_str(&format!("x = {written}"))
                .map(|v: toml::Table| v["x"].clone().try_into().unwrap())
                .unwrap();
            assert_eq!(
                check(&back, &FileTiming::default()).unwrap(),
                c,
                "{written}"
            );
        }
        assert_eq!(unescape("a\\r\\nb\\tc\\\\"), b"a\r\nb\tc\\");
        assert_eq!(escape(b"a\r\nb\tc\\"), "a\\r\\nb\\tc\\\\");
    }
}

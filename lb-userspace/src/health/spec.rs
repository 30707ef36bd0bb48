//! What a health check is, once configured: the probe (what is sent and what must come
//! back), where it goes, and its timing. Built from the TOML configuration or from a
//! keepalived.conf checker block; the probes (`probe`) and the state machine (`machine`)
//! work from these only.

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

/// One checker of one real server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub probe: Probe,
    /// Address probed (keepalived `connect_ip`); `None`: the real server's.
    #[serde(default)]
    pub connect_ip: Option<IpAddr>,
    /// Port probed (`connect_port`); `None`: the real server's (for a real server without a
    /// port, the service's).
    #[serde(default)]
    pub connect_port: Option<u16>,
    /// Source address of the probe (`bindto`).
    #[serde(default)]
    pub bind: Option<IpAddr>,
    pub timing: Timing,
}

/// When a checker runs and how its results become up/down (keepalived's semantics, plus
/// rise/fall counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// Time between checks (`delay_loop`).
    pub interval: Duration,
    /// Time one attempt may take (`connect_timeout`; for MISC_CHECK its `misc_timeout`).
    pub timeout: Duration,
    /// Extra attempts before an up checker goes down (`retry`).
    pub retry: u32,
    /// Time between a failed attempt and its retry (`delay_before_retry`).
    pub delay_before_retry: Duration,
    /// The first check comes after a random delay in [0, warmup] (plus 1 s, as keepalived).
    pub warmup: Duration,
    /// Start down until the first success (`alpha`); otherwise start up and go down at the
    /// first failure.
    pub alpha: bool,
    /// Consecutive successes a down checker needs to come up (keepalived: 1).
    pub rise: u32,
    /// Consecutive failed attempts (retries included) an up checker needs to go down;
    /// `0`: `retry + 1`, keepalived's rule.
    pub fall: u32,
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Probe {
    /// TCP_CHECK: the connection completes within the timeout.
    Tcp,
    /// HTTP_GET / SSL_GET: every URL answers (one URL per run, round robin while up).
    Http(HttpProbe),
    /// SMTP_CHECK: banner 220, `HELO name` → 250, `QUIT`.
    Smtp { helo: String },
    /// DNS_CHECK over UDP: a reply with the query's id, QR set and RCODE 0.
    Dns { qtype: u16, name: String },
    /// UDP_CHECK: the datagram is sent; with `require_reply` a reply must come (and start
    /// with `reply`, if given); without, only an ICMP port unreachable fails it.
    Udp {
        payload: Vec<u8>,
        require_reply: bool,
        reply: Option<Vec<u8>>,
    },
    /// PING_CHECK: an ICMP / ICMPv6 echo reply.
    Ping,
    /// FILE_CHECK: the file holds a number. Without `weight`: its value is the weight (0 or
    /// less: down). With `weight` (keepalived's track_file): 0 = value 0 is up, anything
    /// else down; otherwise up, and value × weight (negated with `reverse`) is added to the
    /// server's configured weight.
    File {
        path: String,
        #[serde(default)]
        weight: Option<i32>,
        #[serde(default)]
        reverse: bool,
    },
    /// MISC_CHECK: a program's exit status (0 = up; with `dynamic`, 2..255 = up with weight
    /// exit - 2, 1 = down).
    Misc(MiscProbe),
    /// Piranha's nanny: send `send` (empty: connect only), the answer must contain `expect`
    /// (empty: anything); or, with `program`, run it and expect its output instead.
    SendExpect(SendExpectProbe),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpProbe {
    /// TLS (SSL_GET) and its settings.
    pub tls: Option<TlsProbe>,
    pub urls: Vec<UrlProbe>,
    pub version: HttpVersion,
    /// Host header default (keepalived `virtualhost` of the checker / real server / service).
    pub virtualhost: Option<String>,
    /// After a failed URL recovers, check every URL at once (not one per interval).
    pub fast_recovery: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsProbe {
    /// Server name sent (SNI); `None`: no SNI (keepalived's default).
    pub sni: Option<String>,
    /// Verify the certificate against the system roots (keepalived does not).
    pub verify: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpVersion {
    /// `HTTP/1.0` without `Connection: close` (keepalived's default).
    Http10,
    /// `HTTP/1.0` with `Connection: close` (`1.0C`).
    Http10Close,
    /// `HTTP/1.1` with `Connection: close`.
    Http11,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlProbe {
    pub path: String,
    /// Accepted status ranges (inclusive); empty: 200-299.
    pub status: Vec<(u16, u16)>,
    /// MD5 of the body (after the headers), as keepalived's `genhash` prints it.
    pub digest: Option<[u8; 16]>,
    /// Host header for this URL.
    pub virtualhost: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiscProbe {
    /// Program and arguments (`%h` is replaced by the real server's address, `%p` by its
    /// port). Run without a shell unless `shell`.
    pub argv: Vec<String>,
    pub shell: bool,
    /// Exit statuses 2..255 set the weight (`misc_dynamic`).
    pub dynamic: bool,
    /// Run as this user (and group); `None`: the configured script user.
    pub user: Option<String>,
    pub group: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendExpectProbe {
    /// Bytes sent after connecting (`\n`, `\r`, `\t` already unescaped); empty: connect only.
    pub send: Vec<u8>,
    /// Bytes the answer must contain; empty: any answer (or none, with an empty send).
    pub expect: Vec<u8>,
    /// Instead of a connection: this program's output must contain `expect` (`%h`: the
    /// real server's address).
    pub program: Option<Vec<String>>,
}

/// The outcome of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    /// What happened, for logs and the API ("connected", "status 503", "timed out after
    /// 3 s", "exit 2", ...).
    pub detail: String,
    /// A weight the probe set (MISC_CHECK `dynamic`, FILE_CHECK); `None`: unchanged.
    pub weight: Option<u32>,
    /// How long the attempt took.
    pub latency: Duration,
}

/// Where a probe goes, resolved for one real server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: std::net::SocketAddr,
    /// The real server's configured weight (FILE_CHECK's contributions add to it).
    pub weight: u32,
    pub bind: Option<IpAddr>,
    pub timeout: Duration,
    /// User programs run as, when the probe names none (keepalived `script_user`).
    pub script_user: Option<String>,
}

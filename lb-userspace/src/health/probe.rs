//! One attempt of a health check: what keepalived's checkers send and accept (TCP_CHECK,
//! HTTP_GET / SSL_GET, SMTP_CHECK, DNS_CHECK, UDP_CHECK, PING_CHECK, FILE_CHECK, MISC_CHECK)
//! plus Piranha's send/expect nanny.
//!
//! [`run`] never takes longer than the target's timeout (programs: plus the 2 s between
//! SIGTERM and SIGKILL), never panics, and says in [`Outcome::detail`] what happened.

use std::{
    collections::hash_map::RandomState,
    ffi::CString,
    future::Future,
    hash::{BuildHasher, Hasher},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    panic::AssertUnwindSafe,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use futures::FutureExt;
use md5::{Digest, Md5};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
        BufReader,
    },
    net::{TcpSocket, TcpStream, UdpSocket},
    process::Command,
    time::Instant,
};

use super::spec::{
    HttpProbe, HttpVersion, MiscProbe, Outcome, Probe, SendExpectProbe, Target, UrlProbe,
};

/// HTTP: body bytes read at most (the rest of the response is not read).
const HTTP_MAX_BODY: u64 = 16 << 20;
/// HTTP: header block size at most.
const HTTP_MAX_HEADER: usize = 64 << 10;
/// SMTP: size of one reply at most.
const SMTP_MAX_REPLY: usize = 64 << 10;
/// Send/expect: bytes kept while searching (the search window slides beyond this).
const EXPECT_WINDOW: usize = 64 << 10;
/// Programs: stdout and stderr kept (each); the rest is read and discarded.
const PROGRAM_OUTPUT_MAX: usize = 64 << 10;
/// Programs: time between SIGTERM and SIGKILL after a timeout (keepalived's).
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// Programs: after the program exited, time left to collect output still in the pipes
/// (a background grandchild may hold them open).
const OUTPUT_GRACE: Duration = Duration::from_millis(250);
/// UDP without `require_reply`: how long an ICMP port unreachable is waited for at most.
const UDP_QUIET_WAIT: Duration = Duration::from_secs(1);

/// Runs a program (no shell) as a notify program runs: `argv` (`%h`/`%p` naming `addr`),
/// as `script_user` if one is set, killed (its whole process group) after `timeout`.
pub async fn run_command(
    argv: Vec<String>,
    addr: std::net::SocketAddr,
    script_user: Option<String>,
    timeout: std::time::Duration,
) -> Outcome {
    let probe = Probe::Misc(crate::health::spec::MiscProbe {
        argv,
        shell: false,
        dynamic: false,
        user: None,
        group: None,
    });
    let target = Target {
        weight: 0,
        addr,
        bind: None,
        timeout,
        script_user,
    };
    run(&probe, &target, 0).await
}

/// Runs one attempt of `probe` against `target`. `url` selects the URL of an HTTP probe
/// (modulo their count); other probes ignore it.
pub async fn run(probe: &Probe, target: &Target, url: usize) -> Outcome {
    let start = Instant::now();
    let verdict = match AssertUnwindSafe(attempt(probe, target, url))
        .catch_unwind()
        .await
    {
        Ok(v) => v,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Verdict::down(format!("internal error in the probe: {msg}"))
        }
    };
    Outcome {
        ok: verdict.ok,
        detail: verdict.detail,
        weight: verdict.weight,
        latency: start.elapsed(),
    }
}

struct Verdict {
    ok: bool,
    detail: String,
    weight: Option<u32>,
}

impl Verdict {
    fn up(detail: impl Into<String>) -> Self {
        Verdict {
            ok: true,
            detail: detail.into(),
            weight: None,
        }
    }

    fn down(detail: impl Into<String>) -> Self {
        Verdict {
            ok: false,
            detail: detail.into(),
            weight: None,
        }
    }
}

/// What an attempt is doing, for the message of a timeout.
struct Phase(Mutex<&'static str>);

impl Phase {
    fn new() -> Self {
        Phase(Mutex::new("while connecting"))
    }

    fn set(&self, what: &'static str) {
        if let Ok(mut p) = self.0.lock() {
            *p = what;
        }
    }

    fn get(&self) -> &'static str {
        self.0.lock().map(|p| *p).unwrap_or("")
    }
}

/// Runs `f` within `timeout`; a timeout says what the attempt was doing.
async fn bounded<'a, F, Fut>(timeout: Duration, phase: &'a Phase, f: F) -> Verdict
where
    F: FnOnce(&'a Phase) -> Fut,
    Fut: Future<Output = Verdict> + 'a,
{
    match tokio::time::timeout(timeout, f(phase)).await {
        Ok(v) => v,
        Err(_) => Verdict::down(format!(
            "timed out after {} {}",
            fmt_duration(timeout),
            phase.get()
        )),
    }
}

async fn attempt(probe: &Probe, target: &Target, url: usize) -> Verdict {
    let phase = Phase::new();
    let timeout = target.timeout;
    match probe {
        Probe::Tcp => bounded(timeout, &phase, |_| tcp(target)).await,
        Probe::Http(h) => bounded(timeout, &phase, |p| http(h, target, url, p)).await,
        Probe::Smtp { helo } => bounded(timeout, &phase, |p| smtp(helo, target, p)).await,
        Probe::Dns { qtype, name } => dns(*qtype, name, target).await,
        Probe::Udp {
            payload,
            require_reply,
            reply,
        } => udp(payload, *require_reply, reply.as_deref(), target).await,
        Probe::Ping => ping(target).await,
        Probe::File {
            path,
            weight,
            reverse,
        } => {
            phase.set("reading the file");
            let tracked = weight.map(|w| (w, *reverse, target.weight));
            bounded(timeout, &phase, |_| file(path, tracked)).await
        }
        Probe::Misc(m) => misc(m, target).await,
        Probe::SendExpect(s) => match &s.program {
            Some(argv) => expect_program(argv, &s.expect, target).await,
            None => bounded(timeout, &phase, |p| send_expect(s, target, p)).await,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Common helpers

/// `3 s`, `1500 ms`.
fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else if d >= Duration::from_millis(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// An I/O error as a short lowercase phrase ("connection refused").
fn io_msg(e: &io::Error) -> String {
    if let Some(code) = e.raw_os_error() {
        let desc = nix::errno::Errno::from_raw(code).desc();
        let mut chars = desc.chars();
        return match chars.next() {
            Some(c) => c.to_lowercase().chain(chars).collect(),
            None => e.to_string(),
        };
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        _ => e.to_string(),
    }
}

/// Bytes for a message: escaped, at most `max` of them shown.
fn show(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes
        .iter()
        .take(max)
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    if bytes.len() > max {
        s.push('…');
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Not cryptographic: DNS ids and ICMP identifiers.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

fn unspecified(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

/// The source address of a probe, checked against the target's family.
fn local_addr(target: &Target) -> Result<SocketAddr, String> {
    let v4 = target.addr.is_ipv4();
    match target.bind {
        Some(b) if b.is_ipv4() != v4 => Err(format!(
            "source address {b} and target {} are of different families",
            target.addr
        )),
        Some(b) => Ok(SocketAddr::new(b, 0)),
        None => Ok(SocketAddr::new(unspecified(v4), 0)),
    }
}

async fn connect(target: &Target) -> Result<TcpStream, String> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("cannot create a socket: {}", io_msg(&e)))?;
    if target.bind.is_some() {
        let local = local_addr(target)?;
        socket
            .bind(local)
            .map_err(|e| format!("cannot bind to {}: {}", local.ip(), io_msg(&e)))?;
    }
    let stream = socket.connect(target.addr).await.map_err(|e| io_msg(&e))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connected_udp(target: &Target) -> Result<UdpSocket, String> {
    let local = local_addr(target)?;
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot bind to {}: {}", local.ip(), io_msg(&e)))?;
    socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("cannot connect: {}", io_msg(&e)))?;
    Ok(socket)
}

// ---------------------------------------------------------------------------------------
// TCP_CHECK

async fn tcp(target: &Target) -> Verdict {
    match connect(target).await {
        Ok(stream) => {
            // Closed with a reset (SO_LINGER 0), as HAProxy closes its checks: no FIN
            // exchange and no TIME_WAIT socket per check, on either side.
            let _ = nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            drop(stream);
            Verdict::up("connected")
        }
        Err(e) => Verdict::down(e),
    }
}

// ---------------------------------------------------------------------------------------
// HTTP_GET / SSL_GET

/// The request exactly as keepalived sends it.
fn http_request(path: &str, version: HttpVersion, host: &str) -> Vec<u8> {
    let (v, close) = match version {
        HttpVersion::Http10 => ("1.0", false),
        HttpVersion::Http10Close => ("1.0", true),
        HttpVersion::Http11 => ("1.1", true),
    };
    let close = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/{v}\r\nUser-Agent: KeepAliveClient\r\n{close}Host: {host}\r\n\r\n")
        .into_bytes()
}

/// The Host header: the URL's virtualhost, else the checker's, else `ip:port`.
fn http_host(h: &HttpProbe, u: &UrlProbe, target: &Target) -> String {
    u.virtualhost
        .clone()
        .or_else(|| h.virtualhost.clone())
        .unwrap_or_else(|| match target.addr {
            SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        })
}

async fn http(h: &HttpProbe, target: &Target, url: usize, phase: &Phase) -> Verdict {
    if h.urls.is_empty() {
        return Verdict::down("no URL to check");
    }
    let u = &h.urls[url % h.urls.len()];
    let request = http_request(&u.path, h.version, &http_host(h, u, target));
    phase.set("while connecting");
    let stream = match connect(target).await {
        Ok(s) => s,
        Err(e) => return Verdict::down(e),
    };
    let Some(tls) = &h.tls else {
        return http_exchange(stream, &request, u, phase).await;
    };
    phase.set("during the TLS handshake");
    let config = match tls_config(tls.verify).await {
        Ok(c) => c,
        Err(e) => return Verdict::down(e),
    };
    let name = match &tls.sni {
        Some(sni) => match ServerName::try_from(sni.clone()) {
            Ok(n) => n,
            Err(e) => return Verdict::down(format!("invalid TLS server name {sni:?}: {e}")),
        },
        // An IP address: rustls sends no SNI, as keepalived by default.
        None => ServerName::IpAddress(target.addr.ip().into()),
    };
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(stream) => http_exchange(stream, &request, u, phase).await,
        Err(e) => Verdict::down(format!("TLS handshake failed: {}", tls_error(&e))),
    }
}

fn tls_error(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "connection closed by the server".into();
    }
    if let Some(inner) = e.get_ref() {
        return inner.to_string();
    }
    io_msg(e)
}

/// The status code of a status line (`HTTP/1.1 200 OK`).
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

/// End of the header block (the index of the first body byte).
fn header_end(buf: &[u8]) -> Option<usize> {
    let crlf = find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `Content-Length` of a header block, unless the body is chunked.
fn content_length(head: &[u8]) -> Option<u64> {
    let head = String::from_utf8_lossy(head);
    let mut length = None;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().ok();
        }
    }
    length
}

fn fmt_ranges(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn http_exchange<S>(mut stream: S, request: &[u8], u: &UrlProbe, phase: &Phase) -> Verdict
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    phase.set("while sending the request");
    if let Err(e) = stream.write_all(request).await {
        return Verdict::down(format!("sending the request: {}", io_msg(&e)));
    }
    if let Err(e) = stream.flush().await {
        return Verdict::down(format!("sending the request: {}", io_msg(&e)));
    }
    phase.set("waiting for the response");

    // keepalived reads until the server closes and hashes every byte after the header
    // block (a chunked body is hashed as sent). This stops early at Content-Length, and
    // after HTTP_MAX_BODY bytes of body.
    let mut head = Vec::new();
    let mut body_start = None;
    let mut length = None;
    let mut body_len = 0u64;
    let mut md5 = Md5::new();
    let mut truncated = false;
    let mut read_error = None;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // TLS without close_notify: the end of the response.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                read_error = Some(io_msg(&e));
                break;
            }
        };
        let data = &buf[..n];
        if body_start.is_none() {
            head.extend_from_slice(data);
            if let Some(end) = header_end(&head) {
                body_start = Some(end);
                length = content_length(&head[..end]);
                md5.update(&head[end..]);
                body_len = (head.len() - end) as u64;
                head.truncate(end);
                phase.set("while reading the body");
            } else if head.len() > HTTP_MAX_HEADER {
                return Verdict::down("response header larger than 64 KiB");
            }
        } else {
            md5.update(data);
            body_len += n as u64;
        }
        if body_start.is_some() {
            if length.is_some_and(|l| body_len >= l) {
                break;
            }
            if body_len > HTTP_MAX_BODY {
                truncated = true;
                break;
            }
        }
    }

    if head.is_empty() {
        return Verdict::down(match read_error {
            Some(e) => format!("reading the response: {e}"),
            None => "connection closed without a response".into(),
        });
    }
    if let Some(e) = &read_error
        && (body_start.is_none() || u.digest.is_some())
    {
        return Verdict::down(format!("reading the response: {e}"));
    }
    let line_end = find(&head, b"\n").unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let Some(code) = status_code(line) else {
        return Verdict::down(format!("malformed status line \"{}\"", show(line, 80)));
    };
    let default = [(200, 299)];
    let ranges: &[(u16, u16)] = if u.status.is_empty() {
        &default
    } else {
        &u.status
    };
    if !ranges.iter().any(|&(a, b)| (a..=b).contains(&code)) {
        return Verdict::down(format!("status {code} not in {}", fmt_ranges(ranges)));
    }
    let Some(want) = u.digest else {
        return Verdict::up(format!("status {code}"));
    };
    if truncated {
        return Verdict::down(format!(
            "status {code}, body larger than {} MiB: digest not checked",
            HTTP_MAX_BODY >> 20
        ));
    }
    let got: [u8; 16] = md5.finalize().into();
    if got != want {
        return Verdict::down(format!(
            "status {code}, body digest {} differs from {}",
            hex(&got),
            hex(&want)
        ));
    }
    Verdict::up(format!("status {code}, digest {}", hex(&got)))
}

fn ring() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Accepts any certificate (keepalived does not verify), but checks the handshake
/// signatures made with its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The client configuration: any certificate, or verified against the system's trusted
/// roots (loaded once, as rustls-native-certs finds them: SSL_CERT_FILE / SSL_CERT_DIR or
/// the distribution's bundle).
async fn tls_config(verify: bool) -> Result<Arc<ClientConfig>, String> {
    static ANY: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    static VERIFIED: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    let cell = if verify { &VERIFIED } else { &ANY };
    if let Some(c) = cell.get() {
        return c.clone();
    }
    let made = if verify {
        tokio::task::spawn_blocking(verified_config)
            .await
            .unwrap_or_else(|e| Err(format!("loading the trusted roots: {e}")))
    } else {
        any_config()
    };
    cell.get_or_init(|| made).clone()
}

fn any_config() -> Result<Arc<ClientConfig>, String> {
    let provider = ring();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn verified_config() -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err("no trusted root certificates found on this system".into());
    }
    let config = ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------
// SMTP_CHECK

/// One reply (possibly multi-line: `250-...` lines then `250 ...`): its code and last line.
async fn smtp_reply<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<(u16, String), String> {
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        let n = (&mut *reader)
            .take((SMTP_MAX_REPLY - total) as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| io_msg(&e))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        total += n;
        if total > SMTP_MAX_REPLY {
            return Err("reply larger than 64 KiB".into());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let bytes = text.as_bytes();
        if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
            return Err(format!("malformed reply \"{}\"", show(&line, 80)));
        }
        let code: u16 = text[..3].parse().unwrap_or(0);
        match bytes.get(3) {
            Some(b'-') => continue,
            None | Some(b' ') => return Ok((code, text)),
            Some(_) => return Err(format!("malformed reply \"{}\"", show(&line, 80))),
        }
    }
}

async fn smtp(helo: &str, target: &Target, phase: &Phase) -> Verdict {
    let stream = match connect(target).await {
        Ok(s) => s,
        Err(e) => return Verdict::down(e),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);

    phase.set("waiting for the banner");
    match smtp_reply(&mut reader).await {
        Ok((220, _)) => {}
        Ok((_, text)) => return Verdict::down(format!("banner \"{text}\", not 220")),
        Err(e) => return Verdict::down(format!("reading the banner: {e}")),
    }

    phase.set("waiting for the reply to HELO");
    if let Err(e) = write.write_all(format!("HELO {helo}\r\n").as_bytes()).await {
        return Verdict::down(format!("sending HELO: {}", io_msg(&e)));
    }
    match smtp_reply(&mut reader).await {
        Ok((250, _)) => {}
        Ok((_, text)) => return Verdict::down(format!("HELO answered \"{text}\", not 250")),
        Err(e) => return Verdict::down(format!("reading the reply to HELO: {e}")),
    }

    phase.set("waiting for the reply to QUIT");
    if let Err(e) = write.write_all(b"QUIT\r\n").await {
        return Verdict::down(format!("sending QUIT: {}", io_msg(&e)));
    }
    // The reply to QUIT is read but not judged (the server is healthy once HELO passed).
    match smtp_reply(&mut reader).await {
        Ok((code, _)) => Verdict::up(format!("banner 220, HELO 250, QUIT {code}")),
        Err(e) => Verdict::up(format!("banner 220, HELO 250, QUIT: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// DNS_CHECK

/// A query as keepalived makes it: RD set, one question of class IN.
fn dns_query(id: u16, qtype: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    let name_start = q.len();
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(format!("invalid DNS name {name:?}"));
            }
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
    }
    q.push(0);
    if q.len() - name_start > 255 {
        return Err(format!("DNS name {name:?} longer than 255 bytes"));
    }
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]); // IN
    Ok(q)
}

fn rcode_name(rcode: u8) -> &'static str {
    match rcode {
        1 => " (FORMERR)",
        2 => " (SERVFAIL)",
        3 => " (NXDOMAIN)",
        4 => " (NOTIMP)",
        5 => " (REFUSED)",
        _ => "",
    }
}

async fn dns(qtype: u16, name: &str, target: &Target) -> Verdict {
    let deadline = Instant::now() + target.timeout;
    let id = random_u64() as u16;
    let query = match dns_query(id, qtype, name) {
        Ok(q) => q,
        Err(e) => return Verdict::down(e),
    };
    let socket = match tokio::time::timeout_at(deadline, connected_udp(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Verdict::down(e),
        Err(_) => {
            return Verdict::down(format!("no reply within {}", fmt_duration(target.timeout)));
        }
    };
    if let Err(e) = socket.send(&query).await {
        return Verdict::down(udp_error("sending the query", &e));
    }
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => {
                return Verdict::down(format!("no reply within {}", fmt_duration(target.timeout)));
            }
            Ok(Err(e)) => return Verdict::down(udp_error("receiving the reply", &e)),
            Ok(Ok(n)) => n,
        };
        let reply = &buf[..n];
        // Too short, or another query's reply: ignored.
        if reply.len() < 12 || reply[..2] != id.to_be_bytes() {
            continue;
        }
        if reply[2] & 0x80 == 0 {
            return Verdict::down("reply without the QR bit");
        }
        let rcode = reply[3] & 0x0f;
        if rcode != 0 {
            return Verdict::down(format!("RCODE {rcode}{}", rcode_name(rcode)));
        }
        let answers = u16::from_be_bytes([reply[6], reply[7]]);
        return Verdict::up(format!("RCODE 0, {answers} answer(s)"));
    }
}

fn udp_error(what: &str, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        "ICMP port unreachable".into()
    } else {
        format!("{what}: {}", io_msg(e))
    }
}

// ---------------------------------------------------------------------------------------
// UDP_CHECK

async fn udp(
    payload: &[u8],
    require_reply: bool,
    prefix: Option<&[u8]>,
    target: &Target,
) -> Verdict {
    let start = Instant::now();
    let deadline = start + target.timeout;
    let timed_out = || Verdict::down(format!("timed out after {}", fmt_duration(target.timeout)));
    let socket = match tokio::time::timeout_at(deadline, connected_udp(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Verdict::down(e),
        Err(_) => return timed_out(),
    };
    match tokio::time::timeout_at(deadline, socket.send(payload)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Verdict::down(udp_error("sending", &e)),
        Err(_) => return timed_out(),
    }
    let mut buf = vec![0u8; 65536];
    if !require_reply {
        let wait = start + target.timeout.min(UDP_QUIET_WAIT);
        return match tokio::time::timeout_at(wait, socket.recv(&mut buf)).await {
            Err(_) => Verdict::up("sent, no ICMP error"),
            Ok(Ok(_)) => Verdict::up("reply received"),
            Ok(Err(e)) => Verdict::down(udp_error("receiving", &e)),
        };
    }
    match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        Err(_) => Verdict::down(format!("no reply within {}", fmt_duration(target.timeout))),
        Ok(Err(e)) => Verdict::down(udp_error("receiving", &e)),
        Ok(Ok(n)) => match prefix {
            Some(p) if !buf[..n].starts_with(p) => Verdict::down(format!(
                "reply \"{}\" does not start with \"{}\"",
                show(&buf[..n], 64),
                show(p, 64)
            )),
            _ => Verdict::up(format!("reply received ({n} bytes)")),
        },
    }
}

// ---------------------------------------------------------------------------------------
// PING_CHECK

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A raw ICMP / ICMPv6 socket as a tokio datagram socket.
fn icmp_socket(target: &Target) -> Result<UdpSocket, String> {
    use nix::sys::socket::{
        self, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage,
    };
    let v4 = target.addr.is_ipv4();
    let (family, protocol) = if v4 {
        (AddressFamily::Inet, SockProtocol::Icmp)
    } else {
        (AddressFamily::Inet6, SockProtocol::IcmpV6)
    };
    let fd = socket::socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        protocol,
    )
    .map_err(|e| format!("cannot open a raw ICMP socket: {}", io_msg(&e.into())))?;
    if target.bind.is_some() {
        let local = local_addr(target)?;
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(local))
            .map_err(|e| format!("cannot bind to {}: {}", local.ip(), io_msg(&e.into())))?;
    }
    // A raw socket gets every ICMP message of the host; connected, only those from the
    // target: with a thousand servers pinged, each reply wakes one socket, not all of them
    // (errors from routers on the way are not seen: the attempt times out instead).
    socket::connect(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(target.addr.ip(), 0)),
    )
    .map_err(|e| format!("cannot connect the ICMP socket: {}", io_msg(&e.into())))?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
        .map_err(|e| format!("cannot register the ICMP socket: {}", io_msg(&e)))
}

enum IcmpReply {
    Echo,
    Error(String),
}

/// Interprets an ICMP message received from `from` (`packet` starts with the IPv4 header
/// for ICMP, with the ICMPv6 header for ICMPv6).
fn icmp_match(
    packet: &[u8],
    v4: bool,
    from: IpAddr,
    dest: IpAddr,
    id: u16,
    seq: u16,
) -> Option<IcmpReply> {
    let icmp = if v4 {
        let ihl = usize::from(packet.first()? & 0x0f) * 4;
        packet.get(ihl..)?
    } else {
        packet
    };
    let (echo_reply, unreachable, time_exceeded, inner_hdr, echo_request, next_proto) = if v4 {
        (0u8, 3u8, 11u8, None, 8u8, 1u8)
    } else {
        (129, 1, 3, Some(40usize), 128, 58)
    };
    let kind = *icmp.first()?;
    let code = *icmp.get(1)?;
    let ours =
        |h: &[u8]| h.len() >= 8 && h[4..6] == id.to_be_bytes() && h[6..8] == seq.to_be_bytes();
    if kind == echo_reply {
        return (from == dest && ours(icmp)).then_some(IcmpReply::Echo);
    }
    if kind != unreachable && kind != time_exceeded {
        return None;
    }
    // An error about our echo request: the original IP header and the start of our ICMP.
    let inner = icmp.get(8..)?;
    let (proto, hdr_len) = match inner_hdr {
        Some(len) => (*inner.get(6)?, len),
        None => (*inner.get(9)?, usize::from(inner.first()? & 0x0f) * 4),
    };
    let original = inner.get(hdr_len..)?;
    if proto != next_proto || original.first() != Some(&echo_request) || !ours(original) {
        return None;
    }
    let what = match (v4, kind == unreachable, code) {
        (_, false, _) => "time exceeded".to_string(),
        (_, true, 0) => "network unreachable".into(),
        (true, true, 3) | (false, true, 4) => "port unreachable".into(),
        (true, true, 1) | (false, true, 3) => "host unreachable".into(),
        (true, true, 13) | (false, true, 1) => "communication administratively prohibited".into(),
        (_, true, c) => format!("destination unreachable (code {c})"),
    };
    Some(IcmpReply::Error(format!("ICMP {what} from {from}")))
}

async fn ping(target: &Target) -> Verdict {
    let start = Instant::now();
    let deadline = start + target.timeout;
    let dest = target.addr.ip();
    let v4 = dest.is_ipv4();
    let socket = match icmp_socket(target) {
        Ok(s) => s,
        Err(e) => return Verdict::down(e),
    };
    let r = random_u64();
    let (id, seq) = (r as u16, (r >> 16) as u16);
    let mut packet = vec![if v4 { 8 } else { 128 }, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(b"xlb health check");
    packet.extend_from_slice(&(r >> 32).to_be_bytes()[4..]);
    if v4 {
        // ICMPv6 checksums are the kernel's.
        let sum = inet_checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    match tokio::time::timeout_at(deadline, socket.send_to(&packet, SocketAddr::new(dest, 0))).await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Verdict::down(format!("sending the echo request: {}", io_msg(&e))),
        Err(_) => {
            return Verdict::down(format!("no reply within {}", fmt_duration(target.timeout)));
        }
    }
    let mut buf = vec![0u8; 2048];
    loop {
        match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            Err(_) => {
                return Verdict::down(format!("no reply within {}", fmt_duration(target.timeout)));
            }
            Ok(Err(e)) => return Verdict::down(format!("receiving: {}", io_msg(&e))),
            Ok(Ok((n, from))) => match icmp_match(&buf[..n], v4, from.ip(), dest, id, seq) {
                Some(IcmpReply::Echo) => {
                    return Verdict::up(format!(
                        "echo reply in {} ms",
                        start.elapsed().as_secs_f64() * 1000.0
                    ));
                }
                Some(IcmpReply::Error(e)) => return Verdict::down(e),
                None => continue,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// FILE_CHECK

/// The leading integer of a file (after blanks, with an optional sign).
fn leading_integer(text: &[u8]) -> Option<i64> {
    // Only the leading part matters: cut at the first byte that is not UTF-8.
    let text = match std::str::from_utf8(text) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or(""),
    };
    let t = text.trim_start();
    let (sign, digits) = match t.as_bytes().first() {
        Some(b'-') => (-1i64, &t[1..]),
        Some(b'+') => (1, &t[1..]),
        _ => (1, t),
    };
    let len = digits.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 {
        return None;
    }
    // Saturates: a huge value is a huge weight.
    let value = digits[..len].bytes().fold(0i64, |v, d| {
        v.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    Some(sign * value)
}

/// `tracked`: keepalived's track_file weight, reverse flag and the server's configured weight.
async fn file(path: &str, tracked: Option<(i32, bool, u32)>) -> Verdict {
    // Only a regular file: a FIFO without a writer would hold a blocking-pool thread for
    // good, attempt after attempt.
    match tokio::fs::metadata(path).await {
        Ok(m) if !m.is_file() => {
            return Verdict::down(format!("{path} is not a regular file"));
        }
        Err(e) => return Verdict::down(format!("cannot read {path}: {}", io_msg(&e))),
        Ok(_) => {}
    }
    let mut text = Vec::new();
    let read = async {
        let f = tokio::fs::File::open(path).await?;
        f.take(4096).read_to_end(&mut text).await
    };
    if let Err(e) = read.await {
        return Verdict::down(format!("cannot read {path}: {}", io_msg(&e)));
    }
    if let Some((w, reverse, configured)) = tracked {
        let Some(v) = leading_integer(&text) else {
            return Verdict::down(format!("no number in {path}: \"{}\"", show(&text, 40)));
        };
        if w == 0 {
            return if v == 0 {
                Verdict::up("value 0")
            } else {
                Verdict::down(format!("value {v}"))
            };
        }
        let delta = v.saturating_mul(i64::from(w)) * if reverse { -1 } else { 1 };
        let weight = (i64::from(configured) + delta).clamp(0, i64::from(i32::MAX)) as u32;
        return Verdict {
            ok: true,
            detail: format!("value {v}: weight {weight}"),
            weight: Some(weight),
        };
    }
    match leading_integer(&text) {
        None => Verdict::down(format!("no number in {path}: \"{}\"", show(&text, 40))),
        Some(v) if v <= 0 => Verdict::down(format!("value {v}")),
        Some(v) => {
            // Weights are clamped to 0..INT32_MAX, as keepalived's.
            let w = v.min(i64::from(i32::MAX)) as u32;
            Verdict {
                ok: true,
                detail: format!("value {v}"),
                weight: Some(w),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Programs: MISC_CHECK and send/expect's `program`

#[derive(Debug, Clone)]
struct Credentials {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// Resolves `user` / `group` (names, or numbers) to the credentials a program runs with.
fn credentials(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (uid, mut gid, name) = match user {
        Some(u) => {
            let found = User::from_name(u)
                .map_err(|e| format!("looking up user {u}: {}", e.desc()))?
                .or_else(|| {
                    let n = u.parse().ok()?;
                    User::from_uid(Uid::from_raw(n)).ok().flatten()
                });
            match found {
                Some(pw) => (pw.uid, pw.gid, Some(pw.name)),
                None => match u.parse::<libc::uid_t>() {
                    Ok(n) => (Uid::from_raw(n), Gid::from_raw(n), None),
                    Err(_) => return Err(format!("unknown user {u}")),
                },
            }
        }
        None => (Uid::effective(), Gid::effective(), None),
    };
    if let Some(g) = group {
        gid =
            match Group::from_name(g).map_err(|e| format!("looking up group {g}: {}", e.desc()))? {
                Some(gr) => gr.gid,
                None => match g.parse::<libc::gid_t>() {
                    Ok(n) => Gid::from_raw(n),
                    Err(_) => return Err(format!("unknown group {g}")),
                },
            };
    }
    let mut groups = name
        .and_then(|n| CString::new(n).ok())
        .and_then(|n| nix::unistd::getgrouplist(&n, gid).ok())
        .unwrap_or_default();
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Some(Credentials {
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
    }))
}

/// `%h` → the target's address, `%p` → its port.
fn substitute(arg: &str, target: &Target) -> String {
    arg.replace("%h", &target.addr.ip().to_string())
        .replace("%p", &target.addr.port().to_string())
}

enum ProgramEnd {
    Exited(i32),
    Signaled(i32),
    /// Killed after the timeout; `true`: SIGTERM was not enough.
    TimedOut(bool),
}

struct ProgramRun {
    end: ProgramEnd,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Reads `from` to its end, keeping the first `PROGRAM_OUTPUT_MAX` bytes.
async fn drain<R: AsyncRead + Unpin>(from: Option<R>, keep: &mut Vec<u8>) {
    let Some(mut from) = from else { return };
    let mut buf = vec![0u8; 8192];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = PROGRAM_OUTPUT_MAX.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Kills a program's process group when dropped (its leader was started with
/// `process_group(0)`, so the group id is its pid).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

fn signal_group(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Runs a program (in its own process group, stdin from /dev/null) until it exits or
/// `timeout` passes: then SIGTERM to its group, SIGKILL 2 s later.
async fn run_program(
    argv: &[String],
    shell: bool,
    user: Option<&str>,
    group: Option<&str>,
    target: &Target,
) -> Result<ProgramRun, String> {
    use nix::sys::signal::Signal;
    let deadline = Instant::now() + target.timeout;
    let argv: Vec<String> = argv.iter().map(|a| substitute(a, target)).collect();
    let Some(program) = argv.first() else {
        return Err("no program to run".into());
    };
    let mut cmd = if shell {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(argv.join(" "));
        c
    } else {
        let mut c = Command::new(program);
        c.args(&argv[1..]);
        c
    };
    let (user, group) = (user.map(str::to_string), group.map(str::to_string));
    let creds = match tokio::time::timeout_at(
        deadline,
        tokio::task::spawn_blocking(move || credentials(user.as_deref(), group.as_deref())),
    )
    .await
    {
        Ok(Ok(c)) => c?,
        Ok(Err(e)) => return Err(format!("looking up the user: {e}")),
        Err(_) => return Err("timed out looking up the user".into()),
    };
    if let Some(c) = creds {
        let unchanged = c.uid == nix::unistd::geteuid().as_raw()
            && c.gid == nix::unistd::getegid().as_raw()
            && !nix::unistd::geteuid().is_root();
        if !unchanged {
            // SAFETY: only async-signal-safe system calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                        || libc::setgid(c.gid) != 0
                        || libc::setuid(c.uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {}", io_msg(&e)))?;
    let pid = child.id();
    // Whatever happens to this attempt (done, timed out, or its task aborted by a reload),
    // nothing of the program's process group outlives it.
    let _group = GroupGuard(pid);
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status: Option<io::Result<ExitStatus>> = {
        let reading = async {
            tokio::join!(drain(out, &mut stdout), drain(err, &mut stderr));
        };
        tokio::pin!(reading);
        let mut read_all = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                _ = &mut reading, if !read_all => read_all = true,
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        if status.is_some() && !read_all {
            // Output already in the pipes is read even at the deadline (the inner future is
            // polled first).
            let until = (Instant::now() + OUTPUT_GRACE).min(deadline);
            let _ = tokio::time::timeout_at(until, &mut reading).await;
        }
        status
    };
    let end = match status {
        Some(Ok(s)) => exit_of(s),
        Some(Err(e)) => return Err(format!("waiting for {program}: {}", io_msg(&e))),
        None => {
            signal_group(pid, Signal::SIGTERM);
            match tokio::time::timeout(KILL_GRACE, child.wait()).await {
                Ok(_) => ProgramEnd::TimedOut(false),
                Err(_) => {
                    signal_group(pid, Signal::SIGKILL);
                    let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                    ProgramEnd::TimedOut(true)
                }
            }
        }
    };
    Ok(ProgramRun {
        end,
        stdout,
        stderr,
    })
}

fn exit_of(status: ExitStatus) -> ProgramEnd {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ProgramEnd::Exited(c),
        (None, Some(s)) => ProgramEnd::Signaled(s),
        (None, None) => ProgramEnd::Exited(-1),
    }
}

fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(s) => format!("signal {signal} ({})", s.as_str()),
        Err(_) => format!("signal {signal}"),
    }
}

fn timed_out_detail(target: &Target, needed_kill: bool) -> String {
    format!(
        "killed after timeout ({}{})",
        fmt_duration(target.timeout),
        if needed_kill {
            "; SIGTERM ignored, SIGKILL"
        } else {
            ""
        }
    )
}

/// `detail`, with the first line the program printed (stderr first), if any.
fn with_output(detail: String, run: &ProgramRun) -> String {
    for (name, text) in [("stderr", &run.stderr), ("stdout", &run.stdout)] {
        let text = String::from_utf8_lossy(text);
        if let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
            let line: String = line.chars().take(120).collect();
            return format!("{detail} ({name}: {line})");
        }
    }
    detail
}

/// `user [group]` of the configured script user.
fn script_user(target: &Target) -> (Option<&str>, Option<&str>) {
    let mut words = target
        .script_user
        .as_deref()
        .unwrap_or("")
        .split_whitespace();
    (words.next(), words.next())
}

async fn misc(m: &MiscProbe, target: &Target) -> Verdict {
    let (default_user, default_group) = script_user(target);
    let (user, group) = match (&m.user, &m.group) {
        (None, None) => (default_user, default_group),
        (u, g) => (u.as_deref().or(default_user), g.as_deref()),
    };
    let run = match run_program(&m.argv, m.shell, user, group, target).await {
        Ok(r) => r,
        Err(e) => return Verdict::down(e),
    };
    let code = match run.end {
        ProgramEnd::TimedOut(killed) => return Verdict::down(timed_out_detail(target, killed)),
        ProgramEnd::Signaled(s) => {
            return Verdict::down(with_output(format!("killed by {}", signal_name(s)), &run));
        }
        ProgramEnd::Exited(c) => c,
    };
    match (m.dynamic, code) {
        (_, 0) => Verdict::up("exit 0"),
        (true, 2..=255) => {
            let weight = (code - 2) as u32;
            Verdict {
                ok: true,
                detail: format!("exit {code}: weight {weight}"),
                weight: Some(weight),
            }
        }
        _ => Verdict::down(with_output(format!("exit {code}"), &run)),
    }
}

// ---------------------------------------------------------------------------------------
// Send/expect (Piranha's nanny)

async fn send_expect(s: &SendExpectProbe, target: &Target, phase: &Phase) -> Verdict {
    let mut stream = match connect(target).await {
        Ok(s) => s,
        Err(e) => return Verdict::down(e),
    };
    if !s.send.is_empty() {
        phase.set("while sending");
        if let Err(e) = stream.write_all(&s.send).await {
            return Verdict::down(format!("sending: {}", io_msg(&e)));
        }
    } else if s.expect.is_empty() {
        return Verdict::up("connected");
    }
    phase.set(if s.expect.is_empty() {
        "waiting for a reply"
    } else {
        "waiting for the expected reply"
    });
    let mut window: Vec<u8> = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => return Verdict::down(format!("receiving: {}", io_msg(&e))),
        };
        if n == 0 {
            return Verdict::down(if total == 0 {
                "connection closed without a reply".to_string()
            } else {
                format!(
                    "\"{}\" not in the reply ({total} bytes, ending \"{}\")",
                    show(&s.expect, 40),
                    show(&window[window.len().saturating_sub(40)..], 40)
                )
            });
        }
        total += n;
        if s.expect.is_empty() {
            return Verdict::up(format!("reply received ({n} bytes)"));
        }
        window.extend_from_slice(&buf[..n]);
        if find(&window, &s.expect).is_some() {
            return Verdict::up(format!("\"{}\" received", show(&s.expect, 40)));
        }
        if window.len() > EXPECT_WINDOW {
            let keep = s.expect.len().saturating_sub(1).max(40);
            let cut = window.len().saturating_sub(keep);
            window.drain(..cut);
        }
    }
}

async fn expect_program(argv: &[String], expect: &[u8], target: &Target) -> Verdict {
    let (user, group) = script_user(target);
    let run = match run_program(argv, false, user, group, target).await {
        Ok(r) => r,
        Err(e) => return Verdict::down(e),
    };
    let status = match run.end {
        ProgramEnd::TimedOut(killed) => return Verdict::down(timed_out_detail(target, killed)),
        ProgramEnd::Signaled(s) => {
            return Verdict::down(with_output(format!("killed by {}", signal_name(s)), &run));
        }
        ProgramEnd::Exited(c) => c,
    };
    if find(&run.stdout, expect).is_some() {
        if expect.is_empty() {
            Verdict::up(format!("program exited {status}"))
        } else {
            Verdict::up(format!("\"{}\" in the program's output", show(expect, 40)))
        }
    } else {
        Verdict::down(format!(
            "\"{}\" not in the program's output (exit {status}, stdout \"{}\")",
            show(expect, 40),
            show(&run.stdout, 60)
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use md5::{Digest, Md5};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::{TcpListener, TcpSocket, UdpSocket},
        task::JoinHandle,
    };

    use super::*;
    use crate::health::spec::TlsProbe;

    fn target(addr: SocketAddr, timeout: Duration) -> Target {
        Target {
            weight: 1,
            addr,
            bind: None,
            timeout,
            script_user: None,
        }
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Every test is bounded in time.
    async fn within<F: Future>(secs: u64, f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(secs), f)
            .await
            .expect("test took too long")
    }

    /// A port nothing listens on.
    async fn closed_tcp_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    }

    fn url(path: &str) -> UrlProbe {
        UrlProbe {
            path: path.into(),
            status: vec![],
            digest: None,
            virtualhost: None,
        }
    }

    fn http_probe(urls: Vec<UrlProbe>, version: HttpVersion) -> Probe {
        Probe::Http(HttpProbe {
            tls: None,
            urls,
            version,
            virtualhost: None,
            fast_recovery: false,
        })
    }

    /// Reads a request up to its blank line.
    async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while find(&req, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        req
    }

    /// Serves one HTTP exchange; returns the request received.
    async fn http_server(response: Vec<u8>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let req = read_request(&mut s).await;
            s.write_all(&response).await.unwrap();
            s.shutdown().await.unwrap();
            req
        });
        (addr, task)
    }

    #[test]
    fn run_is_send() {
        fn send<T: Send>(_: T) {}
        let t = target(local(1), Duration::from_secs(1));
        send(run(&Probe::Tcp, &t, 0));
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_secs(3)), "3 s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(fmt_duration(Duration::from_millis(300)), "300 ms");
    }

    // --- TCP

    #[tokio::test]
    async fn tcp_open_closed() {
        within(10, async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let t = target(l.local_addr().unwrap(), Duration::from_secs(2));
            let o = run(&Probe::Tcp, &t, 0).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(o.detail, "connected");
            assert!(o.latency < Duration::from_secs(1));

            let t = target(local(closed_tcp_port().await), Duration::from_secs(2));
            let o = run(&Probe::Tcp, &t, 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "connection refused");
        })
        .await
    }

    #[tokio::test]
    async fn tcp_bind() {
        within(10, async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut t = target(l.local_addr().unwrap(), Duration::from_secs(2));
            t.bind = Some("127.0.0.2".parse().unwrap());
            let (o, accepted) = tokio::join!(run(&Probe::Tcp, &t, 0), l.accept());
            assert!(o.ok, "{o:?}");
            assert_eq!(accepted.unwrap().1.ip().to_string(), "127.0.0.2");

            t.bind = Some("::1".parse().unwrap());
            let o = run(&Probe::Tcp, &t, 0).await;
            assert!(!o.ok);
            assert!(o.detail.contains("different families"), "{o:?}");
        })
        .await
    }

    #[tokio::test]
    async fn tcp_timeout() {
        within(20, async {
            // A listener whose accept queue is full: further SYNs are dropped.
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(local(0)).unwrap();
            let listener = socket.listen(0).unwrap();
            let addr = listener.local_addr().unwrap();
            let mut queued = Vec::new();
            for _ in 0..8 {
                match tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                {
                    Ok(Ok(s)) => queued.push(s),
                    _ => break,
                }
            }
            let t = target(addr, Duration::from_millis(300));
            let o = run(&Probe::Tcp, &t, 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "timed out after 300 ms while connecting");
            assert!(o.latency >= Duration::from_millis(300) && o.latency < Duration::from_secs(1));
            drop(listener);
        })
        .await
    }

    // --- HTTP

    #[tokio::test]
    async fn http_ok_and_exact_request() {
        within(10, async {
            let (addr, server) = http_server(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nhello".to_vec()).await;
            let t = target(addr, Duration::from_secs(2));
            let o = run(&http_probe(vec![url("/health")], HttpVersion::Http10), &t, 0).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(o.detail, "status 200");
            let req = server.await.unwrap();
            assert_eq!(
                String::from_utf8(req).unwrap(),
                format!("GET /health HTTP/1.0\r\nUser-Agent: KeepAliveClient\r\nHost: 127.0.0.1:{}\r\n\r\n", addr.port())
            );
        })
        .await
    }

    #[tokio::test]
    async fn http_host_header_and_versions() {
        within(10, async {
            // URL virtualhost over the checker's; HTTP/1.1 sends Connection: close.
            let (addr, server) = http_server(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()).await;
            let mut u = url("/a?b=c");
            u.virtualhost = Some("www.example".into());
            let probe = Probe::Http(HttpProbe {
                tls: None,
                urls: vec![u],
                version: HttpVersion::Http11,
                virtualhost: Some("checker.example".into()),
                fast_recovery: false,
            });
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(
                server.await.unwrap(),
                b"GET /a?b=c HTTP/1.1\r\nUser-Agent: KeepAliveClient\r\nConnection: close\r\nHost: www.example\r\n\r\n"
            );

            // The checker's virtualhost; 1.0C.
            let (addr, server) = http_server(b"HTTP/1.0 200 OK\r\n\r\n".to_vec()).await;
            let probe = Probe::Http(HttpProbe {
                tls: None,
                urls: vec![url("/")],
                version: HttpVersion::Http10Close,
                virtualhost: Some("checker.example".into()),
                fast_recovery: false,
            });
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(
                server.await.unwrap(),
                b"GET / HTTP/1.0\r\nUser-Agent: KeepAliveClient\r\nConnection: close\r\nHost: checker.example\r\n\r\n"
            );

            // IPv6: [addr]:port; the URL chosen modulo the count.
            let l = TcpListener::bind("[::1]:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let req = read_request(&mut s).await;
                s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await.unwrap();
                req
            });
            let probe = http_probe(vec![url("/a"), url("/b")], HttpVersion::Http10);
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 3).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(
                String::from_utf8(server.await.unwrap()).unwrap(),
                format!("GET /b HTTP/1.0\r\nUser-Agent: KeepAliveClient\r\nHost: [::1]:{}\r\n\r\n", addr.port())
            );
        })
        .await
    }

    #[tokio::test]
    async fn http_status() {
        within(10, async {
            let (addr, _s) =
                http_server(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy".to_vec()).await;
            let o = run(
                &http_probe(vec![url("/")], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert_eq!(o.detail, "status 503 not in 200-299");

            let (addr, _s) =
                http_server(b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy".to_vec()).await;
            let mut u = url("/");
            u.status = vec![(200, 200), (500, 503)];
            let o = run(
                &http_probe(vec![u.clone()], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");

            let (addr, _s) = http_server(b"HTTP/1.0 404 Not Found\r\n\r\n".to_vec()).await;
            let o = run(
                &http_probe(vec![u], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert_eq!(o.detail, "status 404 not in 200, 500-503");

            let (addr, _s) = http_server(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()).await;
            let o = run(
                &http_probe(vec![url("/")], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert!(o.detail.starts_with("malformed status line"), "{o:?}");

            let (addr, _s) = http_server(vec![]).await;
            let o = run(
                &http_probe(vec![url("/")], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert_eq!(o.detail, "connection closed without a response");

            let t = target(local(closed_tcp_port().await), Duration::from_secs(2));
            let o = run(&http_probe(vec![url("/")], HttpVersion::Http10), &t, 0).await;
            assert_eq!(o.detail, "connection refused");
        })
        .await
    }

    #[tokio::test]
    async fn http_digest() {
        within(10, async {
            let body = b"<html>hello</html>\n";
            let digest: [u8; 16] = Md5::digest(body).into();
            let mut response = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n".to_vec();
            response.extend_from_slice(body);
            let mut u = url("/");
            u.digest = Some(digest);

            let (addr, _s) = http_server(response.clone()).await;
            let o = run(
                &http_probe(vec![u.clone()], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            assert_eq!(o.detail, format!("status 200, digest {}", hex(&digest)));

            let mut other = u.clone();
            other.digest = Some([0x1a; 16]);
            let (addr, _s) = http_server(response).await;
            let o = run(
                &http_probe(vec![other], HttpVersion::Http10),
                &target(addr, Duration::from_secs(2)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert_eq!(
                o.detail,
                format!(
                    "status 200, body digest {} differs from {}",
                    hex(&digest),
                    "1a".repeat(16)
                )
            );

            // Content-Length ends the response even if the server keeps the connection.
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                read_request(&mut s).await;
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                    .into_bytes();
                r.extend_from_slice(body);
                s.write_all(&r).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let o = run(
                &http_probe(vec![u], HttpVersion::Http11),
                &target(addr, Duration::from_secs(3)),
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            assert!(o.latency < Duration::from_secs(1));
            server.abort();
        })
        .await
    }

    #[tokio::test]
    async fn http_timeout() {
        within(10, async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                read_request(&mut s).await;
                s.write_all(b"HTTP/1.0 200 OK\r\n").await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
            let o = run(
                &http_probe(vec![url("/")], HttpVersion::Http10),
                &target(addr, Duration::from_millis(500)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert_eq!(o.detail, "timed out after 500 ms waiting for the response");
            server.abort();
        })
        .await
    }

    // --- TLS

    struct TlsServer {
        addr: SocketAddr,
        /// The SNI and the request received.
        task: JoinHandle<(Option<String>, Vec<u8>)>,
    }

    async fn tls_server() -> TlsServer {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let Ok(mut s) = acceptor.accept(s).await else {
                return (None, vec![]);
            };
            let sni = s.get_ref().1.server_name().map(str::to_string);
            let req = read_request(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            s.shutdown().await.unwrap();
            (sni, req)
        });
        TlsServer { addr, task }
    }

    fn tls_probe(sni: Option<&str>, verify: bool) -> Probe {
        let mut u = url("/tls");
        u.digest = Some(Md5::digest(b"ok").into());
        Probe::Http(HttpProbe {
            tls: Some(TlsProbe {
                sni: sni.map(str::to_string),
                verify,
            }),
            urls: vec![u],
            version: HttpVersion::Http11,
            virtualhost: None,
            fast_recovery: false,
        })
    }

    #[tokio::test]
    async fn tls() {
        within(15, async {
            // No SNI by default.
            let server = tls_server().await;
            let o = run(
                &tls_probe(None, false),
                &target(server.addr, Duration::from_secs(3)),
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            let (sni, req) = server.task.await.unwrap();
            assert_eq!(sni, None);
            assert!(req.starts_with(b"GET /tls HTTP/1.1\r\n"));

            let server = tls_server().await;
            let o = run(
                &tls_probe(Some("probe.example"), false),
                &target(server.addr, Duration::from_secs(3)),
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            assert_eq!(
                server.task.await.unwrap().0.as_deref(),
                Some("probe.example")
            );

            // A self-signed certificate does not verify.
            let server = tls_server().await;
            let o = run(
                &tls_probe(Some("localhost"), true),
                &target(server.addr, Duration::from_secs(3)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert_eq!(
                o.detail,
                "TLS handshake failed: invalid peer certificate: UnknownIssuer"
            );
            let _ = server.task.await;

            // Not a TLS server.
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let plain = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").await;
            });
            let o = run(
                &tls_probe(None, false),
                &target(plain, Duration::from_secs(3)),
                0,
            )
            .await;
            assert!(!o.ok);
            assert!(
                o.detail
                    .starts_with("TLS handshake failed: received corrupt message"),
                "{o:?}"
            );
            server.await.unwrap();
        })
        .await
    }

    // --- SMTP

    async fn smtp_server(banner: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut lines = Vec::new();
            w.write_all(banner).await.unwrap();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                lines.push(line.clone());
                if line.starts_with("HELO") {
                    w.write_all(b"250-smtp.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                        .await
                        .unwrap();
                } else if line.starts_with("QUIT") {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                }
            }
            lines
        });
        (addr, task)
    }

    #[tokio::test]
    async fn smtp() {
        within(10, async {
            let probe = Probe::Smtp {
                helo: "checker.example".into(),
            };
            let (addr, server) = smtp_server(b"220-smtp.example ESMTP\r\n220 ready\r\n").await;
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(o.ok, "{o:?}");
            assert_eq!(o.detail, "banner 220, HELO 250, QUIT 221");
            assert_eq!(
                server.await.unwrap(),
                ["HELO checker.example\r\n", "QUIT\r\n"]
            );

            let (addr, _server) = smtp_server(b"554 go away\r\n").await;
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "banner \"554 go away\", not 220");
        })
        .await
    }

    // --- DNS

    /// Answers one query: first with a wrong id, then with `rcode`. Returns the query.
    async fn dns_server(rcode: u8, answer: bool) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = s.recv_from(&mut buf).await.unwrap();
            let query = buf[..n].to_vec();
            if answer {
                let mut reply = query.clone();
                reply[2] |= 0x80;
                reply[3] = rcode;
                let mut wrong = reply.clone();
                wrong[0] ^= 0xff;
                wrong[3] = 0;
                s.send_to(&wrong, from).await.unwrap();
                s.send_to(&reply, from).await.unwrap();
            }
            query
        });
        (addr, task)
    }

    #[tokio::test]
    async fn dns() {
        within(10, async {
            let probe = Probe::Dns {
                qtype: 6,
                name: "example.com.".into(),
            };
            let (addr, server) = dns_server(0, true).await;
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(o.ok, "{o:?}");
            let q = server.await.unwrap();
            assert_eq!(&q[2..12], &[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            assert_eq!(&q[12..], b"\x07example\x03com\x00\x00\x06\x00\x01");

            let (addr, _server) = dns_server(3, true).await;
            let o = run(&probe, &target(addr, Duration::from_secs(2)), 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "RCODE 3 (NXDOMAIN)");

            let (addr, _server) = dns_server(0, false).await;
            let o = run(&probe, &target(addr, Duration::from_millis(300)), 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "no reply within 300 ms");

            assert_eq!(
                dns_query(0x1234, 1, ".").unwrap(),
                b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01"
            );
            assert!(dns_query(1, 1, "a..b").is_err());
            assert!(dns_query(1, 1, &"a".repeat(64)).is_err());
        })
        .await
    }

    // --- UDP

    #[tokio::test]
    async fn udp() {
        within(10, async {
            let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = echo.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                    let mut r = b"ECHO ".to_vec();
                    r.extend_from_slice(&buf[..n]);
                    echo.send_to(&r, from).await.unwrap();
                }
            });
            let probe = |require_reply, reply: Option<&[u8]>| Probe::Udp {
                payload: b"ping".to_vec(),
                require_reply,
                reply: reply.map(<[u8]>::to_vec),
            };
            let t = target(addr, Duration::from_secs(2));
            let o = run(&probe(true, Some(b"ECHO ping")), &t, 0).await;
            assert!(o.ok, "{o:?}");
            let o = run(&probe(true, Some(b"PONG")), &t, 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "reply \"ECHO ping\" does not start with \"PONG\"");
            let o = run(&probe(false, None), &t, 0).await;
            assert!(o.ok, "{o:?}");
            server.abort();

            // A closed port: ICMP port unreachable.
            let port = UdpSocket::bind("127.0.0.1:0")
                .await
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let t = target(local(port), Duration::from_secs(2));
            let o = run(&probe(false, None), &t, 0).await;
            assert!(!o.ok);
            assert_eq!(o.detail, "ICMP port unreachable");
            let o = run(&probe(true, None), &t, 0).await;
            assert_eq!(o.detail, "ICMP port unreachable");

            // Silence: fine without require_reply (after at most 1 s), down with it.
            let quiet = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let t = target(quiet.local_addr().unwrap(), Duration::from_millis(400));
            let o = run(&probe(false, None), &t, 0).await;
            assert!(o.ok, "{o:?}");
            assert!(o.latency >= Duration::from_millis(400));
            let o = run(&probe(true, None), &t, 0).await;
            assert_eq!(o.detail, "no reply within 400 ms");
        })
        .await
    }

    // --- Ping

    #[tokio::test]
    async fn ping() {
        within(10, async {
            for ip in ["127.0.0.1", "::1"] {
                let t = target(
                    SocketAddr::new(ip.parse().unwrap(), 0),
                    Duration::from_secs(2),
                );
                let o = run(&Probe::Ping, &t, 0).await;
                assert!(o.ok, "{ip}: {o:?}");
                assert!(o.detail.starts_with("echo reply"), "{o:?}");
            }
            // With a source address.
            let mut t = target(
                SocketAddr::new("127.0.0.1".parse().unwrap(), 0),
                Duration::from_secs(2),
            );
            t.bind = Some("127.0.0.1".parse().unwrap());
            let o = run(&Probe::Ping, &t, 0).await;
            assert!(o.ok, "{o:?}");
        })
        .await
    }

    #[test]
    fn icmp_errors() {
        // An IPv4 host unreachable about our echo request (id 7, seq 9).
        let mut p = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 9,
        ]);
        p.extend_from_slice(&[8, 0, 0, 0, 0, 7, 0, 9]);
        let from = "10.0.0.1".parse().unwrap();
        let dest = "10.0.0.9".parse().unwrap();
        match icmp_match(&p, true, from, dest, 7, 9) {
            Some(IcmpReply::Error(e)) => assert_eq!(e, "ICMP host unreachable from 10.0.0.1"),
            _ => panic!("not recognised"),
        }
        assert!(icmp_match(&p, true, from, dest, 7, 10).is_none());
        assert!(icmp_match(&p[..30], true, from, dest, 7, 9).is_none());
        assert!(icmp_match(&[], true, from, dest, 7, 9).is_none());
        assert_eq!(inet_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }

    // --- File

    #[tokio::test]
    async fn file() {
        within(10, async {
            let dir = std::env::temp_dir().join(format!("xlb-probe-file-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let probe = |name: &str, content: &[u8]| {
                let p = dir.join(name);
                std::fs::write(&p, content).unwrap();
                Probe::File {
                    weight: None,
                    reverse: false,
                    path: p.to_string_lossy().into_owned(),
                }
            };
            let t = target(local(0), Duration::from_secs(1));
            let o = run(&probe("five", b"  5\n"), &t, 0).await;
            assert!(o.ok && o.weight == Some(5), "{o:?}");
            let o = run(&probe("big", b"99999999999999999999999"), &t, 0).await;
            assert_eq!(o.weight, Some(i32::MAX as u32));
            let o = run(&probe("zero", b"0"), &t, 0).await;
            assert!(!o.ok && o.weight.is_none());
            assert_eq!(o.detail, "value 0");
            let o = run(&probe("neg", b"-3 x"), &t, 0).await;
            assert_eq!((o.ok, o.detail.as_str()), (false, "value -3"));
            let o = run(&probe("junk", b"abc"), &t, 0).await;
            assert!(!o.ok);
            assert!(o.detail.starts_with("no number in "), "{o:?}");
            // keepalived's track_file: value × weight added to the configured weight (1
            // here); weight 0: only value 0 is up.
            let tracked = |content: &[u8], w: i32, reverse: bool| {
                let p = dir.join("tracked");
                std::fs::write(&p, content).unwrap();
                Probe::File {
                    path: p.to_string_lossy().into_owned(),
                    weight: Some(w),
                    reverse,
                }
            };
            let t = target(local(0), Duration::from_secs(1));
            let o = run(&tracked(b"3\n", 2, false), &t, 0).await;
            assert_eq!((o.ok, o.weight), (true, Some(7)), "{o:?}");
            let o = run(&tracked(b"3\n", 2, true), &t, 0).await;
            assert_eq!((o.ok, o.weight), (true, Some(0)), "{o:?}");
            let o = run(&tracked(b"0", 0, false), &t, 0).await;
            assert!(o.ok, "{o:?}");
            let o = run(&tracked(b"4", 0, false), &t, 0).await;
            assert!(!o.ok, "{o:?}");
            let missing = Probe::File {
                weight: None,
                reverse: false,
                path: dir.join("missing").to_string_lossy().into_owned(),
            };
            let o = run(&missing, &t, 0).await;
            assert!(!o.ok);
            assert!(o.detail.ends_with("no such file or directory"), "{o:?}");
            std::fs::remove_dir_all(&dir).unwrap();
        })
        .await
    }

    // --- Misc

    fn sh(script: &str, dynamic: bool) -> Probe {
        Probe::Misc(MiscProbe {
            argv: vec![script.into()],
            shell: true,
            dynamic,
            user: None,
            group: None,
        })
    }

    #[tokio::test]
    async fn misc_exit_codes() {
        within(10, async {
            let t = target(local(8080), Duration::from_secs(3));
            let o = run(&sh("exit 0", false), &t, 0).await;
            assert_eq!((o.ok, o.detail.as_str(), o.weight), (true, "exit 0", None));
            let o = run(&sh("exit 1", false), &t, 0).await;
            assert_eq!((o.ok, o.detail.as_str()), (false, "exit 1"));
            let o = run(&sh("echo broken >&2; exit 7", false), &t, 0).await;
            assert_eq!(
                (o.ok, o.detail.as_str()),
                (false, "exit 7 (stderr: broken)")
            );
            let o = run(&sh("exit 7", true), &t, 0).await;
            assert_eq!(
                (o.ok, o.detail.as_str(), o.weight),
                (true, "exit 7: weight 5", Some(5))
            );
            let o = run(&sh("exit 0", true), &t, 0).await;
            assert_eq!((o.ok, o.weight), (true, None));
            let o = run(&sh("exit 1", true), &t, 0).await;
            assert!(!o.ok);
            let o = run(&sh("exit 255", true), &t, 0).await;
            assert_eq!(o.weight, Some(253));
            let o = run(&sh("kill -9 $$", false), &t, 0).await;
            assert_eq!(
                (o.ok, o.detail.as_str()),
                (false, "killed by signal 9 (SIGKILL)")
            );

            let missing = Probe::Misc(MiscProbe {
                argv: vec!["/nonexistent/check".into()],
                shell: false,
                dynamic: false,
                user: None,
                group: None,
            });
            let o = run(&missing, &t, 0).await;
            assert!(!o.ok);
            assert_eq!(
                o.detail,
                "cannot run /nonexistent/check: no such file or directory"
            );
        })
        .await
    }

    #[tokio::test]
    async fn misc_substitution() {
        within(10, async {
            let t = target(local(8080), Duration::from_secs(3));
            let probe = Probe::Misc(MiscProbe {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "test \"$1\" = 127.0.0.1:8080".into(),
                    "sh".into(),
                    "%h:%p".into(),
                ],
                shell: false,
                dynamic: false,
                user: None,
                group: None,
            });
            let o = run(&probe, &t, 0).await;
            assert!(o.ok, "{o:?}");
            let o = run(&sh("test %h = 127.0.0.1 && test %p = 8080", false), &t, 0).await;
            assert!(o.ok, "{o:?}");
            let t6 = target("[::1]:53".parse().unwrap(), Duration::from_secs(3));
            let o = run(&sh("test %h = ::1", false), &t6, 0).await;
            assert!(o.ok, "{o:?}");
        })
        .await
    }

    #[tokio::test]
    async fn misc_timeout() {
        within(15, async {
            let t = target(local(0), Duration::from_secs(1));
            let sleep = sh("sleep 10", false);
            // The shell and sleep ignore SIGTERM: SIGKILL 2 s later.
            let stubborn = sh("trap '' TERM; sleep 10; sleep 10", false);
            let (term, kill) = tokio::join!(run(&sleep, &t, 0), run(&stubborn, &t, 0));
            assert!(!term.ok);
            assert_eq!(term.detail, "killed after timeout (1 s)");
            assert!(
                term.latency >= Duration::from_secs(1)
                    && term.latency < Duration::from_millis(1800),
                "{term:?}"
            );
            assert!(!kill.ok);
            assert_eq!(
                kill.detail,
                "killed after timeout (1 s; SIGTERM ignored, SIGKILL)"
            );
            assert!(
                kill.latency >= Duration::from_secs(3)
                    && kill.latency < Duration::from_millis(3800),
                "{kill:?}"
            );
        })
        .await
    }

    #[tokio::test]
    async fn misc_huge_output() {
        within(20, async {
            let t = target(local(0), Duration::from_secs(10));
            let o = run(
                &sh(
                    "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2; exit 3",
                    true,
                ),
                &t,
                0,
            )
            .await;
            assert_eq!((o.ok, o.weight), (true, Some(1)), "{o:?}");
            assert!(o.latency < Duration::from_secs(5));
            // A background child keeping the pipes open does not hold the result back.
            let o = run(&sh("sleep 5 & exit 0", false), &t, 0).await;
            assert!(o.ok && o.latency < Duration::from_secs(2), "{o:?}");
            // ... and does not outlive the attempt: its process group is killed.
            let pidfile = std::env::temp_dir().join(format!("xlb-probe-bg-{}", std::process::id()));
            let o = run(
                &sh(
                    &format!("sleep 30 & echo $! > {}; exit 0", pidfile.display()),
                    false,
                ),
                &t,
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            let pid: i32 = std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let _ = std::fs::remove_file(&pidfile);
            let gone = (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                // A killed child of ours may linger as a zombie until reaped by init.
                std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                })
            });
            assert!(gone, "the background child {pid} survived");
        })
        .await
    }

    #[tokio::test]
    async fn misc_user() {
        within(10, async {
            let mut t = target(local(0), Duration::from_secs(3));
            let probe = |user: Option<&str>, group: Option<&str>, script: &str| {
                Probe::Misc(MiscProbe {
                    argv: vec![script.into()],
                    shell: true,
                    dynamic: false,
                    user: user.map(str::to_string),
                    group: group.map(str::to_string),
                })
            };
            let o = run(
                &probe(
                    Some("nobody"),
                    None,
                    "test $(id -u) = 65534 && test $(id -g) = 65534 && test \"$(id -G)\" = 65534",
                ),
                &t,
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            let o = run(
                &probe(
                    Some("nobody"),
                    Some("root"),
                    "test $(id -u) = 65534 && test $(id -g) = 0",
                ),
                &t,
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            let o = run(&probe(Some("no-such-user-xlb"), None, "true"), &t, 0).await;
            assert_eq!(
                (o.ok, o.detail.as_str()),
                (false, "unknown user no-such-user-xlb")
            );
            // The script user applies when the probe names none.
            t.script_user = Some("nobody nogroup".into());
            let o = run(&probe(None, None, "test $(id -u) = 65534"), &t, 0).await;
            assert!(o.ok, "{o:?}");

            // And to send/expect programs.
            let expect = Probe::SendExpect(SendExpectProbe {
                send: vec![],
                expect: b"65534\n".to_vec(),
                program: Some(vec!["id".into(), "-u".into()]),
            });
            let o = run(&expect, &t, 0).await;
            assert!(o.ok, "{o:?}");
        })
        .await
    }

    // --- Send/expect

    #[tokio::test]
    async fn send_expect() {
        within(10, async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                loop {
                    let (mut s, _) = l.accept().await.unwrap();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        let mut got = Vec::new();
                        while find(&got, b"\r\n").is_none() {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        if got == b"PING\r\n" {
                            let _ = s.write_all(b"+PO").await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            let _ = s.write_all(b"NG\r\n").await;
                        } else {
                            let _ = s.write_all(b"-ERR\r\n").await;
                        }
                    });
                }
            });
            let t = target(addr, Duration::from_secs(2));
            let probe = |send: &[u8], expect: &[u8]| {
                Probe::SendExpect(SendExpectProbe {
                    send: send.to_vec(),
                    expect: expect.to_vec(),
                    program: None,
                })
            };
            let o = run(&probe(b"PING\r\n", b"+PONG\r\n"), &t, 0).await;
            assert!(o.ok, "{o:?}");
            let o = run(&probe(b"PONG\r\n", b"+PONG"), &t, 0).await;
            assert!(!o.ok);
            assert_eq!(
                o.detail,
                "\"+PONG\" not in the reply (6 bytes, ending \"-ERR\\r\\n\")"
            );
            let o = run(&probe(b"", b""), &t, 0).await;
            assert_eq!((o.ok, o.detail.as_str()), (true, "connected"));
            let o = run(&probe(b"X\r\n", b""), &t, 0).await;
            assert!(o.ok, "{o:?}");
            // Nothing sent, something expected: nothing comes.
            let short = target(addr, Duration::from_millis(300));
            let o = run(&probe(b"", b"220"), &short, 0).await;
            assert_eq!(
                o.detail,
                "timed out after 300 ms waiting for the expected reply"
            );
            server.abort();

            let t = target(local(8080), Duration::from_secs(2));
            let program = |argv: &[&str], expect: &[u8]| {
                Probe::SendExpect(SendExpectProbe {
                    send: vec![],
                    expect: expect.to_vec(),
                    program: Some(argv.iter().map(|a| a.to_string()).collect()),
                })
            };
            let o = run(
                &program(&["echo", "hello %h:%p"], b"hello 127.0.0.1:8080"),
                &t,
                0,
            )
            .await;
            assert!(o.ok, "{o:?}");
            let o = run(&program(&["echo", "hello"], b"bye"), &t, 0).await;
            assert!(!o.ok);
            assert_eq!(
                o.detail,
                "\"bye\" not in the program's output (exit 0, stdout \"hello\\n\")"
            );
            let o = run(
                &program(&["sleep", "10"], b"x"),
                &target(local(0), Duration::from_millis(500)),
                0,
            )
            .await;
            assert_eq!(o.detail, "killed after timeout (500 ms)");
        })
        .await
    }
}

//! The IPVS connection state machine (`ip_vs_proto_tcp.c`), shared by the data plane and the
//! controller so both always agree on states, timeouts and what counts as active.

/// Connection states, numbered as IPVS numbers them (`IP_VS_TCP_S_*`), plus one for UDP.
pub mod state {
    pub const NONE: u8 = 0;
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const TIME_WAIT: u8 = 5;
    pub const CLOSE: u8 = 6;
    pub const CLOSE_WAIT: u8 = 7;
    pub const LAST_ACK: u8 = 8;
    pub const LISTEN: u8 = 9;
    pub const SYNACK: u8 = 10;
    /// UDP "connections" have a single state.
    pub const UDP: u8 = 11;
    pub const COUNT: usize = 12;
}

/// State names as `ipvsadm -L -c` prints them.
pub const STATE_NAMES: [&str; state::COUNT] = [
    "NONE",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "SYNACK",
    "UDP",
];

/// IPVS default idle timeouts in seconds (`tcp_timeouts[]`, `udp_timeouts[]`).
pub const DEFAULT_TIMEOUTS: [u32; state::COUNT] = [
    2,   // NONE
    900, // ESTABLISHED (ipvsadm --set, 1st value)
    120, // SYN_SENT
    60,  // SYN_RECV
    120, // FIN_WAIT (ipvsadm --set, 2nd value)
    120, // TIME_WAIT
    10,  // CLOSE
    60,  // CLOSE_WAIT
    30,  // LAST_ACK
    120, // LISTEN
    120, // SYNACK
    300, // UDP (ipvsadm --set, 3rd value)
];

/// States counted in ActiveConn (IPVS `tcp_state_active_table`, Linux >= 4.8); every other
/// state, and UDP, counts as InActConn.
#[inline(always)]
pub fn is_active(s: u8) -> bool {
    matches!(
        s,
        state::ESTABLISHED | state::SYN_SENT | state::SYN_RECV | state::SYNACK
    )
}

/// TCP flag bits (byte 13 of the TCP header).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Event rows of the transition tables.
const EV_SYN: usize = 0;
const EV_FIN: usize = 1;
const EV_ACK: usize = 2;
const EV_RST: usize = 3;

use state::{
    CLOSE as CL, CLOSE_WAIT as CW, ESTABLISHED as ES, FIN_WAIT as FW, LAST_ACK as LA, LISTEN as LI,
    SYN_RECV as SR, SYN_SENT as SS, TIME_WAIT as TW,
};

/// IPVS "INPUT-ONLY" table: connections whose replies bypass the balancer (direct routing and
/// tunnelling), driven by client packets only. Row = event, column = current state
/// (NONE..SYNACK).
const INPUT_ONLY: [[u8; 11]; 4] = [
    // NO  ES  SS  SR  FW  TW  CL  CW  LA  LI  SA
    [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SR], // syn
    [CL, FW, SS, TW, FW, TW, CL, CW, LA, LI, TW], // fin
    [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES], // ack
    [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, CL], // rst
];

/// IPVS "INPUT" table (client → server packets of NAT connections).
const INPUT: [[u8; 11]; 4] = [
    [SR, ES, ES, SR, SR, SR, SR, SR, SR, SR, SR],
    [CL, CW, SS, TW, TW, TW, CL, CW, LA, LI, TW],
    [ES, ES, SS, ES, FW, TW, CL, CW, CL, LI, ES],
    [CL, CL, CL, SR, CL, CL, CL, CL, LA, LI, SR],
];

/// IPVS "OUTPUT" table (server → client packets of NAT connections).
const OUTPUT: [[u8; 11]; 4] = [
    [SS, ES, SS, SR, SS, SS, SS, SS, SS, LI, SR],
    [TW, FW, SS, TW, FW, TW, CL, TW, LA, LI, TW],
    [ES, ES, SS, ES, FW, TW, CL, CW, LA, ES, ES],
    [CL, CL, SS, CL, CL, TW, CL, CL, CL, CL, CL],
];

/// Which table drives a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Direct routing / tunnel: only client packets are seen.
    InputOnly,
    /// NAT, client → server.
    Input,
    /// NAT, server → client.
    Output,
}

/// Event row for a segment's flags: RST > SYN > FIN > ACK; `None` for a segment with none of
/// them (IPVS moves the connection to CLOSE).
#[inline(always)]
fn event(tcp_flags: u8) -> Option<usize> {
    if tcp_flags & flags::RST != 0 {
        Some(EV_RST)
    } else if tcp_flags & flags::SYN != 0 {
        Some(EV_SYN)
    } else if tcp_flags & flags::FIN != 0 {
        Some(EV_FIN)
    } else if tcp_flags & flags::ACK != 0 {
        Some(EV_ACK)
    } else {
        None
    }
}

/// The state after a segment with `tcp_flags` arrives in `current`.
#[inline(always)]
pub fn next_state(dir: Direction, current: u8, tcp_flags: u8) -> u8 {
    let Some(ev) = event(tcp_flags) else {
        return state::CLOSE;
    };
    // Masked first, so the verifier sees the index bounded whatever LLVM makes of the
    // comparison; unknown states read column NONE (the padding repeats it).
    let col = (current & 15) as usize;
    let col = if col < 11 { col } else { 0 };
    let table = match dir {
        Direction::InputOnly => &INPUT_ONLY_PADDED,
        Direction::Input => &INPUT_PADDED,
        Direction::Output => &OUTPUT_PADDED,
    };
    table[ev][col]
}

/// A transition table with rows padded to 16 columns (the padding repeats column NONE).
const fn padded(t: [[u8; 11]; 4]) -> [[u8; 16]; 4] {
    let mut out = [[0u8; 16]; 4];
    let mut ev = 0;
    while ev < 4 {
        let mut col = 0;
        while col < 16 {
            out[ev][col] = if col < 11 { t[ev][col] } else { t[ev][0] };
            col += 1;
        }
        ev += 1;
    }
    out
}

const INPUT_ONLY_PADDED: [[u8; 16]; 4] = padded(INPUT_ONLY);
const INPUT_PADDED: [[u8; 16]; 4] = padded(INPUT);
const OUTPUT_PADDED: [[u8; 16]; 4] = padded(OUTPUT);

#[cfg(test)]
mod tests {
    use super::{flags::*, state::*, *};

    fn run(dir: Direction, segs: &[u8]) -> u8 {
        segs.iter().fold(NONE, |s, f| next_state(dir, s, *f))
    }

    /// The direct-routing lifecycle of `ipvs.md` §5.5.
    #[test]
    fn dr_lifecycle() {
        let d = Direction::InputOnly;
        assert_eq!(run(d, &[SYN]), SYN_RECV);
        assert_eq!(run(d, &[SYN, ACK]), ESTABLISHED);
        assert_eq!(run(d, &[SYN, ACK, ACK]), ESTABLISHED);
        assert_eq!(run(d, &[SYN, ACK, FIN | ACK]), FIN_WAIT);
        assert_eq!(run(d, &[SYN, ACK, FIN | ACK, ACK]), FIN_WAIT);
        assert_eq!(run(d, &[SYN, ACK, RST]), CLOSE);
        assert_eq!(run(d, &[SYN, SYN, RST]), SYN_RECV);
        assert_eq!(run(d, &[ACK]), ESTABLISHED);
        assert_eq!(run(d, &[SYN, ACK, 0]), CLOSE);
    }

    /// NAT lifecycles of `ipvs.md` §5.5 (client closes / server closes).
    #[test]
    fn nat_lifecycles() {
        use Direction::{Input as I, Output as O};
        let steps = |v: &[(Direction, u8)]| v.iter().fold(NONE, |s, (d, f)| next_state(*d, s, *f));
        let open = [(I, SYN), (O, SYN | ACK), (I, ACK)];
        assert_eq!(steps(&open), ESTABLISHED);
        let mut c = open.to_vec();
        c.push((I, FIN | ACK));
        assert_eq!(steps(&c), CLOSE_WAIT);
        c.push((O, ACK));
        assert_eq!(steps(&c), CLOSE_WAIT);
        c.push((O, FIN | ACK));
        assert_eq!(steps(&c), TIME_WAIT);
        let mut s = open.to_vec();
        s.push((O, FIN | ACK));
        assert_eq!(steps(&s), FIN_WAIT);
        s.push((I, FIN | ACK));
        assert_eq!(steps(&s), TIME_WAIT);
    }

    #[test]
    fn active_set() {
        let active: [u8; 4] = [ESTABLISHED, SYN_SENT, SYN_RECV, SYNACK];
        for s in 0..COUNT as u8 {
            assert_eq!(
                is_active(s),
                active.contains(&s),
                "{}",
                STATE_NAMES[s as usize]
            );
        }
    }
}

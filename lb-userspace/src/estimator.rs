//! IPVS's rate estimator (`ip_vs_est.c`), so `ipvsadm --rate` and the metrics show the same
//! figures IPVS would: every 2 s the counters' growth is folded into an exponentially weighted
//! average with weight 1/4, kept in fixed point (rates ×2^10 per second for connections and
//! packets, ×2^5 for bytes) and rounded when read.

use crate::engine::{CountersView, RateView};

/// The sampling period IPVS uses.
pub const PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// One estimator (a service or a real server).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimator {
    last: CountersView,
    started: bool,
    cps: i64,
    in_pps: i64,
    out_pps: i64,
    in_bps: i64,
    out_bps: i64,
}

fn fold(avg: &mut i64, rate: i64) {
    *avg += (rate - *avg) >> 2;
}

impl Estimator {
    /// Takes one 2-second sample of the running counters.
    pub fn sample(&mut self, now: &CountersView) {
        if !self.started {
            // IPVS starts its estimator with the counters as they are.
            self.last = now.clone();
            self.started = true;
            return;
        }
        let d = |a: u64, b: u64| a.wrapping_sub(b) as i64;
        // Growth over 2 s: ×2^10 / 2 = << 9 for counts, ×2^5 / 2 = << 4 for bytes.
        fold(&mut self.cps, d(now.conns, self.last.conns) << 9);
        fold(
            &mut self.in_pps,
            d(now.in_packets, self.last.in_packets) << 9,
        );
        fold(
            &mut self.out_pps,
            d(now.out_packets, self.last.out_packets) << 9,
        );
        fold(&mut self.in_bps, d(now.in_bytes, self.last.in_bytes) << 4);
        fold(
            &mut self.out_bps,
            d(now.out_bytes, self.last.out_bytes) << 4,
        );
        self.last = now.clone();
    }

    /// The rates as IPVS reports them (`ip_vs_read_estimator()`).
    pub fn read(&self) -> RateView {
        let r10 = |x: i64| ((x.max(0) + 0x1FF) >> 10) as u64;
        let r5 = |x: i64| ((x.max(0) + 0xF) >> 5) as u64;
        RateView {
            cps: r10(self.cps),
            in_pps: r10(self.in_pps),
            out_pps: r10(self.out_pps),
            in_bps: r5(self.in_bps),
            out_bps: r5(self.out_bps),
        }
    }

    /// `ipvsadm -Z`: the averages start again from the counters as they are.
    pub fn reset(&mut self, now: &CountersView) {
        *self = Estimator::default();
        self.sample(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(conns: u64, pkts: u64, bytes: u64) -> CountersView {
        CountersView {
            conns,
            in_packets: pkts,
            in_bytes: bytes,
            out_packets: pkts / 2,
            out_bytes: bytes / 2,
        }
    }

    /// A steady 100 conn/s, 1000 pkt/s, 1 MB/s converges to exactly those figures, as
    /// IPVS's EWMA does (the fixed-point average approaches the rate from below; rounding
    /// on read makes it exact once within half a unit).
    #[test]
    fn steady_rate_converges() {
        let mut e = Estimator::default();
        let mut c = counters(0, 0, 0);
        e.sample(&c);
        let mut seen = Vec::new();
        // (3/4)^n of the step is still missing after n periods: 100 periods leave none.
        for _ in 0..100 {
            c = counters(c.conns + 200, c.in_packets + 2000, c.in_bytes + 2_000_000);
            e.sample(&c);
            seen.push(e.read().cps);
        }
        let r = e.read();
        assert_eq!(r.cps, 100);
        assert_eq!(r.in_pps, 1000);
        assert_eq!(r.out_pps, 500);
        assert_eq!(r.in_bps, 1_000_000);
        assert_eq!(r.out_bps, 500_000);
        // After one period a quarter of the step is seen: IPVS's 1/4 weight.
        assert_eq!(seen[0], 25);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    /// The worked figures: (100 - 0) × 2^10 / 4 = 25600 → 25; then 25600 + (102400 -
    /// 25600) / 4 = 44800 → 44 (rounded (44800 + 511) >> 10).
    #[test]
    fn fixed_point_matches_ipvs() {
        let mut e = Estimator::default();
        e.sample(&counters(0, 0, 0));
        e.sample(&counters(200, 0, 0));
        assert_eq!(e.cps, 25600);
        assert_eq!(e.read().cps, 25);
        e.sample(&counters(400, 0, 0));
        assert_eq!(e.cps, 44800);
        assert_eq!(e.read().cps, 44);
        // Idle: decays to zero.
        for _ in 0..60 {
            e.sample(&counters(400, 0, 0));
        }
        assert_eq!(e.read().cps, 0);
    }
}

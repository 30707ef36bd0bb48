//! Scale (issue 3): a service of 4096 real servers and 65,536 services fit, and are served
//! exactly (BPF_PROG_TEST_RUN on the real program).

use std::net::{IpAddr, Ipv4Addr};

use xlb::config::Limits;
use xlb_tests::{frames::*, harness::*};

fn server(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 2, (i >> 8) as u8, i as u8))
}

/// 4096 real servers of weight 1 under wlc: the first 4096 connections go one to each
/// server (the least loaded, ties to the earliest in IPVS list order), the next one to the
/// first server again - the grouped scan's choices are the plain scan's at this size too.
#[test]
fn a_service_of_4096_servers_is_scheduled_exactly() {
    const N: u32 = 4096;
    let mut cfg = String::from(
        "[[services]]\nname = \"big\"\naddress = \"10.0.0.10:80\"\nscheduler = \"wlc\"\n",
    );
    for i in 0..N {
        cfg += &format!("[[services.backends]]\naddress = \"{}\"\n", server(i));
    }
    let h = Harness::with_limits(
        &cfg,
        Limits {
            conn_table_size: 16384,
            conn_table_size_v6: 64,
            max_services: 8,
            max_backends: N + 16,
            slot_table_size: 1 << 16,
            ..Limits::default()
        },
    );
    let all: Vec<IpAddr> = (0..N).map(server).collect();
    let mut seen = vec![false; N as usize];
    for k in 0..N {
        let f = Frame::tcp("192.168.7.1", 1000 + k as u16, "10.0.0.10", 80, SYN).build();
        let got = h.server_of(&h.run(&f), &all).expect("forwarded");
        let IpAddr::V4(a) = got else { unreachable!() };
        let i = u32::from(a.octets()[2]) << 8 | u32::from(a.octets()[3]);
        // IPVS list order is the reverse of the configuration order.
        assert_eq!(i, N - 1 - k, "connection {k}");
        assert!(!seen[i as usize]);
        seen[i as usize] = true;
    }
    let f = Frame::tcp("192.168.7.1", 1000 + N as u16, "10.0.0.10", 80, SYN).build();
    assert_eq!(h.server_of(&h.run(&f), &all), Some(server(N - 1)));
    h.assert_counts_match_tables();
}

/// 65,536 virtual services (each with its real server) are all found.
#[test]
fn sixty_five_thousand_services_fit() {
    const N: u32 = 65536;
    let mut cfg = String::with_capacity(N as usize * 100);
    for i in 0..N {
        cfg += &format!(
            "[[services]]\nname = \"s{i}\"\naddress = \"10.1.{}.{}:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.1.1\"\n",
            i >> 8,
            i & 255
        );
    }
    let h = Harness::with_limits(
        &cfg,
        Limits {
            conn_table_size: 4096,
            conn_table_size_v6: 64,
            max_services: N,
            max_backends: N,
            slot_table_size: 1 << 17,
            ..Limits::default()
        },
    );
    let rs = [IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1))];
    for i in (0..N).step_by(257).chain([N - 1]) {
        let vip = format!("10.1.{}.{}", i >> 8, i & 255);
        let f = Frame::tcp("192.168.7.1", 2000, &vip, 80, SYN).build();
        assert_eq!(h.server_of(&h.run(&f), &rs), Some(rs[0]), "service {vip}");
    }
}

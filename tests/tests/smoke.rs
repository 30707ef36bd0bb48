use xlb_tests::{frames::*, harness::*};

#[test]
fn smoke() {
    let h = Harness::new(
        r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1:80"
"#,
    );
    let f = Frame::tcp("192.168.1.1", 12345, "10.0.0.10", 80, SYN).build();
    let r = h.run(&f);
    println!("{:?} {:?}", r.action, h.counters());
    assert_eq!(r.action, XDP_TX);
    assert_eq!(
        r.out,
        expected_dr(&f, backend_mac("10.0.1.1".parse().unwrap()), LB_MAC)
    );
}

//! VRRP (RFC 3768 v2, RFC 5798/9568 v3), interoperating with keepalived: the instances'
//! elections, VIP ownership and tracking.

pub mod config;
pub mod machine;
pub mod net;
pub mod packet;
pub mod run;
pub mod syncd;

//! A keepalived.conf as the daemon's configuration: its virtual servers become xlb's services
//! (see [`crate::keepalived`] for the parsing) and the interfaces come from the command line,
//! the file's vrrp_instances, or the routes to the VIPs.

use std::{net::IpAddr, path::Path};

use anyhow::{Result, bail};

use crate::{
    config::{
        Config, DEFAULT_METRICS, DEFAULT_SOCKET, DataplaneConfig, Limits, Located, XdpModeSetting,
    },
    keepalived,
};

/// The parts of a keepalived.conf the daemon runs with, and what it ignored.
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
    /// The file's vrrp_instance interfaces (the attach points when none are given).
    pub vrrp_interfaces: Vec<String>,
}

/// Reads `path` into a [`Config`] attached to `interfaces` (none: the file's vrrp_instances'
/// interfaces; if those are none either, the caller picks by route, see [`vip_interfaces`]).
pub fn read(path: &Path, interfaces: &[String]) -> Result<Loaded> {
    let k = keepalived::load(path)?;
    let (services, warnings) = k.services()?;
    let mut warnings: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    let (ha, ha_warnings) = crate::vrrp::config::from_keepalived(&k)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    warnings.extend(ha_warnings);
    warnings.extend(k.warnings.iter().map(|w| w.to_string()));
    let vrrp_interfaces = k.vrrp_interfaces();
    let chosen = if interfaces.is_empty() {
        vrrp_interfaces.clone()
    } else {
        interfaces.to_vec()
    };
    let file = path.display().to_string();
    Ok(Loaded {
        config: Config {
            path: path.to_path_buf(),
            dataplane: DataplaneConfig {
                interfaces: chosen
                    .into_iter()
                    .map(|value| Located {
                        value,
                        file: file.clone(),
                        line: 0,
                        column: 0,
                    })
                    .collect(),
                xdp_mode: XdpModeSetting::Auto,
                limits: Limits::default(),
                expire_nodest_conn: false,
            },
            socket: DEFAULT_SOCKET.into(),
            metrics: Some(DEFAULT_METRICS.parse().expect("valid default")),
            pin_dir: None,
            script_user: k.global_defs.script_user.clone(),
            script_security: k.global_defs.enable_script_security,
            timeouts: k.timeouts().unwrap_or_default(),
            services,
            ha,
        },
        warnings,
        vrrp_interfaces,
    })
}

/// Reads `path` for a reload or a conversion: the interfaces must be known by then.
pub fn load(path: &Path, interfaces: &[String]) -> Result<Config> {
    let l = read(path, interfaces)?;
    for w in &l.warnings {
        tracing::warn!("{w}");
    }
    if l.config.dataplane.interfaces.is_empty() {
        bail!(
            "{}: no interface to attach to: give --interface IF (the file has no vrrp_instance)",
            path.display()
        );
    }
    Ok(l.config)
}

/// The interfaces that route the VIPs: the one holding each VIP's connected subnet, else
/// the one the route to it leaves by.
pub async fn vip_interfaces(vips: &[IpAddr]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for vip in vips {
        let name = crate::neigh::interface_towards(*vip).await?;
        match name {
            Some(n) if !out.contains(&n) => out.push(n),
            Some(_) => {}
            None => bail!("no interface routes VIP {vip}: give --interface IF"),
        }
    }
    Ok(out)
}

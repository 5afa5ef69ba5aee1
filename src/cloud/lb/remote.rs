//! Remote mode (designed, tested against the Vultr emulator only): the cloud-init user data
//! that turns a fresh Debian/Ubuntu VM into an LB. It installs HAProxy, writes the rendered
//! config, and binds the runtime API to the VM's **private** address only (a VPC), so the
//! controller reaches it over the private network and never over the public interface.

use super::render::{self, Paths};
use super::Spec;
use std::net::IpAddr;
use std::path::Path;

/// The runtime API port on the private network.
pub const RUNTIME_PORT: u16 = 9999;

/// cloud-init `#cloud-config` user data for an LB VM whose private address is `private_ip`.
/// The runtime API listens on `private_ip:RUNTIME_PORT` (admin level) and a firewall rule
/// drops that port on every other interface.
pub fn user_data(spec: &Spec, private_ip: IpAddr) -> String {
    let paths = Paths::new(Path::new("/var/lib/stage-lb"));
    let local = render::render(spec, &paths, &[]);
    let socket_line = format!("    stats socket {} mode 600 level admin", paths.socket.display());
    let private = format!(
        "{socket_line}\n    stats socket {}:{RUNTIME_PORT} level admin",
        match private_ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        }
    );
    let cfg = local.replacen(&socket_line, &private, 1);
    let mut out = String::from(
        "#cloud-config\npackage_update: true\npackages:\n  - haproxy\n  - nftables\nwrite_files:\n",
    );
    out.push_str("  - path: /etc/haproxy/haproxy.cfg\n    permissions: '0644'\n    content: |\n");
    for line in cfg.lines() {
        out.push_str("      ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("runcmd:\n");
    out.push_str("  - mkdir -p /var/lib/stage-lb\n");
    out.push_str(&format!(
        "  - nft add table inet stagelb && nft add chain inet stagelb input '{{ type filter hook input priority 0; }}' && nft add rule inet stagelb input tcp dport {RUNTIME_PORT} ip daddr != {private_ip} drop\n"
    ));
    out.push_str("  - systemctl restart haproxy\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runtime_api_only_on_the_private_address() {
        let spec = Spec::from_json(
            "t",
            &json!({"name": "web", "listen": "0.0.0.0:80", "backends": ["10.1.96.4:8080"]}),
        )
        .unwrap();
        let ud = user_data(&spec, "10.1.96.3".parse().unwrap());
        assert!(ud.starts_with("#cloud-config"));
        assert!(ud.contains("stats socket 10.1.96.3:9999 level admin"), "{ud}");
        assert!(!ud.contains("stats socket 0.0.0.0"), "{ud}");
        assert!(ud.contains("server s10_1_96_4_8080 10.1.96.4:8080"));
        assert!(ud.contains("ip daddr != 10.1.96.3 drop"));
    }
}

//! The pod network, as a bridge CNI plugin sets it up: a bridge on the node holding the
//! node's address (the pods' gateway), and for each pod its own network namespace with a
//! veth pair, its pod IP on `eth0` and a default route via the node. Service cluster IPs
//! live on the node's loopback device, so pods reach them through that route.
//!
//! A pod's namespace is kept by a bind mount on a file in the pod's directory (what
//! `unshare --net=FILE` makes), not in /run/netns: nothing is left on the host.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub const BRIDGE: &str = "shop0";
/// Prefix length of the pod network (`<network>.0.0/16`).
const PREFIX: u8 = 16;

async fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).await
}

/// The node's side: the bridge with the node's address (idempotent).
pub async fn setup_node(host_ip: &str) -> Result<()> {
    if ip(&["link", "show", BRIDGE]).await.is_err() {
        ip(&["link", "add", BRIDGE, "type", "bridge"]).await?;
        // A bridge without an address of its own takes the lowest MAC of its ports, which
        // changes as pods come and go; the pods' ARP entries for their gateway would then
        // point nowhere until they expire.
        ip(&["link", "set", BRIDGE, "address", "02:00:0a:f4:00:01"]).await?;
        ip(&["addr", "add", &format!("{host_ip}/{PREFIX}"), "dev", BRIDGE]).await?;
    }
    ip(&["link", "set", BRIDGE, "up"]).await
}

/// One pod's network namespace, removed by [`PodNetwork::remove`].
pub struct PodNetwork {
    file: PathBuf,
}

impl PodNetwork {
    /// `index` is unique per pod within a run (it names the node's end of the veth pair).
    pub async fn create(index: u32, pod_ip: &str, host_ip: &str, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("netns");
        std::fs::write(&file, b"")?;
        let network = Self { file };
        let result = async {
            let file = network.file.to_str().context("netns path")?;
            run("unshare", &[&format!("--net={file}"), "true"]).await?;
            let inside = |args: &[&str]| {
                let mut all = vec![format!("--net={file}"), "ip".to_owned()];
                all.extend(args.iter().map(|a| a.to_string()));
                async move {
                    let all: Vec<&str> = all.iter().map(String::as_str).collect();
                    run("nsenter", &all).await
                }
            };
            let veth = format!("veth{index}");
            let node = std::process::id().to_string();
            inside(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", &veth, "netns", &node,
            ])
            .await?;
            ip(&["link", "set", &veth, "master", BRIDGE, "up"]).await?;
            inside(&["addr", "add", &format!("{pod_ip}/{PREFIX}"), "dev", "eth0"]).await?;
            inside(&["link", "set", "eth0", "up"]).await?;
            inside(&["link", "set", "lo", "up"]).await?;
            inside(&["route", "add", "default", "via", host_ip]).await
        }
        .await;
        match result {
            Ok(()) => Ok(network),
            Err(e) => {
                network.remove().await;
                Err(e)
            }
        }
    }

    /// The namespace file a process joins with setns(2).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Unmounting the last reference ends the namespace, and with it both veth ends.
    pub async fn remove(&self) {
        let _ = run("umount", &[&self.file.display().to_string()]).await;
        let _ = std::fs::remove_file(&self.file);
    }
}

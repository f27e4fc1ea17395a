//! kube-proxy's original "userspace" mode and a cluster DNS stand-in: every Service's
//! cluster IP is added to the loopback device, a listener on each Service port forwards
//! each connection to one ready endpoint from the Service's EndpointSlices (serving
//! terminating ones only when none is ready, as kube-proxy does), and an /etc/hosts file
//! maps `name`, `name.ns`, `name.ns.svc` and `name.ns.svc.cluster.local` to the cluster IP.
//!
//! `default/kubernetes` is forwarded to the API server given on the command line, and an
//! optional selector-less Service to a server on the node's loopback (the test's
//! PostgreSQL): the endpoints those would need are loopback addresses, which EndpointSlices
//! refuse.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::{WatchStreamExt, reflector::ObjectRef};
use kube::{Api, Client, ResourceExt};
use tokio::net::{TcpListener, TcpStream};

use crate::log;

pub struct Proxy {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    apiserver: SocketAddr,
    /// A selector-less Service (`ns/name`) that stands for a server on the node's loopback.
    external: Option<(String, SocketAddr)>,
    listening: Mutex<HashSet<SocketAddr>>,
    hosts: PathBuf,
    hosts_base: String,
}

/// Adds an address to the loopback device of this network namespace (idempotent).
pub async fn add_address(ip: &str) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .output()
        .await
        .context("running ip")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("File exists") {
        bail!("ip addr add {ip}: {stderr}");
    }
    Ok(())
}

pub async fn start(
    client: Client,
    apiserver: SocketAddr,
    external: Option<(String, SocketAddr)>,
    hosts: PathBuf,
) -> Result<Arc<Proxy>> {
    let (services, services_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let service_events = reflector::reflector(
        services_writer,
        watcher::watcher(Api::<Service>::all(client.clone()), Default::default()),
    )
    .backoff(DefaultBackoff::default())
    .applied_objects();
    let slice_events = reflector::reflector(
        slices_writer,
        watcher::watcher(Api::<EndpointSlice>::all(client), Default::default()),
    )
    .backoff(DefaultBackoff::default())
    .applied_objects();
    let hosts_base =
        std::fs::read_to_string(&hosts).with_context(|| format!("reading {}", hosts.display()))?;
    let proxy = Arc::new(Proxy {
        services,
        slices,
        apiserver,
        external,
        listening: Mutex::default(),
        hosts,
        hosts_base,
    });
    tokio::spawn(slice_events.for_each(|_| async {}));
    let this = proxy.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(service_events);
        while let Some(event) = events.next().await {
            match event {
                Ok(service) => {
                    if let Err(e) = this.serve(&service).await {
                        log!("proxy: service {}: {e:#}", service.name_any());
                    }
                }
                Err(e) => log!("proxy: service watch: {e}"),
            }
        }
    });
    proxy.services.wait_until_ready().await?;
    proxy.slices.wait_until_ready().await?;
    log!("proxy: services and endpointslices synced");
    Ok(proxy)
}

impl Proxy {
    /// Listeners for a Service's ports (once each), and the hosts file rewritten.
    async fn serve(self: &Arc<Self>, service: &Service) -> Result<()> {
        let Some(ip) = service.spec.as_ref().and_then(|s| s.cluster_ip.clone()) else {
            return Ok(());
        };
        if ip.is_empty() || ip == "None" {
            return Ok(());
        }
        self.write_hosts()?;
        add_address(&ip).await?;
        let namespace = service.namespace().unwrap_or_default();
        let name = service.name_any();
        for port in service.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let addr: SocketAddr = format!("{ip}:{}", port.port).parse()?;
            if !self.listening.lock().expect("listening").insert(addr) {
                continue;
            }
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let this = self.clone();
            let key = ObjectRef::<Service>::new(&name).within(&namespace);
            let port_name = port.name.clone();
            log!("proxy: {namespace}/{name} on {addr}");
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let this = this.clone();
                    let key = key.clone();
                    let port_name = port_name.clone();
                    tokio::spawn(async move { this.forward(inbound, &key, port_name).await });
                }
            });
        }
        Ok(())
    }

    fn write_hosts(&self) -> Result<()> {
        let mut lines = BTreeMap::new();
        for service in self.services.state() {
            let Some(ip) = service.spec.as_ref().and_then(|s| s.cluster_ip.clone()) else {
                continue;
            };
            if ip.is_empty() || ip == "None" {
                continue;
            }
            let (name, ns) = (service.name_any(), service.namespace().unwrap_or_default());
            lines.insert(
                format!("{ns}/{name}"),
                format!("{ip}\t{name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns} {name}"),
            );
        }
        // The short names of the shop's namespace win; other namespaces keep their long
        // names (a real resolver's search path is per pod; here it is one file for all).
        let mut text = self.hosts_base.clone();
        text.push_str("\n# shop-mini-kubelet: Services\n");
        for line in lines.values() {
            text.push_str(line);
            text.push('\n');
        }
        // Rewritten in place: the file is bind-mounted over /etc/hosts, a rename would
        // leave the mount pointing at the old inode.
        std::fs::write(&self.hosts, text).context("writing the hosts file")
    }

    /// The endpoints to try for a Service port: ready ones in random order, or, when none
    /// is ready, serving terminating ones.
    fn endpoints(&self, key: &ObjectRef<Service>, port_name: Option<&str>) -> Vec<SocketAddr> {
        let namespace = key.namespace.as_deref().unwrap_or_default();
        let (mut ready, mut serving) = (Vec::new(), Vec::new());
        for slice in self.slices.state() {
            if slice.namespace().as_deref() != Some(namespace)
                || slice.labels().get("kubernetes.io/service-name") != Some(&key.name)
            {
                continue;
            }
            let Some(port) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == port_name)
            else {
                continue;
            };
            let Some(number) = port.port else { continue };
            for endpoint in slice.endpoints.iter().flatten() {
                let c = endpoint.conditions.as_ref();
                let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
                let is_serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
                for address in &endpoint.addresses {
                    let Ok(addr) = format!("{address}:{number}").parse() else {
                        continue;
                    };
                    if is_ready {
                        ready.push(addr);
                    } else if is_serving {
                        serving.push(addr);
                    }
                }
            }
        }
        let mut chosen = if ready.is_empty() { serving } else { ready };
        fastrand::shuffle(&mut chosen);
        chosen
    }

    async fn forward(
        &self,
        mut inbound: TcpStream,
        key: &ObjectRef<Service>,
        port: Option<String>,
    ) {
        let namespaced = format!(
            "{}/{}",
            key.namespace.as_deref().unwrap_or_default(),
            key.name
        );
        let candidates = match &self.external {
            _ if namespaced == "default/kubernetes" => vec![self.apiserver],
            Some((service, target)) if *service == namespaced => vec![*target],
            _ => self.endpoints(key, port.as_deref()),
        };
        // As the userspace proxier did: try the next endpoint when one refuses.
        for addr in candidates {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
                Ok(Ok(mut outbound)) => {
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
                _ => continue,
            }
        }
        // No endpoint: the connection is closed (kube-proxy rejects it).
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    fn slice(name: &str, port: u16, endpoints: &[(&str, bool, bool)]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "shop-order"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port}],
            "endpoints": endpoints.iter().map(|(ip, ready, terminating)| serde_json::json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": *ready || *terminating, "terminating": terminating},
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn proxy(slices: Vec<EndpointSlice>) -> Proxy {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for s in slices {
            writer.apply_watcher_event(&Event::InitApply(s));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let (services, _) = reflector::store();
        Proxy {
            services,
            slices: store,
            apiserver: "127.0.0.1:6443".parse().unwrap(),
            external: None,
            listening: Mutex::default(),
            hosts: PathBuf::new(),
            hosts_base: String::new(),
        }
    }

    fn key() -> ObjectRef<Service> {
        ObjectRef::new("shop-order").within("shop")
    }

    #[test]
    fn ready_endpoints_of_every_slice_with_the_named_port() {
        let p = proxy(vec![
            slice(
                "a",
                8082,
                &[("10.244.0.2", true, false), ("10.244.0.3", false, true)],
            ),
            slice(
                "b",
                9000,
                &[("10.244.0.4", true, false), ("10.244.0.5", false, false)],
            ),
        ]);
        let mut chosen = p.endpoints(&key(), Some("http"));
        chosen.sort();
        assert_eq!(
            chosen,
            vec![
                "10.244.0.2:8082".parse().unwrap(),
                "10.244.0.4:9000".parse().unwrap()
            ]
        );
        assert!(p.endpoints(&key(), Some("metrics")).is_empty());
        let other: ObjectRef<Service> = ObjectRef::new("shop-order").within("elsewhere");
        assert!(p.endpoints(&other, Some("http")).is_empty());
    }

    #[test]
    fn serving_terminating_endpoints_only_when_none_is_ready() {
        let p = proxy(vec![slice(
            "a",
            8082,
            &[("10.244.0.3", false, true), ("10.244.0.5", false, false)],
        )]);
        assert_eq!(
            p.endpoints(&key(), Some("http")),
            vec!["10.244.0.3:8082".parse::<SocketAddr>().unwrap()]
        );
    }
}

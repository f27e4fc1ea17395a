//! The Node: registration, status and Lease heartbeats, and the Pod watch that hands each
//! Pod bound here to its own worker.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::DefaultBackoff};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use crate::pod::{self, PodCtx};
use crate::{Args, log, network, proxy};

/// How often the node renews its Lease and reports its status (the kubelet's defaults).
const HEARTBEAT: Duration = Duration::from_secs(10);

pub async fn run(args: Args) -> Result<()> {
    let name = args.get("name")?.to_owned();
    let network = args.get_or("pod-network", "10.244").to_owned();
    let host_ip = format!("{network}.0.1");
    let client = Client::try_default()
        .await
        .context("kube client (KUBECONFIG)")?;
    let apiserver = args.get("apiserver")?.parse().context("--apiserver")?;
    network::setup_node(&host_ip).await?;

    let external = match args.get_or("external-service", "") {
        "" => None,
        spec => {
            let (service, target) = spec
                .split_once('=')
                .context("--external-service NS/NAME=HOST:PORT")?;
            Some((
                service.to_owned(),
                target.parse().context("--external-service target")?,
            ))
        }
    };
    // The proxy's listeners run on their own tasks for as long as the node does.
    proxy::start(
        client.clone(),
        apiserver,
        external,
        PathBuf::from(args.get("hosts")?),
    )
    .await?;
    let kubernetes: Service = Api::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .context("the default/kubernetes Service")?;
    let kubernetes_ip = kubernetes
        .spec
        .and_then(|s| s.cluster_ip)
        .context("default/kubernetes has no cluster IP")?;

    register(&client, &name, &host_ip).await?;
    tokio::spawn(heartbeat(client.clone(), name.clone()));
    log!("node {name} registered (host IP {host_ip}); pods get {network}.x.y");

    let ctx = Arc::new(PodCtx {
        client: client.clone(),
        node: name.clone(),
        host_ip,
        bin_dir: PathBuf::from(args.get("bin-dir")?),
        work: PathBuf::from(args.get("work")?),
        addresses: Mutex::new(pod::Addresses::new(&network)),
        kubernetes_ip,
    });
    watch_pods(ctx).await
}

async fn register(client: &Client, name: &str, host_ip: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "topology.kubernetes.io/zone": "local",
            },
        },
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.is_already_exists() => {}
        Err(e) => return Err(e).context("creating the Node"),
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {
        "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "20Gi"},
        "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "20Gi"},
        "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": name}],
        "nodeInfo": {
            "kubeletVersion": "v1.36.3-shop-mini-kubelet",
            "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH,
            "containerRuntimeVersion": "shop-mini-kubelet://processes",
            "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "", "bootID": "",
            "kubeProxyVersion": "",
        },
        "conditions": conditions(&now),
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .context("reporting the Node's status")?;
    Ok(())
}

fn conditions(now: &str) -> serde_json::Value {
    let c = |kind: &str, status: &str, reason: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": reason,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!([
        c("Ready", "True", "KubeletReady"),
        c("MemoryPressure", "False", "KubeletHasSufficientMemory"),
        c("DiskPressure", "False", "KubeletHasNoDiskPressure"),
        c("PIDPressure", "False", "KubeletHasSufficientPID"),
    ])
}

/// Lease renewals (what the node lifecycle controller watches) and status heartbeats.
async fn heartbeat(client: Client, name: String) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
        });
        let apply = PatchParams::apply("shop-mini-kubelet").force();
        if let Err(e) = leases.patch(&name, &apply, &Patch::Apply(lease)).await {
            log!("lease renewal failed: {e}");
        }
        let status = json!({"status": {"conditions": conditions(&now)}});
        if let Err(e) = nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(status))
            .await
        {
            log!("node status heartbeat failed: {e}");
        }
    }
}

/// One worker per Pod UID. A worker gets every version of its Pod, then `None` when the
/// Pod is gone from the API (deleted without grace, or removed by the worker itself).
async fn watch_pods(ctx: Arc<PodCtx>) -> Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
    let mut stream = watcher::watcher(pods, config)
        .backoff(DefaultBackoff::default())
        .boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let done: Arc<Mutex<HashSet<String>>> = Arc::default();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                log!("pod watch: {e}");
                continue;
            }
        };
        workers.retain(|uid, _| !done.lock().expect("done set").contains(uid));
        match event {
            Event::Apply(pod) | Event::InitApply(pod) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                if done.lock().expect("done set").contains(&uid) {
                    continue;
                }
                if let Some(tx) = workers.get(&uid) {
                    tx.send_replace(Some(pod));
                } else if !is_terminal(&pod) {
                    let (tx, rx) = watch::channel(Some(pod));
                    workers.insert(uid.clone(), tx);
                    let ctx = ctx.clone();
                    let done = done.clone();
                    tokio::spawn(async move {
                        pod::run(ctx, rx).await;
                        done.lock().expect("done set").insert(uid);
                    });
                }
            }
            Event::Delete(pod) => {
                if let Some(tx) = pod.metadata.uid.as_ref().and_then(|uid| workers.get(uid)) {
                    tx.send_replace(None);
                }
            }
            Event::Init | Event::InitDone => {}
        }
    }
    Ok(())
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

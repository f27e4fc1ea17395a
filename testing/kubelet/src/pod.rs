//! One Pod's life on this node: an address, its volumes, one task per container, the status
//! reported to the API server, and termination (preStop, SIGTERM, SIGKILL after the grace
//! period, then the Pod object removed with grace 0 as the kubelet's status manager does).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::container::{self, Report, Stop};
use crate::log;
use crate::network::PodNetwork;

/// The kubelet's minimum grace period for a Pod removed from the API without one.
const MIN_GRACE: Duration = Duration::from_secs(2);

pub struct PodCtx {
    pub client: Client,
    pub node: String,
    pub host_ip: String,
    pub bin_dir: PathBuf,
    pub work: PathBuf,
    pub addresses: Mutex<Addresses>,
    pub kubernetes_ip: String,
}

/// Pod IPs from a /16, never reused within a run: a stale endpoint can then only point at
/// nothing, never at another pod.
pub struct Addresses {
    network: String,
    next: u32,
}

impl Addresses {
    pub fn new(network: &str) -> Self {
        Self {
            network: network.to_owned(),
            next: 2,
        }
    }

    /// A unique index (it names the pod's network namespace) and the pod IP.
    fn take(&mut self) -> (u32, String) {
        // x.y.0 and x.y.255 are skipped: network and broadcast-looking addresses.
        while matches!(self.next % 256, 0 | 255) {
            self.next += 1;
        }
        let n = self.next;
        self.next += 1;
        (n, format!("{}.{}.{}", self.network, n / 256, n % 256))
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Conditions with their transition times.
#[derive(Default)]
struct Conditions(BTreeMap<&'static str, (bool, String)>);

impl Conditions {
    fn set(&mut self, kind: &'static str, value: bool) {
        match self.0.get(kind) {
            Some((old, _)) if *old == value => {}
            _ => {
                self.0.insert(kind, (value, now()));
            }
        }
    }

    fn json(&self) -> Value {
        self.0
            .iter()
            .map(|(kind, (value, at))| {
                json!({"type": kind, "status": if *value { "True" } else { "False" },
                       "lastTransitionTime": at, "lastProbeTime": null})
            })
            .collect()
    }
}

pub async fn run(ctx: Arc<PodCtx>, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow().clone() else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let name = pod.name_any();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        remove(&api, &name, &uid).await;
        return;
    }
    let dir = ctx.work.join(format!(
        "{}_{}_{}",
        pod.namespace().unwrap_or_default(),
        name,
        &uid[..8.min(uid.len())]
    ));
    let (index, ip) = ctx.addresses.lock().expect("addresses").take();
    let network = match PodNetwork::create(index, &ip, &ctx.host_ip, &dir).await {
        Ok(network) => network,
        Err(e) => {
            log!("pod {name}: network: {e:#}");
            return;
        }
    };
    let started_at = now();
    let mut conditions = Conditions::default();
    conditions.set("PodScheduled", true);
    conditions.set("PodReadyToStartContainers", true);
    conditions.set("Initialized", true);
    conditions.set("ContainersReady", false);
    conditions.set("Ready", false);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut reports: Vec<Report> = spec
        .containers
        .iter()
        .map(|c| {
            Report::waiting(
                &c.name,
                &c.image.clone().unwrap_or_default(),
                "ContainerCreating",
                "",
            )
        })
        .collect();
    let status = |conditions: &Conditions, reports: &[Report], phase: &str| {
        json!({"status": {
            "phase": phase,
            "hostIP": ctx.host_ip, "hostIPs": [{"ip": ctx.host_ip}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": started_at,
            "conditions": conditions.json(),
            "containerStatuses": reports.iter().map(Report::json).collect::<Vec<_>>(),
        }})
    };
    patch(&api, &name, status(&conditions, &reports, "Pending")).await;

    // Volumes and containers. A failure here is reported as the container's waiting
    // reason, as the kubelet reports CreateContainerConfigError, and retried.
    let (report_tx, mut report_rx) = mpsc::channel::<Report>(64);
    let (stop_tx, stop_rx) = watch::channel::<Option<Stop>>(None);
    let mut tasks = Vec::new();
    let prepared = loop {
        match container::prepare_pod(&ctx, &pod, &ip, network.path(), &dir).await {
            Ok(prepared) => break Some(prepared),
            Err(e) => {
                let message = format!("{e:#}");
                log!("pod {name}: {message}");
                for r in &mut reports {
                    *r = Report::waiting(&r.name, &r.image, "CreateContainerConfigError", &message);
                }
                patch(&api, &name, status(&conditions, &reports, "Pending")).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = rx.changed() => {}
                }
                let current = rx.borrow().clone();
                if current
                    .as_ref()
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
                {
                    break None;
                }
            }
        }
    };
    if let Some(prepared) = prepared {
        for (index, c) in prepared.into_iter().enumerate() {
            let tx = report_tx.clone();
            let stop = stop_rx.clone();
            let pod_name = name.clone();
            tasks.push(tokio::spawn(async move {
                container::run(pod_name, index, c, tx, stop).await
            }));
        }
    }
    drop(report_tx);

    let mut terminating = false;
    let mut open = !tasks.is_empty();
    while open {
        tokio::select! {
            report = report_rx.recv() => match report {
                Some(report) => {
                    let index = report.index;
                    reports[index] = report;
                    let all_ready = reports.iter().all(|r| r.ready);
                    conditions.set("ContainersReady", all_ready);
                    conditions.set("Ready", all_ready);
                    let phase = if reports.iter().any(|r| r.running()) { "Running" } else { "Pending" };
                    patch(&api, &name, status(&conditions, &reports, phase)).await;
                }
                None => open = false,
            },
            changed = rx.changed(), if !terminating => {
                let current = if changed.is_ok() { rx.borrow().clone() } else { None };
                let grace = match &current {
                    None => Some(MIN_GRACE),
                    Some(p) if p.metadata.deletion_timestamp.is_some() => Some(
                        Duration::from_secs(p.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64)
                            .max(if p.metadata.deletion_grace_period_seconds == Some(0) { MIN_GRACE } else { Duration::ZERO }),
                    ),
                    Some(_) => None,
                };
                if let Some(grace) = grace {
                    terminating = true;
                    log!("pod {name}: terminating, grace {}s", grace.as_secs());
                    stop_tx.send_replace(Some(Stop { deadline: Instant::now() + grace }));
                }
            }
        }
    }
    let mut codes = Vec::new();
    for task in tasks {
        codes.push(task.await.ok().flatten());
    }
    conditions.set("ContainersReady", false);
    conditions.set("Ready", false);
    if terminating {
        patch(&api, &name, status(&conditions, &reports, "Running")).await;
    } else {
        // Containers that are not restarted (restartPolicy Never/OnFailure) have finished:
        // the Pod stays, in its final phase, until someone deletes it.
        let phase = if codes.iter().all(|c| *c == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        };
        log!("pod {name}: {phase}");
        patch(&api, &name, status(&conditions, &reports, phase)).await;
        network.remove().await;
        while rx
            .borrow()
            .as_ref()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none())
        {
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    network.remove().await;
    // The container logs stay for post-mortems; the volumes (secrets, tokens) go.
    let _ = std::fs::remove_dir_all(dir.join("volumes"));
    remove(&api, &name, &uid).await;
    log!("pod {name}: gone");
}

async fn patch(api: &Api<Pod>, name: &str, status: Value) {
    let result = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await;
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() => {}
        Err(e) => log!("pod {name}: status update failed: {e}"),
    }
}

/// What the status manager does once every container has stopped: the Pod object goes.
async fn remove(api: &Api<Pod>, name: &str, uid: &str) {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {}
        Err(e) => log!("pod {name}: delete failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_are_never_reused_and_skip_network_and_broadcast() {
        let mut addresses = Addresses::new("10.244");
        let taken: Vec<String> = (0..600).map(|_| addresses.take().1).collect();
        assert_eq!(taken[0], "10.244.0.2");
        let unique: std::collections::HashSet<_> = taken.iter().collect();
        assert_eq!(unique.len(), taken.len());
        assert!(
            taken
                .iter()
                .all(|a| !a.ends_with(".0") && !a.ends_with(".255")),
            "{taken:?}"
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_it_changes() {
        let mut conditions = Conditions::default();
        conditions.set("Ready", false);
        let first = conditions.0["Ready"].1.clone();
        conditions.set("Ready", false);
        assert_eq!(conditions.0["Ready"].1, first);
        conditions.set("Ready", true);
        let json = conditions.json();
        assert_eq!(json[0]["type"], "Ready");
        assert_eq!(json[0]["status"], "True");
    }
}

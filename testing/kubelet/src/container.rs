//! Containers as processes: the image mapped to a workspace binary, environment and
//! volumes resolved as the kubelet does, each process in its own mount namespace (volumes
//! bind-mounted at their mountPath, the root read-only when the spec says so, the spec's
//! user and groups), probes run exactly as specified, and termination.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, LifecycleHandler, Pod, Probe, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::log;
use crate::pod::PodCtx;

/// What the shop images set (Dockerfile ENV, and distroless's PATH, HOME and CA bundle).
const IMAGE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ("HOME", "/home/nonroot"),
    ("DATA_DIR", "/data"),
    ("HOST", "0.0.0.0"),
];
/// The images' ENTRYPOINT: the component's binary.
const IMAGE_ENTRYPOINT: &str = "/usr/local/bin/service";
const COMPONENTS: &[&str] = &["gateway", "product", "order", "user"];

/// Asks a container to stop: preStop, SIGTERM, SIGKILL at the deadline.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    pub deadline: Instant,
}

#[derive(Debug, Clone)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        since: String,
    },
    Terminated {
        code: i32,
        reason: String,
        started: String,
        finished: String,
    },
}

/// A container's status, as the pod worker reports it.
#[derive(Debug, Clone)]
pub struct Report {
    pub index: usize,
    pub name: String,
    pub image: String,
    pub ready: bool,
    started: bool,
    /// The running process: the container ID (`shop-mini-kubelet://<pid>`).
    pid: Option<u32>,
    restarts: i32,
    state: State,
    last: Option<State>,
}

fn state_json(state: &State) -> Value {
    match state {
        State::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        State::Running { since } => json!({"running": {"startedAt": since}}),
        State::Terminated {
            code,
            reason,
            started,
            finished,
        } => json!({"terminated": {
            "exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished}}),
    }
}

impl Report {
    pub fn waiting(name: &str, image: &str, reason: &str, message: &str) -> Self {
        Self {
            index: 0,
            name: name.to_owned(),
            image: image.to_owned(),
            ready: false,
            started: false,
            pid: None,
            restarts: 0,
            state: State::Waiting {
                reason: reason.to_owned(),
                message: message.to_owned(),
            },
            last: None,
        }
    }

    pub fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    pub fn json(&self) -> Value {
        json!({
            "name": self.name, "image": self.image, "imageID": "",
            "containerID": self.pid.map(|pid| format!("shop-mini-kubelet://{pid}")),
            "ready": self.ready, "started": self.started, "restartCount": self.restarts,
            "state": state_json(&self.state),
            "lastState": self.last.as_ref().map(state_json).unwrap_or(json!({})),
        })
    }
}

struct Mount {
    source: PathBuf,
    target: String,
    read_only: bool,
}

/// Everything needed to start (and restart) one container.
pub struct Prepared {
    name: String,
    image: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    user: Option<(u32, u32, Vec<u32>)>,
    read_only_root: bool,
    no_new_privs: bool,
    log: PathBuf,
    ip: String,
    /// The pod's network namespace, joined by each of its processes.
    netns: PathBuf,
    spec: Container,
    restart_policy: String,
    grace: Duration,
    bin_dir: PathBuf,
}

/// The workspace binary an image stands for: `[registry/]shop-<component>[:tag][@digest]`.
fn image_binary(bin_dir: &Path, image: &str) -> Result<PathBuf> {
    let name = image.split('@').next().unwrap_or_default();
    let name = name.rsplit('/').next().unwrap_or_default();
    let name = name.split(':').next().unwrap_or_default();
    match name.strip_prefix("shop-") {
        Some(c) if COMPONENTS.contains(&c) => Ok(bin_dir.join(c)),
        _ => bail!(
            "image {image:?} is not one of the shop's (shop-{{{}}})",
            COMPONENTS.join(",")
        ),
    }
}

/// A command from the pod spec: the image's entrypoint path means the mapped binary.
fn command_path(binary: &Path, command: &str) -> Result<String> {
    if command == IMAGE_ENTRYPOINT {
        Ok(binary.display().to_string())
    } else {
        bail!("command {command:?} does not exist in the image (only {IMAGE_ENTRYPOINT})")
    }
}

/// Secret and ConfigMap contents, fetched once per pod start.
struct Sources<'a> {
    ctx: &'a PodCtx,
    namespace: String,
    secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    config_maps: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

impl Sources<'_> {
    async fn secret(&mut self, name: &str) -> Result<Option<&BTreeMap<String, Vec<u8>>>> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
            let data = api.get_opt(name).await?.map(|s| {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    data.insert(k, v.into_bytes());
                }
                data
            });
            self.secrets.insert(name.to_owned(), data);
        }
        Ok(self.secrets[name].as_ref())
    }

    async fn config_map(&mut self, name: &str) -> Result<Option<&BTreeMap<String, Vec<u8>>>> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
            let data = api.get_opt(name).await?.map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.unwrap_or_default() {
                    data.insert(k, v.0);
                }
                data
            });
            self.config_maps.insert(name.to_owned(), data);
        }
        Ok(self.config_maps[name].as_ref())
    }
}

fn text(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
}

fn field(pod: &Pod, ctx: &PodCtx, ip: &str, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("']"))
            .map(|k| {
                map.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => ctx.node.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone(),
        _ => match keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations))
        {
            Some(v) => v,
            None => bail!("fieldRef {path} is not supported"),
        },
    })
}

/// Writes one file of a volume: mode, and group ownership by fsGroup as the kubelet sets it.
fn write_file(dir: &Path, path: &str, data: &[u8], mode: u32, fs_group: Option<u32>) -> Result<()> {
    if path.split('/').any(|p| p == ".." || p.is_empty()) {
        bail!("volume item path {path:?} is not allowed");
    }
    let file = dir.join(path);
    std::fs::create_dir_all(file.parent().expect("a parent"))?;
    std::fs::write(&file, data)?;
    let mode = match fs_group {
        Some(gid) => {
            std::os::unix::fs::chown(&file, Some(0), Some(gid))?;
            mode | ((mode & 0o700) >> 3) & 0o050
        }
        None => mode,
    };
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Items of a Secret or ConfigMap volume: the listed keys (or all), at their paths.
fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: u32,
    fs_group: Option<u32>,
    what: &str,
) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let bytes = data
                    .get(&item.key)
                    .with_context(|| format!("{what} has no key {:?}", item.key))?;
                let mode = item.mode.map(|m| m as u32).unwrap_or(default_mode);
                write_file(dir, &item.path, bytes, mode, fs_group)?;
            }
        }
        None => {
            for (key, bytes) in data {
                write_file(dir, key, bytes, default_mode, fs_group)?;
            }
        }
    }
    Ok(())
}

/// Materialises the pod's volumes under `dir/volumes` and resolves every container.
pub async fn prepare_pod(
    ctx: &PodCtx,
    pod: &Pod,
    ip: &str,
    netns: &Path,
    dir: &Path,
) -> Result<Vec<Prepared>> {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.namespace().unwrap_or_default();
    let fs_group = spec
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
        .map(|g| g as u32);
    let mut sources = Sources {
        ctx,
        namespace: namespace.clone(),
        secrets: HashMap::new(),
        config_maps: HashMap::new(),
    };
    let volumes = dir.join("volumes");
    let _ = std::fs::remove_dir_all(&volumes);
    std::fs::create_dir_all(&volumes)?;
    for volume in spec.volumes.iter().flatten() {
        let vdir = volumes.join(&volume.name);
        std::fs::create_dir_all(&vdir)?;
        let what = format!("volume {}", volume.name);
        if volume.empty_dir.is_some() {
            std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o777))?;
        } else if let Some(s) = &volume.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            match sources.secret(&name).await? {
                Some(data) => write_items(&vdir, data, s.items.as_ref(), mode, fs_group, &what)?,
                None if s.optional == Some(true) => {}
                None => bail!("{what}: secret {name:?} not found"),
            }
        } else if let Some(c) = &volume.config_map {
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            match sources.config_map(&c.name).await? {
                Some(data) => write_items(&vdir, data, c.items.as_ref(), mode, fs_group, &what)?,
                None if c.optional == Some(true) => {}
                None => bail!("{what}: configmap {:?} not found", c.name),
            }
        } else if let Some(p) = &volume.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            for source in p.sources.iter().flatten() {
                if let Some(t) = &source.service_account_token {
                    let sa = spec
                        .service_account_name
                        .clone()
                        .unwrap_or("default".into());
                    let mut request = json!({
                        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                        "spec": {
                            "expirationSeconds": t.expiration_seconds.unwrap_or(3600),
                            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                "name": pod.name_any(), "uid": pod.metadata.uid},
                        },
                    });
                    if let Some(audience) = t.audience.as_ref().filter(|a| !a.is_empty()) {
                        request["spec"]["audiences"] = json!([audience]);
                    }
                    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
                    let answer: Value = api
                        .create_subresource("token", &sa, &PostParams::default(), &request)
                        .await
                        .with_context(|| format!("{what}: token for serviceaccount {sa}"))?;
                    let token = answer["status"]["token"]
                        .as_str()
                        .context("no token issued")?;
                    write_file(&vdir, &t.path, token.as_bytes(), mode, fs_group)?;
                }
                if let Some(c) = &source.config_map {
                    match sources.config_map(&c.name).await? {
                        Some(data) => {
                            write_items(&vdir, data, c.items.as_ref(), mode, fs_group, &what)?
                        }
                        None if c.optional == Some(true) => {}
                        None => bail!("{what}: configmap {:?} not found", c.name),
                    }
                }
                if let Some(s) = &source.secret {
                    match sources.secret(&s.name).await? {
                        Some(data) => {
                            write_items(&vdir, data, s.items.as_ref(), mode, fs_group, &what)?
                        }
                        None if s.optional == Some(true) => {}
                        None => bail!("{what}: secret {:?} not found", s.name),
                    }
                }
                if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        let f = item
                            .field_ref
                            .as_ref()
                            .context("downwardAPI: only fieldRef items")?;
                        let value = field(pod, ctx, ip, &f.field_path)?;
                        let mode = item.mode.map(|m| m as u32).unwrap_or(mode);
                        write_file(&vdir, &item.path, value.as_bytes(), mode, fs_group)?;
                    }
                }
            }
        } else {
            bail!("{what}: only emptyDir, secret, configMap and projected volumes are supported");
        }
    }

    let mut prepared = Vec::new();
    for container in &spec.containers {
        let image = container.image.clone().unwrap_or_default();
        let binary = image_binary(&ctx.bin_dir, &image)?;
        let mut argv = match container.command.as_deref() {
            Some([first, rest @ ..]) => {
                let mut argv = vec![command_path(&binary, first)?];
                argv.extend(rest.iter().cloned());
                argv
            }
            _ => vec![binary.display().to_string()],
        };
        argv.extend(container.args.iter().flatten().cloned());

        // Image env, then envFrom, then env (later wins), as the kubelet composes them.
        let mut env: Vec<(String, String)> = IMAGE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        };
        set(&mut env, "HOSTNAME".into(), pod.name_any());
        set(
            &mut env,
            "KUBERNETES_SERVICE_HOST".into(),
            ctx.kubernetes_ip.clone(),
        );
        set(&mut env, "KUBERNETES_SERVICE_PORT".into(), "443".into());
        for from in container.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(c) = &from.config_map_ref {
                match sources.config_map(&c.name).await? {
                    Some(d) => d.clone(),
                    None if c.optional == Some(true) => BTreeMap::new(),
                    None => bail!("envFrom: configmap {:?} not found", c.name),
                }
            } else if let Some(s) = &from.secret_ref {
                match sources.secret(&s.name).await? {
                    Some(d) => d.clone(),
                    None if s.optional == Some(true) => BTreeMap::new(),
                    None => bail!("envFrom: secret {:?} not found", s.name),
                }
            } else {
                BTreeMap::new()
            };
            for (k, v) in data {
                set(&mut env, format!("{prefix}{k}"), text(&v, &k)?);
            }
        }
        for var in container.env.iter().flatten() {
            let value = match &var.value_from {
                None => var.value.clone().unwrap_or_default(),
                Some(from) => {
                    if let Some(r) = &from.secret_key_ref {
                        match sources.secret(&r.name).await?.and_then(|d| d.get(&r.key)) {
                            Some(v) => text(v, &var.name)?,
                            None if r.optional == Some(true) => continue,
                            None => bail!(
                                "env {}: secret {:?} key {:?} not found",
                                var.name,
                                r.name,
                                r.key
                            ),
                        }
                    } else if let Some(r) = &from.config_map_key_ref {
                        match sources
                            .config_map(&r.name)
                            .await?
                            .and_then(|d| d.get(&r.key))
                        {
                            Some(v) => text(v, &var.name)?,
                            None if r.optional == Some(true) => continue,
                            None => bail!(
                                "env {}: configmap {:?} key {:?} not found",
                                var.name,
                                r.name,
                                r.key
                            ),
                        }
                    } else if let Some(f) = &from.field_ref {
                        field(pod, ctx, ip, &f.field_path)?
                    } else {
                        bail!(
                            "env {}: only secretKeyRef, configMapKeyRef and fieldRef are supported",
                            var.name
                        )
                    }
                }
            };
            set(&mut env, var.name.clone(), value);
        }

        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let mut source = volumes.join(&m.name);
            if !source.exists() {
                bail!("volumeMount {}: no volume of that name", m.name);
            }
            if let Some(sub) = m.sub_path.as_ref().filter(|s| !s.is_empty()) {
                source = source.join(sub);
            }
            let target = m.mount_path.clone();
            let under_run = target.starts_with("/run/") || target.starts_with("/var/run/");
            if !under_run && !Path::new(&target).exists() {
                bail!(
                    "volumeMount {}: {target} does not exist on this host (only paths under /run are created)",
                    m.name
                );
            }
            mounts.push(Mount {
                source,
                target,
                read_only: m.read_only == Some(true),
            });
        }

        let pod_sc = spec.security_context.as_ref();
        let sc = container.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user));
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group));
        let mut groups: Vec<u32> = pod_sc
            .and_then(|s| s.supplemental_groups.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|g| g as u32)
            .collect();
        groups.extend(fs_group);
        let user = uid.map(|u| (u as u32, gid.unwrap_or(u) as u32, groups));

        prepared.push(Prepared {
            name: container.name.clone(),
            image,
            argv,
            env,
            mounts,
            user,
            read_only_root: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
            no_new_privs: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
            log: dir.join(format!("{}.log", container.name)),
            ip: ip.to_owned(),
            netns: netns.to_owned(),
            spec: container.clone(),
            restart_policy: spec.restart_policy.clone().unwrap_or("Always".into()),
            grace: Duration::from_secs(
                spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64
            ),
            bin_dir: ctx.bin_dir.clone(),
        });
    }
    Ok(prepared)
}

fn cstring(s: impl AsRef<std::ffi::OsStr>) -> std::io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| std::io::Error::other("NUL in path"))
}

fn check(result: libc::c_int, what: &'static str) -> std::io::Result<()> {
    if result == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // Only the errno crosses back to the parent: the failed step goes to the container's
    // log (stderr is already the log file here).
    // SAFETY: write(2) of a static string, async-signal-safe.
    unsafe {
        libc::write(
            2,
            b"mini-kubelet: container setup failed at: ".as_ptr().cast(),
            41,
        );
        libc::write(2, what.as_ptr().cast(), what.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
    Err(e)
}

/// Starts `argv` as this container: the pod's network namespace, its environment, its own
/// mount namespace with the volumes at their mountPaths (and a private /run), its user;
/// output to the log file.
fn spawn(p: &Prepared, argv: &[String]) -> std::io::Result<Child> {
    if p.mounts.len() > 64 {
        return Err(std::io::Error::other("more than 64 volume mounts"));
    }
    let mut mkdirs = Vec::new();
    let mut binds = Vec::new();
    for m in &p.mounts {
        let mut dir = PathBuf::new();
        for part in Path::new(&m.target).components() {
            dir.push(part);
            if dir.starts_with("/run") || dir.starts_with("/var/run") {
                mkdirs.push(cstring(&dir)?);
            }
        }
        binds.push((cstring(&m.source)?, cstring(&m.target)?, m.read_only));
    }
    // Opened here, joined in the child: the namespace file is under the node's /run, which
    // the child's own /run covers.
    let netns = std::fs::File::open(&p.netns)?;
    let netns_fd = std::os::fd::AsRawFd::as_raw_fd(&netns);
    let user = p.user.clone();
    let (read_only_root, no_new_privs) = (p.read_only_root, p.no_new_privs);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)?;
    // The binary is opened before the child's mounts and executed through its descriptor:
    // a workspace under /tmp is covered once a pod's emptyDir is mounted at /tmp.
    let program = std::fs::File::open(&argv[0])?;
    let mut command = Command::new(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&program)
    ));
    command
        .arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(p.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    let root = cstring("/")?;
    let run = cstring("/run")?;
    let tmpfs = cstring("tmpfs")?;
    let tmpfs_options = cstring("mode=0755")?;
    // SAFETY: between fork and exec only async-signal-safe system calls run, on values
    // allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let null = std::ptr::null::<libc::c_char>();
            check(
                libc::setns(netns_fd, libc::CLONE_NEWNET),
                "joining the pod's network namespace",
            )?;
            check(libc::unshare(libc::CLONE_NEWNS), "unshare")?;
            check(
                libc::mount(
                    null,
                    root.as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "mount --make-rprivate /",
            )?;
            check(
                libc::mount(
                    tmpfs.as_ptr(),
                    run.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    tmpfs_options.as_ptr().cast(),
                ),
                "mount tmpfs /run",
            )?;
            for dir in &mkdirs {
                libc::mkdir(dir.as_ptr(), 0o755);
            }
            // Every source is opened before the first bind: a source under a path that a
            // mount covers (the pod's directory under /tmp, once /tmp is its emptyDir)
            // stays reachable through its descriptor. Opened here, in the new mount
            // namespace: a descriptor from the parent's could not be bind-mounted.
            let mut fds = [-1; 64];
            for (fd, (source, _, _)) in fds.iter_mut().zip(&binds) {
                *fd = libc::open(source.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                if *fd < 0 {
                    check(-1, "opening a volume")?;
                }
            }
            let mut path = [0u8; 32];
            for (fd, (_, target, read_only)) in fds.iter().zip(&binds) {
                check(
                    libc::mount(
                        fd_path(*fd, &mut path),
                        target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ),
                    "bind mount",
                )?;
                if *read_only {
                    check(
                        libc::mount(
                            null,
                            target.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                            std::ptr::null(),
                        ),
                        "read-only remount",
                    )?;
                }
            }
            if read_only_root {
                check(
                    libc::mount(
                        null,
                        root.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ),
                    "read-only root",
                )?;
            }
            check(libc::chdir(root.as_ptr()), "chdir /")?;
            if no_new_privs {
                check(
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                    "no_new_privs",
                )?;
            }
            if let Some((uid, gid, groups)) = &user {
                check(libc::setgroups(groups.len(), groups.as_ptr()), "setgroups")?;
                check(libc::setgid(*gid), "setgid")?;
                check(libc::setuid(*uid), "setuid")?;
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop((netns, program));
    child
}

/// `/proc/self/fd/N` without allocating (between fork and exec).
fn fd_path(fd: libc::c_int, buffer: &mut [u8; 32]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buffer[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (fd.unsigned_abs(), 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buffer[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buffer[PREFIX.len() + len] = 0;
    buffer.as_ptr().cast()
}

fn signal(pid: Option<u32>, signal: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the child's own pid; it is reaped only by our wait().
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Startup,
    Readiness,
    Liveness,
}

#[derive(Debug)]
enum ProbeEvent {
    Started,
    Ready(bool),
    Failed(Kind),
}

fn port_of(p: &Prepared, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => p
            .spec
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// One probe attempt: httpGet (2xx/3xx), tcpSocket (connects) or exec (exit 0).
async fn probe_once(
    p: &Prepared,
    probe: &Probe,
    http: &reqwest::Client,
    timeout: Duration,
) -> bool {
    if let Some(h) = &probe.http_get {
        if h.scheme.as_deref().unwrap_or("HTTP") != "HTTP" {
            return false;
        }
        let Some(port) = port_of(p, &h.port) else {
            return false;
        };
        let host = h.host.clone().unwrap_or_else(|| p.ip.clone());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let mut request = http
            .get(format!("http://{host}:{port}{path}"))
            .timeout(timeout)
            .header("user-agent", "kube-probe/1.36");
        for header in h.http_headers.iter().flatten() {
            request = request.header(&header.name, &header.value);
        }
        return matches!(request.send().await, Ok(r) if r.status().is_success() || r.status().is_redirection());
    }
    if let Some(t) = &probe.tcp_socket {
        let Some(port) = port_of(p, &t.port) else {
            return false;
        };
        let host = t.host.clone().unwrap_or_else(|| p.ip.clone());
        return matches!(
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port))
            )
            .await,
            Ok(Ok(_))
        );
    }
    if let Some(e) = &probe.exec {
        return run_exec(p, e.command.as_deref().unwrap_or_default(), timeout).await;
    }
    false
}

async fn run_exec(p: &Prepared, command: &[String], timeout: Duration) -> bool {
    let Some((first, rest)) = command.split_first() else {
        return false;
    };
    let Ok(binary) = image_binary(&p.bin_dir, &p.image) else {
        return false;
    };
    let Ok(path) = command_path(&binary, first) else {
        log!("container {}: exec {first:?}: not in the image", p.name);
        return false;
    };
    let argv: Vec<String> = std::iter::once(path).chain(rest.iter().cloned()).collect();
    let Ok(mut child) = spawn(p, &argv) else {
        return false;
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            false
        }
    }
}

/// The kubelet's probe worker: first attempt after initialDelaySeconds, then one every
/// periodSeconds; a result counts once successThreshold / failureThreshold consecutive
/// attempts agree. Readiness and liveness skip their attempts until the startup probe
/// has succeeded.
async fn probe_loop(
    p: Arc<Prepared>,
    kind: Kind,
    probe: Probe,
    started: watch::Receiver<bool>,
    events: mpsc::Sender<ProbeEvent>,
) {
    let secs = |v: Option<i32>, default: i32, min: i32| {
        Duration::from_secs(v.unwrap_or(default).max(min) as u64)
    };
    let initial = secs(probe.initial_delay_seconds, 0, 0);
    let period = secs(probe.period_seconds, 10, 1);
    let timeout = secs(probe.timeout_seconds, 1, 1);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
        .expect("an HTTP client");
    tokio::time::sleep(initial).await;
    let mut tick = tokio::time::interval(period);
    let (mut successes, mut failures) = (0, 0);
    let mut ready: Option<bool> = None;
    loop {
        tick.tick().await;
        if kind != Kind::Startup && !*started.borrow() {
            continue;
        }
        if probe_once(&p, &probe, &http, timeout).await {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let event = match kind {
            Kind::Startup if successes >= 1 => Some(ProbeEvent::Started),
            Kind::Readiness if successes >= success_threshold && ready != Some(true) => {
                ready = Some(true);
                Some(ProbeEvent::Ready(true))
            }
            Kind::Readiness if failures >= failure_threshold && ready != Some(false) => {
                ready = Some(false);
                Some(ProbeEvent::Ready(false))
            }
            Kind::Startup | Kind::Liveness if failures >= failure_threshold => {
                Some(ProbeEvent::Failed(kind))
            }
            _ => None,
        };
        if let Some(event) = event {
            let last = matches!(event, ProbeEvent::Started | ProbeEvent::Failed(_));
            if events.send(event).await.is_err() || last {
                return;
            }
        }
    }
}

/// preStop (sleep, exec or httpGet), SIGTERM, then SIGKILL at the deadline. The preStop
/// hook's time counts against the grace period, as in the kubelet.
async fn terminate(p: Arc<Prepared>, pid: Option<u32>, deadline: Instant) {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    if let Some(hook) = p.spec.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) {
        run_hook(&p, hook, remaining()).await;
    }
    signal(pid, libc::SIGTERM);
    // A preStop hook that used up the grace period still leaves SIGTERM 2 s.
    let wait = remaining().max(if remaining().is_zero() {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    });
    tokio::time::sleep(wait).await;
    log!("container {}: grace period over, SIGKILL", p.name);
    signal(pid, libc::SIGKILL);
}

async fn run_hook(p: &Prepared, hook: &LifecycleHandler, limit: Duration) {
    if let Some(s) = &hook.sleep {
        tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(limit)).await;
    } else if let Some(e) = &hook.exec {
        if !run_exec(p, e.command.as_deref().unwrap_or_default(), limit).await {
            log!("container {}: preStop exec failed", p.name);
        }
    } else if let Some(h) = &hook.http_get {
        let probe = Probe {
            http_get: Some(h.clone()),
            ..Probe::default()
        };
        let http = reqwest::Client::new();
        probe_once(p, &probe, &http, limit.max(Duration::from_millis(1))).await;
    }
}

/// Runs one container until the pod stops it (or, without restartPolicy Always, until
/// it exits). Returns the last exit code.
pub async fn run(
    pod: String,
    index: usize,
    p: Prepared,
    reports: mpsc::Sender<Report>,
    mut stop: watch::Receiver<Option<Stop>>,
) -> Option<i32> {
    let p = Arc::new(p);
    let mut report = Report::waiting(&p.name, &p.image, "ContainerCreating", "");
    report.index = index;
    let mut backoff = Duration::ZERO;
    loop {
        if stop.borrow().is_some() {
            return None;
        }
        let mut child = match spawn(&p, &p.argv) {
            Ok(child) => child,
            Err(e) => {
                log!("pod {pod}: container {}: {e}", p.name);
                report.state = State::Waiting {
                    reason: "RunContainerError".into(),
                    message: e.to_string(),
                };
                let _ = reports.send(report.clone()).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => continue,
                    _ = stop.changed() => return None,
                }
            }
        };
        let pid = child.id();
        let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let ran_from = Instant::now();
        log!(
            "pod {pod}: container {} started (pid {}, {})",
            p.name,
            pid.unwrap_or(0),
            p.ip
        );
        let has_startup = p.spec.startup_probe.is_some();
        let has_readiness = p.spec.readiness_probe.is_some();
        report.state = State::Running {
            since: since.clone(),
        };
        report.started = !has_startup;
        report.ready = !has_startup && !has_readiness;
        report.pid = pid;
        let _ = reports.send(report.clone()).await;

        let (started_tx, started_rx) = watch::channel(!has_startup);
        let (events_tx, mut events) = mpsc::channel(8);
        let mut probes = Vec::new();
        for (kind, probe) in [
            (Kind::Startup, &p.spec.startup_probe),
            (Kind::Readiness, &p.spec.readiness_probe),
            (Kind::Liveness, &p.spec.liveness_probe),
        ] {
            if let Some(probe) = probe.clone() {
                probes.push(tokio::spawn(probe_loop(
                    p.clone(),
                    kind,
                    probe,
                    started_rx.clone(),
                    events_tx.clone(),
                )));
            }
        }
        drop(events_tx);

        let mut stopping: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
            None;
        let mut by_pod = false;
        let code = loop {
            tokio::select! {
                status = child.wait() => {
                    use std::os::unix::process::ExitStatusExt;
                    break status.map(|s| s.code().unwrap_or(128 + s.signal().unwrap_or(0))).unwrap_or(-1);
                }
                Some(event) = events.recv() => match event {
                    ProbeEvent::Started => {
                        started_tx.send_replace(true);
                        report.started = true;
                        report.ready = !has_readiness;
                        let _ = reports.send(report.clone()).await;
                    }
                    ProbeEvent::Ready(ready) => {
                        if report.ready != ready {
                            log!("pod {pod}: container {} ready={ready}", p.name);
                        }
                        report.ready = ready;
                        let _ = reports.send(report.clone()).await;
                    }
                    ProbeEvent::Failed(kind) => {
                        log!("pod {pod}: container {}: {kind:?} probe failed, restarting", p.name);
                        if stopping.is_none() {
                            stopping = Some(Box::pin(terminate(p.clone(), pid, Instant::now() + p.grace)));
                        }
                    }
                },
                changed = stop.changed(), if !by_pod => {
                    by_pod = true;
                    let deadline = match (changed, *stop.borrow()) {
                        (Ok(()), Some(s)) => s.deadline,
                        _ => Instant::now(),
                    };
                    stopping = Some(Box::pin(terminate(p.clone(), pid, deadline)));
                }
                () = async { stopping.as_mut().expect("guarded").await }, if stopping.is_some() => {
                    stopping = Some(Box::pin(std::future::pending()));
                }
            }
        };
        for probe in probes {
            probe.abort();
        }
        let finished = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        log!("pod {pod}: container {} exited with {code}", p.name);
        let reason = if code == 0 { "Completed" } else { "Error" };
        let terminated = State::Terminated {
            code,
            reason: reason.into(),
            started: since,
            finished,
        };
        report.ready = false;
        report.started = false;
        let restart = !by_pod
            && match p.restart_policy.as_str() {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
        if !restart {
            report.state = terminated;
            let _ = reports.send(report.clone()).await;
            return Some(code);
        }
        report.last = Some(terminated);
        report.restarts += 1;
        // CrashLoopBackOff: the first restart at once, then 10 s doubling to 5 min; a
        // container that ran 10 minutes starts over.
        if ran_from.elapsed() > Duration::from_secs(600) {
            backoff = Duration::ZERO;
        }
        report.state = State::Waiting {
            reason: if backoff.is_zero() {
                "ContainerCreating".into()
            } else {
                "CrashLoopBackOff".into()
            },
            message: String::new(),
        };
        let _ = reports.send(report.clone()).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return Some(code),
        }
        backoff = if backoff.is_zero() {
            Duration::from_secs(10)
        } else {
            (backoff * 2).min(Duration::from_secs(300))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_the_workspace_binaries() {
        let bin = Path::new("/target/debug");
        for image in [
            "shop-order:0.1.0",
            "ghcr.io/acme/shop-order:1.2@sha256:abc",
            "registry.local:5000/shop-order",
        ] {
            assert_eq!(
                image_binary(bin, image).unwrap(),
                bin.join("order"),
                "{image}"
            );
        }
        assert!(image_binary(bin, "postgres:17").is_err());
        assert!(image_binary(bin, "shop-payments:1").is_err());
    }

    #[test]
    fn only_the_image_entrypoint_exists_in_the_image() {
        let binary = Path::new("/target/debug/gateway");
        assert_eq!(
            command_path(binary, "/usr/local/bin/service").unwrap(),
            "/target/debug/gateway"
        );
        assert!(command_path(binary, "/bin/sh").is_err());
    }

    #[test]
    fn fd_paths_are_formatted_without_allocating() {
        let mut buffer = [0u8; 32];
        for fd in [0, 7, 10, 123, 65535] {
            let path = fd_path(fd, &mut buffer);
            // SAFETY: fd_path NUL-terminates inside the buffer.
            let text = unsafe { std::ffi::CStr::from_ptr(path) };
            assert_eq!(text.to_str().unwrap(), format!("/proc/self/fd/{fd}"));
        }
    }

    #[test]
    fn volume_files_get_their_mode_and_group_read_for_fs_group() {
        let dir = std::env::temp_dir().join(format!("mini-kubelet-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_file(&dir, "a/key.pem", b"secret", 0o400, None).unwrap();
        let mode = std::fs::metadata(dir.join("a/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        if unsafe { libc::geteuid() } == 0 {
            write_file(&dir, "grouped", b"secret", 0o400, Some(65532)).unwrap();
            let meta = std::fs::metadata(dir.join("grouped")).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o440);
            assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65532);
        }
        assert!(write_file(&dir, "../escape", b"x", 0o400, None).is_err());
        assert!(write_file(&dir, "a//b", b"x", 0o400, None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_reports_follow_the_container_state() {
        let mut report = Report::waiting("web", "shop-web:1", "ContainerCreating", "");
        assert!(!report.running());
        assert_eq!(
            report.json()["state"]["waiting"]["reason"],
            "ContainerCreating"
        );
        report.state = State::Running {
            since: "2026-01-01T00:00:00Z".into(),
        };
        report.last = Some(State::Terminated {
            code: 137,
            reason: "Error".into(),
            started: "a".into(),
            finished: "b".into(),
        });
        report.restarts = 1;
        let json = report.json();
        assert!(report.running());
        assert_eq!(json["restartCount"], 1);
        assert_eq!(json["lastState"]["terminated"]["exitCode"], 137);
        assert_eq!(
            json["state"]["running"]["startedAt"],
            "2026-01-01T00:00:00Z"
        );
    }
}

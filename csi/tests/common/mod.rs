//! Test doubles shared by the component tests: a node agent that attaches each volume
//! as a loop device over a sparse file (so stage really formats and mounts), and
//! in-process CSI servers on unix sockets. Everything made is undone on drop, in the
//! order the kernel requires: unmount, then detach loop devices, then remove files.

#![allow(dead_code)]

pub mod operator;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use csi::agent_proto::node_agent_server::{NodeAgent, NodeAgentServer};
use csi::agent_proto::*;
use csi::names::volume_name_for;
use testkit::Wait;
use tokio::sync::{Notify, oneshot};
use tonic::{Request, Response, Status};

/// One attached volume.
#[derive(Debug, Clone)]
pub struct Attached {
    pub file: PathBuf,
    pub device: String,
}

/// A node agent whose volumes are sparse files behind loop devices.
#[derive(Debug)]
pub struct LoopAgent {
    dir: PathBuf,
    initial_size_bytes: u64,
    attached: Mutex<HashMap<String, Attached>>,
    /// Sizes of volumes that should not get `initial_size_bytes`.
    sizes: Mutex<HashMap<String, u64>>,
    /// When set, Attach waits for this before doing anything (to hold a call in flight).
    pub attach_gate: Mutex<Option<Arc<Notify>>>,
    /// Signalled when an Attach call enters (so a test knows it is in flight).
    pub attach_entered: Notify,
}

fn losetup(args: &[&str]) -> Result<String, Status> {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .map_err(|e| Status::internal(format!("losetup: {e}")))?;
    if !out.status.success() {
        return Err(Status::internal(format!(
            "losetup {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl LoopAgent {
    pub fn new(dir: &Path, initial_size_bytes: u64) -> Self {
        LoopAgent {
            dir: dir.to_path_buf(),
            initial_size_bytes,
            attached: Mutex::new(HashMap::new()),
            sizes: Mutex::new(HashMap::new()),
            attach_gate: Mutex::new(None),
            attach_entered: Notify::new(),
        }
    }

    /// The backing file of a volume (exists once it was first attached).
    pub fn backing_file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{}.img", volume_name_for(volume_id)))
    }

    /// Gives `volume_id` its own size when it is first attached.
    pub fn set_size(&self, volume_id: &str, size_bytes: u64) {
        self.sizes
            .lock()
            .unwrap()
            .insert(volume_id.to_string(), size_bytes);
    }

    pub fn attached(&self, volume_id: &str) -> Option<Attached> {
        self.attached.lock().unwrap().get(volume_id).cloned()
    }

    pub fn attached_count(&self) -> usize {
        self.attached.lock().unwrap().len()
    }

    /// Detaches every loop device this agent made.
    pub fn detach_all(&self) {
        let all: Vec<Attached> = self
            .attached
            .lock()
            .unwrap()
            .drain()
            .map(|(_, a)| a)
            .collect();
        for a in all {
            let _ = losetup(&["-d", &a.device]);
        }
    }
}

impl Drop for LoopAgent {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The agent as a gRPC service (a local type, so the foreign trait can be implemented).
/// With `volumes` set, a volume's backing file gets the size of its BlockVolume, as a
/// real agent's replica would.
pub struct AgentService {
    agent: Arc<LoopAgent>,
    volumes: Option<kube::Api<api::BlockVolume>>,
}

impl std::ops::Deref for AgentService {
    type Target = LoopAgent;
    fn deref(&self) -> &LoopAgent {
        &self.agent
    }
}

#[tonic::async_trait]
impl NodeAgent for AgentService {
    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let req = request.into_inner();
        self.attach_entered.notify_one();
        let gate = self.attach_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.notified().await;
        }
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if let Some(volumes) = &self.volumes {
            let bv = volumes
                .get_opt(&req.volume_id)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?
                .ok_or_else(|| Status::not_found(format!("no volume {}", req.volume_id)))?;
            let size = bv
                .spec
                .size_bytes()
                .map_err(|e| Status::internal(e.to_string()))?;
            self.set_size(&req.volume_id, size);
        }
        if let Some(a) = self.attached(&req.volume_id) {
            let size = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
            return Ok(Response::new(AttachResponse {
                device_path: a.device,
                size_bytes: size,
            }));
        }
        let file = self.backing_file(&req.volume_id);
        if !file.exists() {
            let f = std::fs::File::create(&file).map_err(|e| Status::internal(e.to_string()))?;
            let size = self
                .sizes
                .lock()
                .unwrap()
                .get(&req.volume_id)
                .copied()
                .unwrap_or(self.initial_size_bytes);
            f.set_len(size)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let file_str = file.to_string_lossy().to_string();
        let mut args = vec!["--find", "--show"];
        if req.readonly {
            args.push("--read-only");
        }
        args.push(&file_str);
        let device = losetup(&args)?;
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        self.attached.lock().unwrap().insert(
            req.volume_id.clone(),
            Attached {
                file,
                device: device.clone(),
            },
        );
        Ok(Response::new(AttachResponse {
            device_path: device,
            size_bytes: size,
        }))
    }

    async fn detach(
        &self,
        request: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let req = request.into_inner();
        let removed = self.attached.lock().unwrap().remove(&req.volume_id);
        if let Some(a) = removed {
            losetup(&["-d", &a.device])?;
        }
        Ok(Response::new(DetachResponse {}))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(match self.attached(&req.volume_id) {
            Some(a) => StatsResponse {
                attached: true,
                size_bytes: std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0),
                device_path: a.device,
                healthy: true,
                message: String::new(),
            },
            None => StatsResponse {
                attached: false,
                ..Default::default()
            },
        }))
    }

    async fn expand(
        &self,
        request: Request<ExpandRequest>,
    ) -> Result<Response<ExpandResponse>, Status> {
        let req = request.into_inner();
        let a = self
            .attached(&req.volume_id)
            .ok_or_else(|| Status::failed_precondition("not attached"))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&a.file)
            .map_err(|e| Status::internal(e.to_string()))?;
        let current = f
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if req.size_bytes > current {
            f.set_len(req.size_bytes)
                .map_err(|e| Status::internal(e.to_string()))?;
            losetup(&["-c", &a.device])?;
        }
        Ok(Response::new(ExpandResponse {
            size_bytes: req.size_bytes.max(current),
        }))
    }
}

/// A gRPC server running in the test's runtime until dropped.
pub struct Served {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves the agent on a unix socket.
pub fn serve_agent(agent: Arc<LoopAgent>, socket: &Path) -> Served {
    serve_agent_for(agent, None, socket)
}

/// Serves the agent on a unix socket, sizing volumes from their BlockVolumes.
pub fn serve_agent_for(
    agent: Arc<LoopAgent>,
    volumes: Option<kube::Api<api::BlockVolume>>,
    socket: &Path,
) -> Served {
    let incoming = csi::server::listen_unix(socket).expect("agent socket");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(NodeAgentServer::new(AgentService { agent, volumes }))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    Served {
        stop: Some(stop),
        task: Some(task),
    }
}

/// Serves CSI services on a unix socket.
pub fn serve_csi(services: csi::server::Services, socket: &Path) -> Served {
    let endpoint = csi::server::Endpoint::Unix(socket.to_path_buf());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = csi::server::serve(&endpoint, services, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(e) = r {
            eprintln!("CSI server stopped: {e}");
        }
    });
    Served {
        stop: Some(stop),
        task: Some(task),
    }
}

/// The ready Identity service and the Controller service on the API server of `client`
/// with `settings`, plus `node` when the test serves one: what mode `all` (with a node)
/// or `controller` (without) serves.
pub fn controller_services(
    client: &kube::Client,
    settings: csi::controller::ControllerSettings,
    node: Option<csi::node::NodeService>,
) -> csi::server::Services {
    csi::server::Services {
        identity: csi::identity::IdentityService::new(true),
        controller: Some(csi::controller::ControllerService::new(
            client.clone(),
            settings,
        )),
        node,
    }
}

/// Waits (bounded) until a unix socket accepts connections.
pub async fn wait_for_socket(path: &Path) {
    if let Err(e) = Wait::millis(10_000, 10).socket(path).await {
        panic!("{e}");
    }
}

/// Unmounts everything mounted under `dir`, deepest first (lazily if busy).
pub fn unmount_all_under(dir: &Path) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut targets: Vec<String> = csi::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let ok = Command::new("umount").arg(&t).status().map(|s| s.success());
        if !matches!(ok, Ok(true)) {
            let _ = Command::new("umount").arg("-l").arg(&t).status();
        }
    }
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    csi::mount::mount_at(path).expect("mountinfo").is_some()
}

//! Registration of the CSI node plugin with the kubelet, without the
//! node-driver-registrar sidecar: the kubelet's plugin watcher finds a unix socket under
//! `<kubelet-dir>/plugins_registry/`, calls `GetInfo` on the `pluginregistration`
//! service there (type `CSIPlugin`, the driver name, the CSI endpoint as the kubelet sees
//! it, the supported versions), validates it, calls the CSI endpoint's `NodeGetInfo`,
//! and reports the outcome with `NotifyRegistrationStatus`.
//!
//! The kubelet's registration client (v1.34) dials the socket path as its gRPC target,
//! so every request carries the path as `:authority`, which the HTTP/2 server under
//! tonic rejects as malformed (`RST_STREAM PROTOCOL_ERROR`). This socket is therefore
//! served by a minimal HTTP/2 responder of its own ([`serve_connection`]) that never
//! interprets request headers: it answers each request stream once its body is complete,
//! telling the two calls apart by the body (`InfoRequest` is empty; a
//! `RegistrationStatus` the kubelet sends is not). Malformed input ends the connection;
//! nothing from the socket can panic the plugin.
//!
//! The registration socket lives as long as [`serve`] runs; when it returns the socket
//! file is removed, which is how the kubelet learns the plugin went away. A stale socket
//! left by a crashed predecessor is replaced (as for the CSI socket); any other file at
//! that path is refused. The last status the kubelet reported is kept in
//! [`RegistrationState`] for logs and tests.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::error::{Error, Result};
use crate::registration_proto::{PluginInfo, RegistrationStatus, RegistrationStatusResponse};
use crate::server::listen_unix;

/// The plugin type the kubelet's CSI plugin handler accepts.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// CSI spec versions the kubelet may speak to this plugin.
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];
/// A connection idle this long is closed (the kubelet dials anew for each attempt).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The registration socket's file name for driver `name` (the registrar's convention).
pub fn socket_name(driver: &str) -> String {
    format!("{driver}-reg.sock")
}

/// What the kubelet said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RegistrationState {
    /// No `NotifyRegistrationStatus` yet.
    #[default]
    Pending,
    Registered,
    /// The kubelet refused the plugin, with its reason.
    Failed(String),
}

/// The `pluginregistration.Registration` service of one CSI driver.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    driver: String,
    csi_endpoint: PathBuf,
    state: Arc<Mutex<RegistrationState>>,
}

impl RegistrationService {
    /// `csi_endpoint` is the CSI socket's path on the node, as the kubelet opens it.
    pub fn new(driver: impl Into<String>, csi_endpoint: impl Into<PathBuf>) -> Self {
        RegistrationService {
            driver: driver.into(),
            csi_endpoint: csi_endpoint.into(),
            state: Arc::default(),
        }
    }

    /// What `GetInfo` answers.
    pub fn info(&self) -> PluginInfo {
        PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_owned(),
            name: self.driver.clone(),
            endpoint: self.csi_endpoint.display().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }
    }

    /// Records a status the kubelet sent.
    fn record(&self, status: RegistrationStatus) {
        let next = if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
            RegistrationState::Registered
        } else {
            tracing::error!(driver = %self.driver, error = %status.error, "the kubelet refused the registration");
            RegistrationState::Failed(status.error)
        };
        match self.state.lock() {
            Ok(mut s) => *s = next,
            Err(p) => *p.into_inner() = next,
        }
    }

    /// The response message (protobuf bytes) to one request body (a gRPC message).
    fn answer(&self, message: &[u8]) -> Vec<u8> {
        if message.is_empty() {
            return self.info().encode_to_vec();
        }
        match RegistrationStatus::decode(message) {
            Ok(status) => self.record(status),
            Err(e) => tracing::warn!(error = %e, "undecodable registration status"),
        }
        RegistrationStatusResponse {}.encode_to_vec()
    }

    /// The last status the kubelet reported.
    pub fn state(&self) -> RegistrationState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
/// The largest frame payload a peer may send without our consent (RFC 9113 default).
const MAX_FRAME: usize = 16_384;
/// Request bodies here are a few bytes; more than this is not a registration client.
const MAX_BODY: usize = 64 * 1024;
/// Streams open at once on one connection before it is closed as misbehaving.
const MAX_STREAMS: usize = 64;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK "literal header field without indexing, new name" (no Huffman coding).
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0x00);
    for s in [name, value] {
        // Names and values here are short constants (< 127 bytes): a 7-bit length.
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    }
}

/// The frames answering one unary call with `message`.
fn response(stream: u32, message: &[u8]) -> Vec<u8> {
    // :status 200 is entry 8 of the HPACK static table.
    let mut headers = vec![0x88];
    literal(&mut headers, "content-type", "application/grpc");
    let mut data = Vec::with_capacity(5 + message.len());
    data.push(0);
    data.extend_from_slice(&(message.len() as u32).to_be_bytes());
    data.extend_from_slice(message);
    let mut trailers = Vec::new();
    literal(&mut trailers, "grpc-status", "0");
    let mut out = frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, &headers);
    out.extend(frame(FRAME_DATA, 0, stream, &data));
    out.extend(frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS | FLAG_END_STREAM,
        stream,
        &trailers,
    ));
    out
}

/// The protobuf message inside a complete gRPC request body, or why there is none.
fn grpc_message(body: &[u8]) -> std::result::Result<&[u8], String> {
    if body.is_empty() {
        return Ok(body);
    }
    let Some((head, rest)) = body.split_at_checked(5) else {
        return Err(format!("a {}-byte gRPC body", body.len()));
    };
    if head[0] != 0 {
        return Err("a compressed gRPC message".into());
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    rest.get(..len)
        .filter(|_| rest.len() == len)
        .ok_or_else(|| format!("a gRPC message of {len} bytes in {} bytes", rest.len()))
}

/// Serves one HTTP/2 connection until the peer closes it, sends GOAWAY, breaks the
/// protocol, or stays idle for [`IDLE_TIMEOUT`].
pub async fn serve_connection<S>(mut io: S, service: &RegistrationService) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let broken = |what: String| Error::InvalidArgument(format!("registration connection: {what}"));
    let mut preface = [0u8; 24];
    read_exact(&mut io, &mut preface).await?;
    if preface != PREFACE {
        return Err(broken("no HTTP/2 preface".into()));
    }
    write(&mut io, &frame(FRAME_SETTINGS, 0, 0, &[])).await?;
    let mut bodies: HashMap<u32, Vec<u8>> = HashMap::new();
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout(IDLE_TIMEOUT, io.read_exact(&mut head)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(Error::io("reading a registration request", e)),
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(broken(format!("a {len}-byte frame")));
        }
        let mut payload = vec![0u8; len];
        read_exact(&mut io, &mut payload).await?;
        let mut end_stream = false;
        match kind {
            FRAME_SETTINGS if flags & FLAG_ACK == 0 => {
                write(&mut io, &frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])).await?;
            }
            FRAME_PING if flags & FLAG_ACK == 0 => {
                write(&mut io, &frame(FRAME_PING, FLAG_ACK, 0, &payload)).await?;
            }
            FRAME_GOAWAY => return Ok(()),
            FRAME_RST_STREAM => {
                bodies.remove(&stream);
            }
            FRAME_HEADERS if stream != 0 => {
                // The request's headers (path, authority, ...) are not needed: the body
                // tells the calls apart. A HEADERS frame after the body would be
                // trailers, which a unary call does not send.
                if bodies.len() >= MAX_STREAMS && !bodies.contains_key(&stream) {
                    return Err(broken("too many open streams".into()));
                }
                bodies.entry(stream).or_default();
                end_stream = flags & FLAG_END_STREAM != 0;
            }
            FRAME_DATA if stream != 0 => {
                let data = if flags & FLAG_PADDED != 0 {
                    let pad = *payload.first().ok_or_else(|| broken("padding".into()))? as usize;
                    payload
                        .get(1..payload.len().saturating_sub(pad))
                        .filter(|_| pad < payload.len())
                        .ok_or_else(|| broken("padding longer than the frame".into()))?
                } else {
                    &payload[..]
                };
                let body = bodies.entry(stream).or_default();
                if body.len() + data.len() > MAX_BODY {
                    return Err(broken("a request body over 64 KiB".into()));
                }
                body.extend_from_slice(data);
                end_stream = flags & FLAG_END_STREAM != 0;
            }
            // WINDOW_UPDATE, PRIORITY, CONTINUATION, acknowledgements: nothing to do
            // (requests and answers are far below every flow-control window).
            _ => {}
        }
        if end_stream {
            let body = bodies.remove(&stream).unwrap_or_default();
            let message = grpc_message(&body).map_err(broken)?;
            write(&mut io, &response(stream, &service.answer(message))).await?;
        }
    }
}

async fn read_exact<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8]) -> Result<()> {
    match tokio::time::timeout(IDLE_TIMEOUT, io.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Error::io("reading a registration request", e)),
        Err(_) => Err(Error::Unavailable("registration connection idle".into())),
    }
}

async fn write<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> Result<()> {
    io.write_all(bytes)
        .await
        .map_err(|e| Error::io("answering a registration request", e))
}

/// Serves `service` on `socket` until `shutdown` completes, then removes the socket so
/// the kubelet deregisters the plugin.
pub async fn serve(
    socket: &Path,
    service: RegistrationService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let mut incoming = listen_unix(socket)?;
    tracing::info!(socket = %socket.display(), "serving kubelet plugin registration");
    let service = Arc::new(service);
    tokio::pin!(shutdown);
    let served = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            next = incoming.next() => match next {
                Some(Ok(conn)) => {
                    let service = service.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(conn, &service).await {
                            tracing::warn!(error = %e, "registration connection ended");
                        }
                    });
                }
                Some(Err(e)) => tracing::warn!(error = %e, "accepting a registration connection"),
                None => break Err(Error::Unavailable("registration listener closed".into())),
            },
        }
    };
    if let Err(e) = std::fs::remove_file(socket)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %socket.display(), error = %e, "cannot remove the registration socket");
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames of one unary call as the kubelet's client sends them: its HEADERS carry
    /// the socket path as `:authority` (HPACK literals, no Huffman coding).
    fn kubelet_call(stream: u32, path: &str, message: &[u8]) -> Vec<u8> {
        let mut headers = Vec::new();
        literal(&mut headers, ":method", "POST");
        literal(&mut headers, ":scheme", "http");
        literal(&mut headers, ":path", path);
        literal(
            &mut headers,
            ":authority",
            "/var/lib/kubelet/plugins_registry/csi.blockvol.io-reg.sock",
        );
        literal(&mut headers, "content-type", "application/grpc");
        let mut data = vec![0];
        data.extend_from_slice(&(message.len() as u32).to_be_bytes());
        data.extend_from_slice(message);
        let mut out = frame(FRAME_HEADERS, FLAG_END_HEADERS, stream, &headers);
        out.extend(frame(FRAME_DATA, FLAG_END_STREAM, stream, &data));
        out
    }

    /// Splits `bytes` into (type, flags, stream, payload) frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    async fn exchange(input: Vec<u8>) -> (Result<()>, Vec<u8>, RegistrationService) {
        let service = RegistrationService::new("csi.blockvol.io", "/k/plugins/csi.sock");
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let served = serve_connection(server, &service).await;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (served, out, service)
    }

    #[tokio::test]
    async fn answers_the_kubelets_calls_despite_its_socket_path_authority() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        input.extend(kubelet_call(
            1,
            "/pluginregistration.Registration/GetInfo",
            &[],
        ));
        let status = RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        };
        input.extend(kubelet_call(
            3,
            "/pluginregistration.Registration/NotifyRegistrationStatus",
            &status.encode_to_vec(),
        ));
        let (served, out, service) = exchange(input).await;
        served.expect("a clean end at EOF");
        let frames = frames(&out);
        assert_eq!(frames[0].0, FRAME_SETTINGS, "the server preface first");
        assert!(
            frames
                .iter()
                .any(|f| f.0 == FRAME_SETTINGS && f.1 == FLAG_ACK),
            "the client's SETTINGS acknowledged"
        );
        let data: Vec<&Vec<u8>> = frames
            .iter()
            .filter(|f| f.0 == FRAME_DATA && f.2 == 1)
            .map(|f| &f.3)
            .collect();
        assert_eq!(data.len(), 1);
        let info = PluginInfo::decode(&data[0][5..]).expect("a PluginInfo");
        assert_eq!(info, service.info());
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.endpoint, "/k/plugins/csi.sock");
        assert_eq!(info.supported_versions, vec!["1.0.0".to_string()]);
        // Each stream ends with trailers carrying grpc-status 0.
        for stream in [1, 3] {
            assert!(frames.iter().any(|f| f.0 == FRAME_HEADERS
                && f.2 == stream
                && f.1 & FLAG_END_STREAM != 0
                && f.3.windows(11).any(|w| w == b"grpc-status")));
        }
        assert_eq!(service.state(), RegistrationState::Registered);
    }

    #[tokio::test]
    async fn malformed_input_ends_the_connection_without_an_answer() {
        let oversized = {
            let mut i = PREFACE.to_vec();
            i.extend(frame(FRAME_DATA, 0, 1, &vec![0; MAX_FRAME + 1]));
            i
        };
        let bad_padding = {
            let mut i = PREFACE.to_vec();
            i.extend(frame(
                FRAME_DATA,
                FLAG_PADDED | FLAG_END_STREAM,
                1,
                &[200, 0, 0],
            ));
            i
        };
        let short_message = {
            let mut i = PREFACE.to_vec();
            i.extend(frame(FRAME_DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 9, 1]));
            i
        };
        for input in [
            b"GET / HTTP/1.1\r\n\r\n garbage".to_vec(),
            oversized,
            bad_padding,
            short_message,
        ] {
            let (served, out, service) = exchange(input).await;
            assert!(served.is_err());
            assert!(
                frames(&out).iter().all(|f| f.0 != FRAME_DATA),
                "no answer to malformed input"
            );
            assert_eq!(service.state(), RegistrationState::Pending);
        }
    }
}

//! CSI Identity service: who the plugin is and what it offers. Probe reports ready
//! once the service serves; the controller's and node's own dependencies (API
//! server, node agent) are checked per call, where their errors name the cause.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::csi_proto::identity_server::Identity;
use crate::csi_proto::plugin_capability::volume_expansion::Type as ExpansionType;
use crate::csi_proto::plugin_capability::{self, service::Type as ServiceType};
use crate::csi_proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The Identity service. `controller` says whether this process also serves the
/// Controller service (mode `controller` or `all`).
#[derive(Debug, Clone)]
pub struct IdentityService {
    controller: bool,
}

impl IdentityService {
    pub fn new(controller: bool) -> Self {
        IdentityService { controller }
    }
}

fn service(t: ServiceType) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: api::CSI_DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service(ServiceType::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(service(ServiceType::ControllerService));
        }
        // Online: the agent grows an attached device in place (its attach proxy grows
        // the volume file, then the loop device), and NodeExpandVolume grows the
        // mounted filesystem.
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: ExpansionType::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

//! The plugin's sockets called by standard gRPC clients, never by a client written here: grpc-go
//! (at the v1.37 kubelet's grpc-go release) dialling a bare socket path as the kubelet's plugin
//! watcher does and dialling `unix://` targets, and grpc C-core (Python's grpcio) on `unix://`
//! and `unix:` targets. Each sends the `:authority` its library derives (grpc-go and C-core a
//! percent-encoded path), which h2 alone refuses with PROTOCOL_ERROR; every service on both
//! sockets must answer them all.
//!
//! The clients (`e2e/grpc-clients/`) pass serialized messages through, so they know no message
//! types: this test encodes and decodes with the plugin's generated ones. They are built by
//! `e2e/scripts/build-grpc-clients.sh` (run by `make test`); without them the tests skip, or
//! fail under `TESSERA_E2E=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use prost::Message;
use support::*;
use tessera_kubelet_plugin::proto::{registration, v1, v1alpha3, v1beta1};

const NS: &str = "team-a";
const CLAIM_UID: &str = "0000abcd-0000-4000-8000-000000000000";
const SHARE: &str = "9f0c4c4e-1111-4000-8000-000000000001";
const CLAIM_CDI_ID: &str = "gpu.tessera.dev/claim=0000abcd-0000-4000-8000-000000000000-gpu-1-9f0c4c4e-1111-4000-8000-000000000001";

/// A standard client and the way it is pointed at a socket.
#[derive(Clone, Copy, Debug)]
// The variants are the clients' own names (grpc-go, grpc C-core), prefix and all.
#[allow(clippy::enum_variant_names)]
enum Client {
    /// grpc-go dialling the bare path with a unix context dialer: the kubelet's plugin watcher.
    GrpcGoPath,
    /// grpc-go's own resolver on `unix://<path>`.
    GrpcGoUnixUri,
    /// grpc C-core on `unix://<path>`.
    GrpcCoreUnixUri,
    /// grpc C-core on `unix:<path>`.
    GrpcCoreUnix,
}

const CLIENTS: [Client; 4] = [
    Client::GrpcGoPath,
    Client::GrpcGoUnixUri,
    Client::GrpcCoreUnixUri,
    Client::GrpcCoreUnix,
];

fn clients_dir() -> PathBuf {
    tessera_e2e_harness::binaries::cache_root().join("grpc-clients")
}

fn grpc_go() -> PathBuf {
    clients_dir().join("bin/grpc-go-call")
}

fn grpcio_python() -> PathBuf {
    clients_dir().join("venv/bin/python")
}

fn clients_built(test: &str) -> Option<()> {
    tessera_built_libs::require(
        test,
        grpc_go().is_file() && grpcio_python().is_file(),
        || {
            format!(
                "the standard gRPC clients are not built in {} (run e2e/scripts/build-grpc-clients.sh)",
                clients_dir().display()
            )
        },
    )
}

impl Client {
    fn command(self, socket: &Path) -> Command {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/grpc-clients/grpc_core_call.py");
        let mut command;
        match self {
            Client::GrpcGoPath => {
                command = Command::new(grpc_go());
                command.arg("path").arg(socket);
            }
            Client::GrpcGoUnixUri => {
                command = Command::new(grpc_go());
                command
                    .arg("target")
                    .arg(format!("unix://{}", socket.display()));
            }
            Client::GrpcCoreUnixUri => {
                command = Command::new(grpcio_python());
                command
                    .arg(&script)
                    .arg(format!("unix://{}", socket.display()));
            }
            Client::GrpcCoreUnix => {
                command = Command::new(grpcio_python());
                command
                    .arg(&script)
                    .arg(format!("unix:{}", socket.display()));
            }
        }
        command
    }

    /// One unary call of `method` (`/package.Service/Method`) on `socket`.
    async fn call<Req: Message, Resp: Message + Default>(
        self,
        socket: &Path,
        method: &str,
        request: Req,
    ) -> Resp {
        let mut command = self.command(socket);
        command.arg(method).arg(hex(&request.encode_to_vec()));
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("client task")
            .unwrap_or_else(|e| panic!("running the {self:?} client: {e}"));
        assert!(
            output.status.success(),
            "{self:?} {method} on {}: {}",
            socket.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        Resp::decode(unhex(text.trim()).as_slice()).expect("a response of the method's type")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The test's one claim, as a request of DRA version `$module` lists it.
macro_rules! the_claim {
    ($module:ident) => {
        vec![$module::Claim {
            namespace: NS.into(),
            uid: CLAIM_UID.into(),
            name: "inference".into(),
        }]
    };
}

async fn plugin_with_a_claim() -> (Env, Instance) {
    let env = Env::new(&["v1"]);
    let instance = env.start(Some("pod-1"), None).await;
    env.api.put(claim(
        NS,
        "inference",
        CLAIM_UID,
        Some(vec![share("gpu", "gpu-1", SHARE, "2Gi", "25")]),
        vec![],
    ));
    (env, instance)
}

#[tokio::test]
async fn the_registration_socket_answers_every_standard_client() {
    let Some(()) = clients_built("standard gRPC clients") else {
        return;
    };
    let (_env, instance) = plugin_with_a_claim().await;
    let socket = &instance.sockets.registration;
    for client in CLIENTS {
        let info: registration::PluginInfo = client
            .call(
                socket,
                "/pluginregistration.Registration/GetInfo",
                registration::InfoRequest {},
            )
            .await;
        assert_eq!(
            (info.r#type.as_str(), info.name.as_str()),
            ("DRAPlugin", "gpu.tessera.dev"),
            "{client:?}"
        );
        assert_eq!(info.endpoint, instance.sockets.dra.display().to_string());
        assert_eq!(
            info.supported_versions,
            [
                "v1.DRAPlugin",
                "v1beta1.DRAPlugin",
                "v1alpha3.Node",
                "1.0.0"
            ]
        );

        let notify = "/pluginregistration.Registration/NotifyRegistrationStatus";
        let _: registration::RegistrationStatusResponse = client
            .call(
                socket,
                notify,
                registration::RegistrationStatus {
                    plugin_registered: true,
                    error: String::new(),
                },
            )
            .await;
        assert!(
            instance.plugin.registered.load(Ordering::Relaxed),
            "{client:?}: the status arrived"
        );
        let _: registration::RegistrationStatusResponse = client
            .call(
                socket,
                notify,
                registration::RegistrationStatus {
                    plugin_registered: false,
                    error: "refused".into(),
                },
            )
            .await;
        assert!(
            !instance.plugin.registered.load(Ordering::Relaxed),
            "{client:?}"
        );
    }
    instance.stop().await;
}

#[tokio::test]
async fn the_dra_socket_answers_every_standard_client_in_every_version() {
    let Some(()) = clients_built("standard gRPC clients") else {
        return;
    };
    let (env, instance) = plugin_with_a_claim().await;
    let socket = &instance.sockets.dra;
    for client in CLIENTS {
        let prepared: v1::NodePrepareResourcesResponse = client
            .call(
                socket,
                "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources",
                v1::NodePrepareResourcesRequest {
                    claims: the_claim!(v1),
                },
            )
            .await;
        let answer = &prepared.claims[CLAIM_UID];
        assert_eq!(
            (answer.error.as_str(), answer.devices[0].share_id.as_deref()),
            ("", Some(SHARE)),
            "{client:?}"
        );
        assert_eq!(answer.devices[0].cdi_device_ids[0], CLAIM_CDI_ID);
        env.assert_prepared(CLAIM_UID);

        // Prepared again through the older services: the same devices.
        let prepared: v1beta1::NodePrepareResourcesResponse = client
            .call(
                socket,
                "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
                v1beta1::NodePrepareResourcesRequest {
                    claims: the_claim!(v1beta1),
                },
            )
            .await;
        assert_eq!(
            prepared.claims[CLAIM_UID].devices[0].cdi_device_ids[0], CLAIM_CDI_ID,
            "{client:?}"
        );
        let prepared: v1alpha3::NodePrepareResourcesResponse = client
            .call(
                socket,
                "/v1alpha3.Node/NodePrepareResources",
                v1alpha3::NodePrepareResourcesRequest {
                    claims: the_claim!(v1alpha3),
                },
            )
            .await;
        assert_eq!(
            prepared.claims[CLAIM_UID].devices[0].cdi_device_ids[0], CLAIM_CDI_ID,
            "{client:?}"
        );

        let unprepared: v1::NodeUnprepareResourcesResponse = client
            .call(
                socket,
                "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
                v1::NodeUnprepareResourcesRequest {
                    claims: the_claim!(v1),
                },
            )
            .await;
        assert_eq!(unprepared.claims[CLAIM_UID].error, "", "{client:?}");
        env.assert_clean(CLAIM_UID);
        let unprepared: v1beta1::NodeUnprepareResourcesResponse = client
            .call(
                socket,
                "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodeUnprepareResources",
                v1beta1::NodeUnprepareResourcesRequest {
                    claims: the_claim!(v1beta1),
                },
            )
            .await;
        assert_eq!(
            unprepared.claims[CLAIM_UID].error, "",
            "{client:?}: unprepare is idempotent"
        );
        let unprepared: v1alpha3::NodeUnprepareResourcesResponse = client
            .call(
                socket,
                "/v1alpha3.Node/NodeUnprepareResources",
                v1alpha3::NodeUnprepareResourcesRequest {
                    claims: the_claim!(v1alpha3),
                },
            )
            .await;
        assert_eq!(unprepared.claims[CLAIM_UID].error, "", "{client:?}");
    }
    instance.stop().await;
}

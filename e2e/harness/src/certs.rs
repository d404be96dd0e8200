//! The control plane's PKI: one CA, a serving certificate for loopback, client
//! certificates per identity, and the service-account signing key, all written
//! as PEM files under `<state>/pki/`.
//!
//! ECDSA P-256 everywhere: generating it is instant (RSA-2048 costs ~100 ms per
//! key on a CI core) and every component accepts it.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// The first address of the service CIDR the apiserver is started with;
/// in-cluster clients reach the apiserver under it, so the serving certificate
/// names it.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An identity a client certificate is issued for (RBAC user and groups).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// File stem under `pki/`.
    pub file: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

pub const ADMIN: Identity<'static> = Identity {
    file: "admin",
    user: "tessera-admin",
    groups: &["system:masters"],
};
pub const SCHEDULER: Identity<'static> = Identity {
    file: "scheduler",
    user: "system:kube-scheduler",
    groups: &[],
};
/// The apiserver's identity towards aggregated apiservers; also the only
/// name allowed to assert users through request headers.
pub const FRONT_PROXY: Identity<'static> = Identity {
    file: "front-proxy-client",
    user: "front-proxy-client",
    groups: &[],
};
/// The apiserver's identity towards kubelets (`kubectl logs`, `exec`); a kubelet with webhook
/// authorization asks the apiserver, which lets `system:masters` do anything.
pub const KUBELET_CLIENT: Identity<'static> = Identity {
    file: "apiserver-kubelet-client",
    user: "kube-apiserver-kubelet-client",
    groups: &["system:masters"],
};
pub const CONTROLLER_MANAGER: Identity<'static> = Identity {
    file: "controller-manager",
    user: "system:kube-controller-manager",
    groups: &[],
};

/// The generated PKI. Keeps the CA key in memory so that later layers
/// (simulated nodes, the kubelet plugin) can be issued identities too.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_cert: PathBuf,
    pub serving: CertFiles,
    pub admin: CertFiles,
    pub scheduler: CertFiles,
    pub controller_manager: CertFiles,
    pub front_proxy: CertFiles,
    pub kubelet_client: CertFiles,
    /// PKCS#8 private key the apiserver signs service-account tokens with.
    pub service_account_key: PathBuf,
    /// Its public half, for verifying tokens.
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// Generates everything into `dir` (created if needed).
    pub fn generate(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(Error::io(dir, "creating the PKI directory"))?;

        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tessera-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = new_key("ca")?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(cert_err("ca"))?;
        let ca_cert = dir.join("ca.crt");
        write_private(&ca_cert, ca.pem().as_bytes())?;
        write_private(&dir.join("ca.key"), ca_key_pem.as_bytes())?;

        let sa = new_key("service-account")?;
        let service_account_key = dir.join("sa.key");
        let service_account_pub = dir.join("sa.pub");
        write_private(&service_account_key, sa.serialize_pem().as_bytes())?;
        write_private(&service_account_pub, sa.public_key_pem().as_bytes())?;

        let mut pki = Pki {
            dir: dir.to_owned(),
            ca,
            ca_cert,
            serving: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            admin: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            scheduler: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            controller_manager: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            front_proxy: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            kubelet_client: CertFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            service_account_key,
            service_account_pub,
        };
        pki.serving = pki.issue_serving()?;
        pki.admin = pki.issue_client(ADMIN)?;
        pki.scheduler = pki.issue_client(SCHEDULER)?;
        pki.controller_manager = pki.issue_client(CONTROLLER_MANAGER)?;
        pki.front_proxy = pki.issue_client(FRONT_PROXY)?;
        pki.kubelet_client = pki.issue_client(KUBELET_CLIENT)?;
        Ok(pki)
    }

    /// One serving certificate for every component that listens: they all
    /// listen on 127.0.0.1 and are reached as `127.0.0.1` or `localhost`.
    fn issue_serving(&self) -> Result<CertFiles> {
        let names = [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(cert_err("serving"))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(KUBERNETES_SERVICE_IP)));
        params
            .distinguished_name
            .push(DnType::CommonName, "tessera-e2e-serving");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("serving", params)
    }

    /// Issues a serving certificate for a server other than the control plane's (a real
    /// node's kubelet), valid for exactly `dns_names` and `ips`, written as `pki/<file>.crt`
    /// and `.key`.
    pub fn issue_server(
        &self,
        file: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertFiles> {
        let mut params =
            CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(cert_err(file))?;
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.distinguished_name.push(DnType::CommonName, file);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, params)
    }

    /// Issues a client certificate whose CN and O become the RBAC user and
    /// groups, written as `pki/<file>.crt` and `.key`.
    pub fn issue_client(&self, id: Identity<'_>) -> Result<CertFiles> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, id.user);
        for group in id.groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(id.file, params)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Result<CertFiles> {
        let key = new_key(file)?;
        let cert = params.signed_by(&key, &self.ca).map_err(cert_err(file))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        write_private(&files.cert, cert.pem().as_bytes())?;
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        Ok(files)
    }

    /// The CA certificate in DER, for clients built in process.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca.der().to_vec()
    }
}

fn new_key(what: &str) -> Result<KeyPair> {
    KeyPair::generate().map_err(cert_err(what))
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.to_owned();
    move |source| Error::Certificate { what, source }
}

/// Keys must not be world-readable: the state directory may sit in a shared /tmp.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(path, "creating"))?;
    file.write_all(contents).map_err(Error::io(path, "writing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_all_files_as_pem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::generate(dir.path()).expect("pki");
        for path in [
            &pki.ca_cert,
            &pki.serving.cert,
            &pki.serving.key,
            &pki.admin.cert,
            &pki.admin.key,
            &pki.scheduler.cert,
            &pki.controller_manager.key,
            &pki.service_account_key,
            &pki.service_account_pub,
        ] {
            let text = fs::read_to_string(path).expect("readable");
            assert!(
                text.starts_with("-----BEGIN "),
                "{} is not PEM",
                path.display()
            );
        }
        assert!(
            fs::read_to_string(&pki.service_account_key)
                .expect("key")
                .contains("PRIVATE KEY")
        );
        assert!(
            fs::read_to_string(&pki.service_account_pub)
                .expect("pub")
                .contains("PUBLIC KEY")
        );
    }
}

//! Kubeconfig files for the admin user and each component.
//!
//! Written with absolute file paths rather than embedded data so that a person
//! debugging a failed run can read the certificates next to the kubeconfig.

use std::path::Path;

use crate::certs::CertFiles;
use crate::error::{Error, Result};

/// Writes a kubeconfig with one cluster, user and context named `tessera-e2e`.
pub fn write(path: &Path, server: &str, ca_cert: &Path, client: &CertFiles) -> Result<()> {
    let text = render(server, ca_cert, client);
    std::fs::write(path, text).map_err(Error::io(path, "writing kubeconfig"))
}

fn render(server: &str, ca_cert: &Path, client: &CertFiles) -> String {
    // JSON strings are valid YAML scalars, which escapes any odd path safely.
    let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let p = |p: &Path| q(&p.to_string_lossy());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tessera-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: tessera-e2e
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: tessera-e2e
  context:
    cluster: tessera-e2e
    user: tessera-e2e
current-context: tessera-e2e
",
        server = q(server),
        ca = p(ca_cert),
        cert = p(&client.cert),
        key = p(&client.key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn parses_back_with_kube() {
        let client = CertFiles {
            cert: PathBuf::from("/s/pki/admin.crt"),
            key: PathBuf::from("/s dir/pki/admin.key"),
        };
        let text = render(
            "https://127.0.0.1:6443",
            Path::new("/s/pki/ca.crt"),
            &client,
        );
        let parsed = kube::config::Kubeconfig::from_yaml(&text).expect("valid kubeconfig");
        let cluster = parsed.clusters[0].cluster.as_ref().expect("cluster");
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        let user = parsed.auth_infos[0].auth_info.as_ref().expect("user");
        assert_eq!(user.client_key.as_deref(), Some("/s dir/pki/admin.key"));
        assert_eq!(parsed.current_context.as_deref(), Some("tessera-e2e"));
    }
}

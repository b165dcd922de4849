//! TLS on the RPC port (SPEC §9). (In progress.)

use crate::config::TlsConfig;

/// The PEM files of `[server.tls]`, read and checked.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Material {
    pub cert_pem: String,
    key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Material").field("cert_pem", &self.cert_pem.len()).field("key_pem", &"<hidden>").finish()
    }
}

impl Material {
    pub fn load(cfg: &TlsConfig) -> Result<Material, String> {
        let read = |key: &str, p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| format!("{key}: cannot read {}: {e}", p.display()));
        Ok(Material {
            cert_pem: read("server.tls.cert", cfg.cert.as_deref().unwrap())?,
            key_pem: read("server.tls.key", cfg.key.as_deref().unwrap())?,
            client_ca_pem: cfg.client_ca.as_deref().map(|p| read("server.tls.client_ca", p)).transpose()?,
        })
    }
}

//! `fuke certs dev`: a development CA, a server certificate for localhost and a client
//! certificate, generated with rcgen. Never for production; private keys are git-ignored.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("writing {0}: {1}")]
    Write(String, std::io::Error),
}

/// PEM text of a generated set.
pub struct DevCerts {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

pub fn generate(server_names: &[&str]) -> Result<DevCerts, DevCertError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Fuke development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names: Vec<String> = server_names.iter().map(|s| s.to_string()).collect();
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "fuke server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    let mut client_params = CertificateParams::new(vec!["fuke-client".to_string()])?;
    client_params
        .distinguished_name
        .push(DnType::CommonName, "fuke client");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate()?;
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    Ok(DevCerts {
        ca_cert: ca_cert.pem(),
        ca_key: issuer.key().serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

/// Writes `ca.pem ca.key server.pem server.key client.pem client.key` into `dir`.
pub fn write(dir: &Path, certs: &DevCerts) -> Result<(), DevCertError> {
    std::fs::create_dir_all(dir).map_err(|e| DevCertError::Write(dir.display().to_string(), e))?;
    for (name, text) in [
        ("ca.pem", &certs.ca_cert),
        ("ca.key", &certs.ca_key),
        ("server.pem", &certs.server_cert),
        ("server.key", &certs.server_key),
        ("client.pem", &certs.client_cert),
        ("client.key", &certs.client_key),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| DevCertError::Write(path.display().to_string(), e))?;
    }
    Ok(())
}

//! The certificates one throw-away control plane needs: a CA, the API server's serving
//! certificate for 127.0.0.1/localhost, client certificates (admin in `system:masters`,
//! the controller manager under its RBAC bootstrap name) and the service-account key.
//! Everything is written as PEM files into the control plane's directory.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};

/// A certificate and its private key on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every PEM file of one control plane.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: CertFiles,
    pub serving: CertFiles,
    pub admin: CertFiles,
    pub controller_manager: CertFiles,
    /// Service-account token signing key (private) and its public half.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// Generates fresh keys and certificates into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "blockvol-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = write_pair(dir, "ca", &ca_cert.pem(), &ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut serving = leaf_params("kube-apiserver", None, ExtendedKeyUsagePurpose::ServerAuth)?;
        serving.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
            SanType::DnsName("kubernetes".try_into()?),
            SanType::DnsName("kubernetes.default".try_into()?),
            SanType::DnsName("kubernetes.default.svc".try_into()?),
        ];
        let serving = sign(dir, "apiserver", serving, &issuer)?;

        let admin = sign(
            dir,
            "admin",
            leaf_params(
                "blockvol-e2e-admin",
                Some("system:masters"),
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
            &issuer,
        )?;
        let controller_manager = sign(
            dir,
            "controller-manager",
            leaf_params(
                "system:kube-controller-manager",
                None,
                ExtendedKeyUsagePurpose::ClientAuth,
            )?,
            &issuer,
        )?;

        let sa = KeyPair::generate()?;
        let service_account_key = dir.join("sa.key");
        let service_account_pub = dir.join("sa.pub");
        write(&service_account_key, &sa.serialize_pem())?;
        write(&service_account_pub, &sa.public_key_pem())?;

        Ok(Pki {
            ca,
            serving,
            admin,
            controller_manager,
            service_account_key,
            service_account_pub,
        })
    }
}

fn leaf_params(
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn sign(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<CertFiles> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_pair(dir, name, &cert.pem(), &key)
}

fn write_pair(dir: &Path, name: &str, cert_pem: &str, key: &KeyPair) -> Result<CertFiles> {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    write(&files.cert, cert_pem)?;
    write(&files.key, &key.serialize_pem())?;
    Ok(files)
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
